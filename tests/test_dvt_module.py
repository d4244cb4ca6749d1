"""DVTModule: the summed exit losses, per-exit distillation, and thresholds kept in Lightning checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dynvit.lightning import DVTModule
from dynvit.objectives.dynamicvit import logit_distillation_loss

ARGS = dict(
    model_name="vit_tiny_patch16_224",
    num_classes=5,
    img_size=32,
    patches=[[16, 0], [11, 1], [8, 0]],
    model_kwargs=dict(embed_dim=32, depth=2, num_heads=2),
    lr_base_batch_size=None,
    warmup_epochs=0,
    label_smoothing=0.0,
)


# Tiny models gain nothing from a second intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_loss_is_the_sum_of_the_exits_cross_entropies() -> None:
    torch.manual_seed(0)
    module = DVTModule(**ARGS).train()
    x, y = batch()
    torch.manual_seed(1)
    loss = module.training_step((x, y), 0)
    torch.manual_seed(1)
    exits = module.net(x)
    assert len(exits) == 3
    assert loss.item() == pytest.approx(sum(F.cross_entropy(o, y) for o in exits).item(), rel=1e-6)


def test_distillation_from_a_teacher_weighs_each_exit(tmp_path) -> None:
    import timm

    torch.manual_seed(0)
    teacher = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=2
    )
    path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, path)
    module = DVTModule(
        **ARGS,
        teacher_name="vit_tiny_patch16_224",
        teacher_checkpoint=str(path),
        teacher_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
        distill_weight=0.25,
    ).train()
    assert not module.teacher.training
    x, y = batch()
    loss = module.training_step((x, y), 0)
    exits = module.net(x)
    with torch.no_grad():
        target = teacher.eval()(x)
    ce = sum(F.cross_entropy(o, y) for o in exits)
    kl = sum(logit_distillation_loss(o, target) for o in exits)
    assert loss.item() == pytest.approx((0.75 * ce + 0.25 * kl).item(), rel=1e-5)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    with pytest.raises(ValueError, match="teacher_name"):
        DVTModule(**ARGS, teacher_checkpoint=str(path))


def test_fit_chooses_thresholds_for_the_budget_and_the_checkpoint_keeps_them(tmp_path) -> None:
    torch.manual_seed(0)
    probe = DVTModule(**ARGS)
    costs = probe.net.exit_gflops()
    budget = (costs[0] + costs[2]) / 2
    module = DVTModule(**ARGS, gflops=budget)
    x, y = batch(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=4,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, loader, loader)
    thresholds = module.net.thresholds
    assert thresholds is not None and thresholds.shape == (2,)
    assert trainer.callback_metrics["val/early_exit_gflops"].item() <= budget
    path = tmp_path / "dvt.ckpt"
    trainer.save_checkpoint(path)
    assert torch.equal(torch.load(path, weights_only=False)["dvt_thresholds"], thresholds)
    restored = DVTModule.load_from_checkpoint(path)
    assert torch.equal(restored.net.thresholds, thresholds)
    restored.eval()
    with torch.no_grad():
        expected = restored.net.predict_early_exit(x, thresholds).logits
        assert torch.allclose(restored(x), expected)


def test_bad_distill_weight() -> None:
    with pytest.raises(ValueError, match="distill_weight"):
        DVTModule(**ARGS, distill_weight=1.5)


def test_a_budget_below_exit_1_is_refused_when_built() -> None:
    # It was refused only when the first validation epoch ended, after training.
    with pytest.raises(ValueError, match=r"below exit 1's cost .*give at least that much"):
        DVTModule(**ARGS, gflops=1e-6)


def test_model_kwargs_may_not_give_the_modules_own_arguments() -> None:
    # in_chans is linked from the DataModule; in model_kwargs too it was "got multiple values for keyword argument".
    kwargs = dict(ARGS["model_kwargs"], in_chans=1)
    with pytest.raises(ValueError, match=r"model_kwargs sets in_chans.*model\.init_args\.in_chans"):
        DVTModule(**{**ARGS, "model_kwargs": kwargs})
