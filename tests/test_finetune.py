"""The fine-tuned track: every registered method fine-tunes through one module, its objectives, its bad inputs."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

from dynvit import methods
from dynvit.lightning.finetune import OBJECTIVES, MethodFineTuning, budget_gflops
from dynvit.measure.flops import count_flops
from dynvit.models import forward_with_tokens
from dynvit.models.dvt import EXIT_NAMES
from dynvit.models.masked_attention import MaskedAttention
from tests.test_methods_contract import tiny_params

NAME = "deit_tiny_patch16_224"
TINY = dict(img_size=32, num_classes=5, model_kwargs=dict(patch_size=8, embed_dim=64, depth=4, num_heads=2))
LOC = (1, 2, 3)
REGISTERED = list(methods.registered())


# Tiny models gain nothing from a second intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def module(name: str, **kwargs) -> MethodFineTuning:
    kwargs = {"pruning_loc": LOC, "mixup": 0.0, "cutmix": 0.0, "lr_base_batch_size": None, **kwargs}
    return MethodFineTuning(method=name, model_name=NAME, **TINY, **kwargs)


def tiny_module(name: str, **kwargs) -> MethodFineTuning:
    """The method at a setting this tiny ViT accepts (its knob given directly: no GFLOPs matching)."""
    from dynvit import create_teacher

    vit = create_teacher(NAME, img_size=TINY["img_size"], num_classes=TINY["num_classes"], **TINY["model_kwargs"])
    record = methods.get(name)
    params = {k: v for k, v in tiny_params(record, vit).items() if k not in record.stage_params(LOC, 4)}
    return module(name, keep_ratio=None, method_params=params, **kwargs)


def images(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.arange(batch) % TINY["num_classes"]


def step(m: MethodFineTuning, x: torch.Tensor, y: torch.Tensor, lr: float = 1e-2) -> torch.Tensor:
    """One optimiser step on the module's ``training_step`` loss, outside a Trainer; returns the loss."""
    m.train()
    opt = torch.optim.SGD([p for p in m.net.parameters() if p.requires_grad], lr=lr)
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer to log to
        loss = m.training_step((x, y), 0)
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.parametrize("name", REGISTERED)
def test_a_fine_tuning_step_moves_the_backbone_and_the_learned_modules(name):
    m = tiny_module(name)
    teacher_keys = set(m.teacher.state_dict())
    x, y = images()
    before = {k: p.detach().clone() for k, p in m.net.named_parameters()}
    teacher_before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    step(m, x, y)
    grads = {k: p.grad for k, p in m.net.named_parameters()}
    # A cascade (DVT) holds one backbone per exit, each under its own prefix; every one of them trains.
    backbones = [f"{e}." for e in EXIT_NAMES] if "exits" in methods.get(name).reports else [""]
    # The backbone trains through the reduction: its patch embedding (before any reduction) and head moved.
    for prefix in backbones:
        for key in ("patch_embed.proj.weight", "head.weight", "blocks.0.attn.qkv.weight"):
            assert not torch.equal(before[prefix + key], m.net.get_parameter(prefix + key)), prefix + key
    own = {k: next(k[len(p) :] for p in backbones if k.startswith(p)) for k in before}
    new = [k for k in before if own[k] not in teacher_keys]
    if methods.get(name).learned:
        assert new, f"{name} is learned but adds no parameters"
    else:
        # A training-free method adds parameters only through its objective (DiffRate's searched rates).
        assert not new or methods.get(name).objective is not None
    if new:
        # DTEM's embedding in the last block matches tokens after which only the class token is read; DVT's
        # last block's reuse MLP reads the previous exit for a class token whose features nothing reads after.
        unread = {"dtem": "blocks.3.", "dvt": f"{backbones[-1]}blocks.3.feature_resuse_mlp"}
        reached = [k for k in new if not (name in unread and k.startswith(unread[name]))]
        # Per module: a bias can get exactly none (DPC-KNN's score bias cancels in its normalised weights).
        modules = {k.rsplit(".", 1)[0] for k in reached}
        reaching = {k.rsplit(".", 1)[0] for k in reached if grads[k] is not None and grads[k].abs().sum() > 0}
        assert modules == reaching, f"{name}: no gradient reached {sorted(modules - reaching)}"
    # The frozen teacher took no step.
    assert all(torch.equal(v, m.teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_budget_matches_each_method_to_dynamicvits_gflops_at_rho():
    vit = copy.deepcopy(tiny_module("tome").teacher)
    for rho in (0.7, 0.5):
        target = budget_gflops(vit, rho, LOC)
        m = module("tome", keep_ratio=rho)
        r = m.method_params["r"]

        # The nearest r: its GFLOPs are no further from the target than r ± 1's.
        def gflops(r: int) -> float:
            return count_flops(methods.get("tome").build(copy.deepcopy(vit), r=r))

        assert abs(gflops(r) - target) <= min(abs(gflops(r + d) - target) for d in (-1, 1) if r + d >= 0)
        assert m.point_fields() == {"method": "tome", "keep_ratio": rho, "param": f"r={r}", "track": "fine-tuned"}
    assert module("dynamicvit", keep_ratio=0.5).net.keep_ratio == 0.5


def test_dynamicvit_dispatches_to_its_objective_and_others_to_cross_entropy():
    dyn = tiny_module("dynamicvit", objective_args={"dynamicvit": {"ratio_weight": 2.0}, "dtem": {}})
    assert dyn.objective is OBJECTIVES["dynamicvit"]
    x, y = images()
    dyn.train()
    terms = dyn.loss(dyn.net(x), y, forward_with_tokens(dyn.teacher, x))
    assert {"cls", "ratio", "distill", "token"} <= set(terms)
    expected = terms["cls"] + 2.0 * terms["ratio"] + 0.5 * terms["distill"] + 0.5 * terms["token"]
    torch.testing.assert_close(terms["total"], expected)
    tome = tiny_module("tome", label_smoothing=0.0)
    assert tome.objective is OBJECTIVES["ce"]
    tome.train()
    logits = tome.net(x)
    torch.testing.assert_close(tome.loss(logits, y, None)["total"], nn.functional.cross_entropy(logits, y))


def test_distillation_adds_the_teachers_logit_kl():
    plain, distilled = tiny_module("evit"), tiny_module("evit", distill_weight=0.5)
    plain.net.load_state_dict(distilled.net.state_dict())
    x, y = images()
    torch.manual_seed(0)
    a = step(plain, x, y, lr=0.0)
    torch.manual_seed(0)
    b = step(distilled, x, y, lr=0.0)
    plain.train()
    logits = plain.net(x)
    kl = nn.functional.kl_div(
        logits.log_softmax(-1), distilled.teacher(x).log_softmax(-1), reduction="batchmean", log_target=True
    )
    torch.testing.assert_close(b, a + 0.5 * kl.detach(), rtol=1e-4, atol=1e-5)


def test_dynamicvit_objective_takes_the_digits_recipes_keep_gradient_and_start():
    torch.manual_seed(0)
    plain = module("dynamicvit", keep_ratio=0.7)
    torch.manual_seed(0)
    tuned = module(
        "dynamicvit",
        keep_ratio=0.7,
        objective_args={"dynamicvit": {"keep_gradient": "secant", "start_at_target": True}},
    )
    layers = [m for m in tuned.net.modules() if isinstance(m, MaskedAttention)]
    assert layers and {m.keep_gradient for m in layers} == {"secant"}
    assert {m.keep_gradient for m in plain.net.modules() if isinstance(m, MaskedAttention)} == {"tangent"}
    plain.net.start_predictors_at_target()  # what start_at_target does to the same fresh predictors
    for (name, want), got in zip(plain.net.state_dict().items(), tuned.net.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, msg=name)


def test_dtem_freeze_backbone_trains_only_the_embedding():
    m = tiny_module("dtem", objective_args={"dtem": {"freeze_backbone": True}, "dynamicvit": {"ratio_weight": 2.0}})
    trainable = [k for k, p in m.net.named_parameters() if p.requires_grad]
    assert trainable and all(".metric_layer." in k for k in trainable)


def test_diffrate_objective_searches_the_rates_under_its_flops_constraint():
    args = {"diffrate": {"flops_unit": 1e6, "rate_lr": 0.05}}
    m = module("diffrate", keep_ratio=0.7, objective_args=args)
    net, plain = m.net, module("diffrate", keep_ratio=0.7, fine_tune=False).net
    # The training-free point runs the budget's schedule; fine-tuning searches rates that start uniform, with
    # the formula's count of that schedule as target.
    assert plain.prune_rates is None and net.kept_counts() == ([17] + [11] * 3,) * 2
    target = plain.formula_flops([m for _, m in plain.token_schedule()]).item()
    assert m.loss.target_flops == target
    assert m.point_fields()["param"] == "searched rates"
    x, y = images()
    net.train()
    terms = m.loss(net(x), y, None)
    flops = net.formula_flops()
    torch.testing.assert_close(terms["total"], terms["cls"] + 5.0 * ((flops - target) / 1e6) ** 2)
    # The rates learn at DiffRate's own rate (before the schedule), the backbone at the recipe's.
    scales = m.lr_scales()
    assert scales["prune_rates."] * m.peak_lr() == pytest.approx(0.05) and scales[""] == 1.0
    before = {k: p.detach().clone() for k, p in net.named_parameters()}
    step(m, x, y)
    moved = {k for k, p in net.named_parameters() if not torch.equal(before[k], p)}
    assert {f"{kind}_rates.{i}.logits" for kind in ("prune", "merge") for i in range(3)} <= moved
    assert "blocks.0.attn.qkv.weight" in moved
    # DiffRate's own recipe: the backbone frozen, only the rates train.
    frozen = module("diffrate", keep_ratio=0.7, objective_args={"diffrate": {"freeze_backbone": True}})
    trainable = {k for k, p in frozen.net.named_parameters() if p.requires_grad}
    assert trainable == {f"{kind}_rates.{i}.logits" for kind in ("prune", "merge") for i in range(3)}


def test_a_searched_diffrate_checkpoint_reloads_its_schedule():
    m = module("diffrate", keep_ratio=0.7)
    with torch.no_grad():
        for rates in (*m.net.prune_rates, *m.net.merge_rates):
            rates.logits.normal_()
    again = module("diffrate", keep_ratio=0.7)
    assert again.net.kept_counts() != m.net.kept_counts()
    again.load_state_dict(m.state_dict())
    assert again.net.kept_counts() == m.net.kept_counts()


def test_training_free_point_fits_nothing(tmp_path):
    import lightning as L

    from dynvit.data import ClutteredDigitsDataModule
    from tests.tiny_config import DIGITS

    digits = dict(num_classes=10, in_chans=1, model_kwargs=dict(patch_size=4, embed_dim=32, depth=4, num_heads=2))
    m = MethodFineTuning(method="evit", model_name=NAME, img_size=32, pruning_loc=LOC, fine_tune=False, **digits)
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    data = ClutteredDigitsDataModule(**DIGITS)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(m, datamodule=data)
    assert trainer.global_step == 0
    assert all(torch.equal(v, m.net.state_dict()[k]) for k, v in before.items())
    assert m.point_fields()["track"] == "training-free"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "tomee"}, "did you mean 'tome'"),
        ({"method": "tome", "objective": "focal"}, "objective 'focal'"),
        ({"method": "tome", "objective": "diffrate"}, "searches DiffRate's per-block rates"),
        ({"method": "diffrate", "objective_args": {"diffrate": {"granularity": 0}}}, "granularity is the gap"),
        ({"method": "diffrate", "objective_args": {"diffrate": {"flops_weight": -5}}}, "flops_weight must be"),
        ({"method": "diffrate", "objective_args": {"diffrate": {"target_gflops": "2.9"}}}, "target_gflops must be"),
        (
            {"method": "dynamicvit", "objective_args": {"dynamicvit": {"ratio_wieght": 2.0}}},
            "takes no objective_args ['ratio_wieght']",
        ),
        ({"method": "dynamicvit", "objective_args": {"ratio_weight": 2.0}}, "keyed by objective name"),
        ({"method": "dynamicvit", "objective_args": {"dynamicvit": 2.0}}, "objective_args.dynamicvit must map"),
        (
            {"method": "dynamicvit", "objective_args": {"dynamicvit": {"keep_gradient": "chord"}}},
            "keep_gradient",
        ),
        ({"method": "tome", "keep_ratio": 1.5}, "keep ratios must be in (0, 1]"),
        ({"method": "tome", "keep_ratio": 0.05}, "keep"),
        ({"method": "tome", "keep_ratio": 0.7, "method_params": {"r": 2}}, "given twice"),
        ({"method": "tome", "distill_weight": -1.0}, "distill_weight"),
        ({"method": "tome", "distill_weight": float("nan")}, "distill_weight must be >= 0"),
        ({"method": "tome", "backbone_lr_scale": -0.1}, "backbone_lr_scale must be >= 0"),
    ],
)
def test_bad_inputs_are_refused_before_training(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        module(kwargs.pop("method"), **kwargs)


def test_a_registry_entry_naming_an_objective_the_table_lacks_is_refused(monkeypatch):
    record = methods.get("patchmerger")
    monkeypatch.setitem(methods._REGISTRY, "patchmerger", type(record)(**{**record.__dict__, "objective": "merge_kl"}))
    with pytest.raises(ValueError, match=r"objective 'merge_kl' \(from the registry entry of 'patchmerger'\)"):
        module("patchmerger")
