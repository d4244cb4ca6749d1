"""DynamicViT on every ViT family timm has: class token, distilled DeiT, registers, average pooling with and
without fc_norm, attention pooling; and clear errors for the families it cannot prune."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from torch import nn

from dynvit import count_flops, create_student, create_teacher, forward_with_tokens, measure_throughput
from dynvit.models import DynamicViT, DynamicViTDistilled, load_weights
from dynvit.models.masked_attention import MaskedAttentionPool
from dynvit.objectives.dynamicvit import DynamicViTLoss, logit_distillation_loss
from dynvit.reducers import TokenCost, apply_reducer
from dynvit.run.cli import DynViTCLI
from tests.tiny_config import benchmark_rows, tiny_config, write_config

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=5)
LOC = (1, 2, 3)
N = (TINY["img_size"] // TINY["patch_size"]) ** 2
# name: (timm model, extra kwargs); each is a real timm architecture, made tiny.
FAMILIES = {
    "class_token": ("deit_tiny_patch16_224", {}),
    "no_embed_class": ("deit3_small_patch16_224", {}),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_small_patch14_reg4_dinov2", {}),
    "gap": ("vit_medium_patch16_gap_256", {}),
    "gap_fc_norm": ("vit_betwixt_patch16_reg4_gap_256", {}),
    "gap_fc_norm_class_token": ("deit_tiny_patch16_224", dict(global_pool="avg")),
    "gap_over_prefix_too": ("deit_tiny_patch16_224", dict(global_pool="avg", pool_include_prefix=True)),
    "attention_pool": ("vit_base_patch16_siglip_224", {}),
    "attention_pool_registers": ("vit_base_patch16_siglip_224", dict(reg_tokens=2)),
}
POOLED = [f for f in FAMILIES if f.startswith(("gap", "attention_pool"))]


def build(family: str, keep_ratio: float = 0.7, student: bool = True) -> nn.Module:
    name, kwargs = FAMILIES[family]
    if student:
        return create_student(name, keep_ratio=keep_ratio, pruning_loc=LOC, **TINY, **kwargs)
    return create_teacher(name, **TINY, **kwargs)


def pair(family: str, keep_ratio: float) -> tuple[nn.Module, nn.Module]:
    """A teacher with random weights and the student that starts from them."""
    teacher = build(family, student=False).eval()
    student = build(family, keep_ratio)
    load_weights(student, teacher.state_dict())
    return teacher, student


def images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, TINY["img_size"], TINY["img_size"])


def test_the_families_are_what_their_names_say() -> None:
    def shape(family: str) -> tuple:
        m = build(family, student=False)
        return (m.cls_token is not None, m.num_prefix_tokens, m.global_pool, type(m.fc_norm).__name__, m.no_embed_class)

    assert shape("class_token") == (True, 1, "token", "Identity", False)
    assert shape("no_embed_class") == (True, 1, "token", "Identity", True)
    assert shape("distilled") == (True, 2, "token", "Identity", False)
    assert shape("registers") == (True, 5, "token", "Identity", True)
    assert shape("gap") == (False, 0, "avg", "Identity", False)
    assert shape("gap_fc_norm") == (False, 4, "avg", "LayerNorm", True)
    assert shape("gap_fc_norm_class_token") == (True, 1, "avg", "LayerNorm", False)
    assert shape("attention_pool") == (False, 0, "map", "Identity", False)
    assert shape("attention_pool_registers") == (False, 2, "map", "Identity", False)
    assert shape("gap_over_prefix_too") == (True, 1, "avg", "LayerNorm", False)


# --- training: output and gradients ----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_train_output_and_class_loss_gradients_reach_every_predictor(family: str) -> None:
    model = build(family).train()
    out = model(images())
    assert out.logits.shape == (3, TINY["num_classes"])
    assert out.tokens.shape == (3, N, TINY["embed_dim"])
    assert out.mask.shape == (3, N) and len(out.decisions) == len(LOC)
    assert (out.dist_logits is not None) == (family == "distilled")
    F.cross_entropy(out.logits, torch.tensor([0, 1, 2])).backward()
    for name, p in model.score_predictor.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", POOLED)
def test_training_pool_is_the_pool_of_the_kept_tokens_and_passes_a_gradient_to_the_decisions(family: str) -> None:
    model = build(family).eval()
    p = model.num_prefix_tokens
    x = torch.randn(3, p + N, TINY["embed_dim"])
    decision = (torch.rand(3, N) < 0.5).float()
    decision[:, 0] = 1.0  # at least one kept patch per image
    decision.requires_grad_(True)
    keep = torch.cat([torch.ones(3, p), decision], dim=1)
    pooled = model.pool_kept(x, keep)
    for b in range(3):
        kept = (
            x[b : b + 1, :][:, keep[b].bool()] if model.pool_include_prefix else x[b : b + 1, p:][:, decision[b].bool()]
        )
        # timm's attention pool, or the plain mean, on the gathered tokens
        expected = model.attn_pool(kept) if model.attn_pool is not None else kept.mean(dim=1)
        torch.testing.assert_close(pooled[b : b + 1], expected, rtol=1e-4, atol=1e-5)
    pooled.square().sum().backward()
    assert decision.grad.abs().sum(dim=1).gt(0).all()


def test_attention_pool_mask_is_multiplicative_inside_the_softmax() -> None:
    model = build("attention_pool")
    pool = model.attn_pool
    assert type(pool) is MaskedAttentionPool
    x = torch.randn(2, N, TINY["embed_dim"])
    # Everything kept: timm's own pool, to float rounding.
    torch.testing.assert_close(pool(x, keep=torch.ones(2, N)), pool(x), rtol=1e-5, atol=1e-6)
    # A dropped key gets a gradient from the pooled output (an additive -inf mask would give it none).
    keep = torch.ones(2, N)
    keep[:, N // 2 :] = 0
    keep.requires_grad_(True)
    pool(x, keep=keep).sum().backward()
    assert keep.grad[:, N // 2 :].abs().sum() > 0


# --- eval: an explicit per-image gather --------------------------------------------------------------


def explicit_head(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The family's head on one image's final tokens (1, P + K, C), written out."""
    t = model.norm(tokens)
    p = model.num_prefix_tokens
    if isinstance(model, DynamicViTDistilled):
        return (model.head(t[:, 0]) + model.head_dist(t[:, 1])) / 2
    if model.global_pool == "token":
        return model.head(t[:, 0])
    pooled = t if model.pool_include_prefix else t[:, p:]
    if model.global_pool == "avg":
        return model.head(model.fc_norm(pooled.mean(dim=1)))
    return model.head(model.attn_pool(pooled))  # 'map': timm's pool reads the remaining tokens


def per_image_gather(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One image at a time: at each stage rank its patch tokens by keep log-odds, keep the top ones (equal
    odds in index order), run the remaining blocks on them, then the head."""
    logits = []
    p = model.num_prefix_tokens
    counts = model.stage_keep_counts
    for b in range(x.shape[0]):
        t = model.embed(x[b : b + 1])
        stage = 0
        for i, block in enumerate(model.blocks):
            if stage < len(LOC) and i == LOC[stage]:
                patches = t[:, p:]
                scores = model.score_predictor[stage](patches, torch.ones(1, patches.shape[1], 1))
                odds = scores[0, :, 0] - scores[0, :, 1]
                # The largest odds, equal ones in index order (fresh predictors score many tokens alike).
                top = torch.argsort(odds, descending=True, stable=True)[: counts[stage]]
                t = torch.cat([t[:, :p], patches[:, top]], dim=1)
                stage += 1
            t = block(t)
        logits.append(explicit_head(model, t)[0])
    return torch.stack(logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_equals_an_explicit_per_image_gather(family: str) -> None:
    model = build(family, 0.6).eval()
    x = images(4)
    with torch.no_grad():
        expected = per_image_gather(model, x)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        logits, masks = model.predict_with_masks(x)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert [m.sum(dim=1).tolist() for m in masks] == [[c] * 4 for c in model.stage_keep_counts]


@pytest.mark.parametrize("family", FAMILIES)
def test_student_at_keep_ratio_one_gives_its_teachers_eval_logits(family: str) -> None:
    teacher, student = pair(family, 1.0)
    x = images(4)
    with torch.no_grad():
        expected = teacher(x)
        # Every token kept, in the order of the predictors' scores: attention and pooling ignore the order.
        torch.testing.assert_close(student.eval()(x), expected, rtol=1e-4, atol=1e-5)
        for predictor in student.score_predictor:  # every Gumbel decision says keep
            predictor.out_conv[4].bias.copy_(torch.tensor([1e4, -1e4]))
        out = student.train()(x)
    if family == "distilled":
        torch.testing.assert_close((out.logits + out.dist_logits) / 2, expected, rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-5)


# --- what token distillation compares -----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_final_tokens_are_normalised_patch_tokens_in_teacher_and_student(family: str) -> None:
    teacher, student = pair(family, 1.0)
    x = images(2)
    with torch.no_grad():
        _, teacher_tokens = forward_with_tokens(teacher, x)
        for predictor in student.score_predictor:
            predictor.out_conv[4].bias.copy_(torch.tensor([1e4, -1e4]))
        student_tokens = student.train()(x).tokens
    assert teacher_tokens.shape == (2, N, TINY["embed_dim"])
    torch.testing.assert_close(student_tokens, teacher_tokens, rtol=1e-4, atol=1e-5)
    # fc_norm models (norm is the identity there) distil per-token fc_norm'd features, zero mean per token.
    has_final_norm = not isinstance(teacher.norm, nn.Identity) or not isinstance(teacher.fc_norm, nn.Identity)
    assert has_final_norm
    torch.testing.assert_close(teacher_tokens.mean(dim=-1), torch.zeros(2, N), rtol=0, atol=1e-4)


# --- distilled DeiT --------------------------------------------------------------------------------


def test_distilled_student_hands_the_class_head_to_the_objective_and_distils_the_dist_head() -> None:
    teacher, student = pair("distilled", 0.7)
    assert type(student) is DynamicViTDistilled and student.num_prefix_tokens == 2
    x = images(4)
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        teacher_logits, teacher_tokens = forward_with_tokens(teacher, x)
    torch.manual_seed(1)
    out = student.train()(x)
    # The class head reads token 0, the distillation head token 1, of the same final tokens.
    terms = DynamicViTLoss()(out, y, student.stage_keep_ratios, teacher_logits, teacher_tokens)
    torch.testing.assert_close(terms.dist_head, logit_distillation_loss(out.dist_logits, teacher_logits))
    without = terms.total - 0.5 * terms.dist_head
    expected = terms.cls + 2.0 * terms.ratio + 0.5 * terms.distill + 0.5 * terms.token
    torch.testing.assert_close(without, expected)
    torch.testing.assert_close(terms.cls, F.cross_entropy(out.logits, y))
    out.dist_logits.sum().backward()
    assert student.head_dist.weight.grad is not None and student.head.weight.grad is None


def test_distilled_deit_converts_only_to_its_own_student() -> None:
    vit = build("distilled", student=False)
    with pytest.raises(TypeError, match="DynamicViTDistilled.from_vit"):
        DynamicViT.from_vit(vit, pruning_loc=LOC)
    with pytest.raises(TypeError, match="converts a distilled DeiT"):
        DynamicViTDistilled.from_vit(build("class_token", student=False), pruning_loc=LOC)


def test_released_deit_distilled_checkpoint_loads_strictly(tmp_path) -> None:
    # The layout DeiT released: {"model": sd} with cls_token, dist_token, pos_embed (N + 2), head, head_dist.
    reference = timm.create_model("deit_tiny_distilled_patch16_224", **TINY)
    sd = reference.state_dict()
    assert {"dist_token", "head_dist.weight"} <= set(sd) and sd["pos_embed"].shape[1] == N + 2
    path = tmp_path / "deit_tiny_distilled.pth"
    torch.save({"model": sd}, path)
    x = images(2)
    teacher = create_teacher("deit_tiny_distilled_patch16_224", checkpoint=path, **TINY).eval()
    student = create_student("deit_tiny_distilled_patch16_224", 1.0, LOC, checkpoint=path, **TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), reference.eval()(x), rtol=0, atol=0)
        torch.testing.assert_close(student(x), reference(x), rtol=1e-4, atol=1e-5)


# --- what cannot be pruned -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("vit_tiny_patch16_224", dict(global_pool="max", class_token=False), r"global_pool='max'.*supports"),
        ("vit_tiny_patch16_224", dict(global_pool="", class_token=False), r"global_pool=''.*supports"),
        ("vit_base_patch16_xp_224", {}, r"block 0 .*ParallelScalingBlock.*supports"),
        ("eva02_tiny_patch14_224", {}, r"Eva is not a timm VisionTransformer.*supports .*global_pool='avg'"),
        ("beit_base_patch16_224", {}, r"Beit is not a timm VisionTransformer"),
        ("vit_relpos_small_patch16_224", {}, r"VisionTransformerRelPos is not a timm VisionTransformer"),
        ("vit_tiny_patch16_224", dict(dynamic_img_size=True), "dynamic_img_size=False"),
        ("vit_tiny_patch16_224", dict(patch_drop_rate=0.5), "patch_drop_rate=0"),
    ],
)
def test_families_that_cannot_be_pruned_raise_naming_what_is_supported(name: str, kwargs: dict, message: str) -> None:
    tiny = dict(TINY, depth=2) | kwargs
    if name.startswith("eva"):
        tiny.pop("img_size")  # Eva builds its rotary embedding for the default grid; any size refuses alike
        tiny["patch_size"] = 14
    with pytest.raises(TypeError, match=message):
        create_student(name, pruning_loc=(1,), **tiny)


# --- the token reducers on the same families ------------------------------------------------------------

REDUCER_PARAMS = {
    "tome": dict(r=2),
    "evit": dict(keep_rate=0.5, pruning_loc=LOC),
    "topk": dict(keep_rate=0.5, pruning_loc=LOC),
    "ats": dict(max_tokens=6, pruning_loc=LOC),
    "random": dict(keep_ratio=0.5, pruning_loc=LOC),
}
CLASS_ATTENTION = ("evit", "topk", "ats")
REDUCIBLE = ["class_token", "distilled", "registers", "gap", "gap_fc_norm", "attention_pool_registers"]


@pytest.mark.parametrize("family", REDUCIBLE)
@pytest.mark.parametrize("method", sorted(REDUCER_PARAMS))
def test_reducers_run_where_their_method_allows(family: str, method: str) -> None:
    teacher = build(family, student=False).eval()
    p = teacher.num_prefix_tokens
    if method in CLASS_ATTENTION and teacher.cls_token is None:
        with pytest.raises(
            TypeError,
            match=f"{method} ranks tokens by the class token's attention.*use .*random or .*tome, which need none",
        ):
            apply_reducer(copy.deepcopy(teacher), method, **REDUCER_PARAMS[method])
        return
    model = apply_reducer(copy.deepcopy(teacher), method, **REDUCER_PARAMS[method]).eval()
    x = images(2)
    logits, counts = model.predict_with_counts(x)
    assert logits.shape == (2, TINY["num_classes"]) and torch.isfinite(logits).all()
    assert (counts[:, 0, 0] == p + N).all()  # prefix tokens are counted in every block, patches from N down
    assert (counts[:, -1, 1] < p + N).all() and (counts[:, -1, 1] > p).all()
    if model.token_schedule() is not None:
        assert counts[0].tolist() == [list(c) for c in model.token_schedule()]
    if method == "tome":  # the cost model's head term counts from the prefix tokens the head reads
        cost = TokenCost.from_model(model)
        unreduced = torch.tensor([[[p + N] * 2] * TINY["depth"]])
        assert cost(unreduced).item() == pytest.approx(count_flops(teacher), rel=1e-9)


@pytest.mark.parametrize("family", ["class_token", "distilled", "registers", "gap_fc_norm", "attention_pool"])
def test_tome_never_merges_prefix_tokens_and_pools_by_size(family: str) -> None:
    teacher = build(family, student=False).eval()
    p = teacher.num_prefix_tokens
    x = images(2)
    model = apply_reducer(copy.deepcopy(teacher), "tome", r=0).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), teacher(x), rtol=0, atol=0)  # r = 0 is the plain model
    model = apply_reducer(model, "tome", r=3)
    steps = model.sizes_per_block(x)
    for _, size in steps:
        torch.testing.assert_close(size.sum(dim=(1, 2)), torch.full((2,), float(p + N)))
        assert (size[:, :p] == 1).all()
    tokens, size = steps[-1]
    with torch.no_grad():
        final = model.norm(tokens)
        if teacher.global_pool == "avg":  # ToMe's size-weighted average, as it pools MAE models
            pooled = (final[:, p:] * size[:, p:]).sum(dim=1) / size[:, p:].sum(dim=1)
            expected = model.head(model.fc_norm(pooled))
        elif teacher.attn_pool is not None:  # proportional attention in the pool too
            expected = model.head(model.attn_pool(final[:, p:], attn_mask=size[:, p:, 0].log()[:, None, None, :]))
        else:
            expected = model.forward_head(final)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    if family == "distilled":  # both heads still read the class and distillation tokens
        assert type(model).__name__ == "ToMeViTVisionTransformerDistilled"
        assert isinstance(model, VisionTransformerDistilled)


def test_a_dynamicvit_student_and_other_subclasses_are_not_reducible() -> None:
    with pytest.raises(TypeError, match="DynamicViT student cannot be reduced"):
        apply_reducer(build("gap"), "tome", r=1)


# --- the whole toolchain: CLI fit (FLOPs, kept-token pictures) and benchmark against reducers ------------


@pytest.mark.parametrize(
    ("name", "bench"), [("vit_base_patch16_siglip_224", False), ("deit_tiny_distilled_patch16_224", True)]
)
def test_cli_fits_and_benchmarks_other_families(tmp_path, name: str, bench: bool) -> None:
    config = tiny_config(tmp_path / "run")
    config["model"]["init_args"]["model_name"] = name
    config["trainer"]["callbacks"] = [{"class_path": "dynvit.measure.callbacks.KeptTokensCallback"}]
    config["wandb"] = {"enabled": False}
    path = write_config(tmp_path / "tiny.yaml", config)
    DynViTCLI(args=["fit", f"--config={path}"])
    metrics = next((tmp_path / "run/csv").rglob("metrics.csv")).read_text()
    assert "cost/gflops" in metrics and "throughput/speedup" in metrics and "val/recall_s3" in metrics
    assert ("train/dist_head" in metrics) == ("distilled" in name)
    assert (tmp_path / "run/kept_tokens/epoch_000.png").is_file()
    if not bench:
        return
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    rows = benchmark_rows(
        path, tmp_path / "bench", f"--ckpt_path={ckpt}", "--ratios=[0.5]", "--methods=[dynamicvit,tome,random]"
    )
    assert [r["method"] for r in rows] == ["teacher", "dynamicvit", "tome", "random"]
    assert all(r["gflops"] > 0 and r["images_per_s"] > 0 and r["top1"] is not None for r in rows)
    assert rows[1]["gflops"] < rows[0]["gflops"]


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_and_throughput_of_every_family(family: str) -> None:
    teacher, student = pair(family, 0.5)
    assert 0 < count_flops(student) < count_flops(teacher)
    assert measure_throughput(student, batch_size=2, pairs=1) > 0
