"""DynamicSwin (dynamic spatial sparsification of timm's Swin): shapes, gradients, the inference split
against a per-image computation, checkpoint layouts (released DynamicSwin, MSRA's Swin) against an
independent re-implementation of the reference, dense features, bad input, and FLOPs at real sizes."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork

from dynvit import DynamicSwin, count_flops, create_student, create_teacher, forward_with_tokens, load_checkpoint
from dynvit.data import ClutteredDigitsDataModule
from dynvit.models import CheckpointMismatch, SpatialOutput, data_config, keep_location_counts
from dynvit.models.spatial_pruning import rank_locations
from tests.reference_dynamic_swin import DynamicSwinReference

NAME = "swin_tiny_patch4_window7_224"
# 64×64 one-channel images, 2-pixel patches: maps 32, 16, 8, 4. Stage 3 (8×8 = 64 locations, four
# windows of 4×4, shifted by 2 in blocks 1 and 3) has 4 blocks, predictors before 1, 2, 3.
ARCH = dict(embed_dim=16, depths=(1, 1, 4, 1), num_heads=(1, 2, 2, 4), window_size=4, patch_size=2, in_chans=1)
# No drop path, so training forwards can be compared.
TINY = dict(ARCH, img_size=64, num_classes=10, drop_path_rate=0.0)
N = 64
REFERENCE_ARGS = dict(ARCH, img_size=64, num_classes=10)


def student(keep_ratio: float = 0.7, **kwargs) -> DynamicSwin:
    return create_student(NAME, keep_ratio=keep_ratio, **{**TINY, **kwargs})


def images(batch: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 1, size, size)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights of order 1/sqrt(fan-in), norms near 1: every branch and path matters, and keep scores
    spread far apart (no near-ties at the selection boundary)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def shared_gumbel(monkeypatch: pytest.MonkeyPatch, noise: list[torch.Tensor]) -> None:
    """Make ``F.gumbel_softmax`` add the given samples (B, N, 2), one per call."""
    calls = iter(noise)

    def gumbel(logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
        soft = (logits + next(calls)).softmax(dim)
        hard_ = F.one_hot(soft.argmax(dim), 2).to(soft.dtype)
        return hard_ - soft.detach() + soft

    monkeypatch.setattr(F, "gumbel_softmax", gumbel)


# --- structure, shapes and kept counts ----------------------------------------------------------------


@pytest.mark.parametrize(("depth", "expected"), [(6, (1, 2, 3)), (18, (2, 4, 6)), (4, (1, 2, 3))])
def test_default_locations_are_the_references(depth: int, expected: tuple) -> None:
    assert student(depths=(1, 1, depth, 1)).pruning_loc == expected


def test_conversion_is_in_place_and_adds_only_predictors_and_fast_paths() -> None:
    model = student()
    assert isinstance(model, DynamicSwin) and model.mask_grid == (8, 8)
    assert model.new_param_prefixes == (
        "layers.2.score_predictor.",
        "layers.2.blocks.1.fastmlp",
        "layers.2.blocks.2.fastmlp",
        "layers.2.blocks.3.fastmlp",
    )
    assert not hasattr(model.layers[2].blocks[0], "fastmlp")  # blocks before the first location stay plain
    # The fast path is LayerNorm + Linear C→C: 2·64 + 64·64 + 64 parameters.
    assert sum(p.numel() for p in model.layers[2].blocks[1].fastmlp.parameters()) == 2 * 64 + 64 * 64 + 64
    teacher = create_teacher(NAME, **TINY)
    assert [k for k in model.state_dict() if not k.startswith(model.new_param_prefixes)] == list(teacher.state_dict())


@pytest.mark.parametrize("keep_ratio", [1.0, 0.9, 0.7])
def test_eval_masks_keep_the_stage_counts(keep_ratio: float) -> None:
    model = student(keep_ratio).eval()
    logits, masks = model.predict_with_masks(images(3))
    assert logits.shape == (3, 10)
    assert [m.shape for m in masks] == [(3, N)] * 3 and all(m.dtype == torch.bool for m in masks)
    assert [m.sum(dim=1).tolist() for m in masks] == [[c] * 3 for c in keep_location_counts(N, keep_ratio, 3)]


def test_train_output_shapes_and_hard_decisions() -> None:
    out = student(0.7).train()(images(3))
    assert isinstance(out, SpatialOutput)
    assert out.logits.shape == (3, 10)
    assert out.features.shape == (3, 4, 4, 128)  # the last map after the final norm, NHWC as timm's Swin
    assert [d.shape for d in out.decisions] == [(3, N)] * 3
    assert all(((d == 0) | (d == 1)).all() and d.requires_grad for d in out.decisions)


def test_other_image_sizes_prune_their_own_padded_map() -> None:
    # 80 px: stage 3 at 10×10, which timm pads to 12×12 for its 4×4 windows; 100 locations to choose from.
    model = student(0.7, dynamic_img_size=True)
    _, masks = model.eval().predict_with_masks(images(2, size=80))
    assert [m.shape[1] for m in masks] == [100] * 3
    assert [int(m[0].sum()) for m in masks] == keep_location_counts(100, 0.7, 3) == [70, 49, 29]
    out = model.train()(images(2, size=80))
    assert out.features.shape == (2, 5, 5, 128) and [d.shape for d in out.decisions] == [(2, 100)] * 3


def test_a_non_square_size_is_built_in() -> None:
    # img_size as (height, width), as create_student documents: it used to raise "tuple % int".
    model = student(0.7, img_size=(64, 96)).eval()
    assert model.mask_grid == (8, 12)
    logits, masks = model.predict_with_masks(torch.randn(2, 1, 64, 96))
    assert logits.shape == (2, 10) and [int(m[0].sum()) for m in masks] == keep_location_counts(96, 0.7, 3)


# --- gradients ---------------------------------------------------------------------------------------


def test_class_loss_alone_reaches_every_predictor_and_fast_path() -> None:
    model = randomise(student(0.7)).train()
    out = model(images(4))
    F.cross_entropy(out.logits, torch.arange(4)).backward()
    new = [(n, p) for n, p in model.named_parameters() if n.startswith(model.new_param_prefixes)]
    assert len([n for n, _ in new if "fastmlp" in n]) == 3 * 4
    assert len([n for n, _ in new if "score_predictor" in n]) == 3 * 10
    for name, p in new:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --- the inference path ------------------------------------------------------------------------------


def per_image_forward(model: DynamicSwin, x: torch.Tensor) -> tuple[torch.Tensor, list[list[set[int]]]]:
    """The inference path written out for one image and one location at a time: the slow path (the
    block's MLP) on the locations of highest log p(keep), the fast path on the rest, both added to
    the attention output."""
    stage3 = model.layers[2]
    logits, kept = [], []
    for image in x:
        t = stage3.downsample(model.layers[1](model.layers[0](model.patch_embed(image[None]))))
        keep, img_kept = None, []
        for j, block in enumerate(stage3.blocks):
            if j in stage3.pruning_loc:
                s = stage3.pruning_loc.index(j)
                log_keep = stage3.score_predictor[s](t.reshape(1, N, -1))[0, :, 0].tolist()
                count = int(N * (model.keep_ratio - 0.2 * s))
                keep = set(sorted(range(N), key=lambda n: -log_keep[n])[:count])
                img_kept.append(keep)
            if keep is None:
                t = block(t)
                continue
            y = block.attend(t).reshape(N, -1)
            out = torch.stack([block.mlp(block.norm2(y[n])) if n in keep else block.fastmlp(y[n]) for n in range(N)])
            t = (y + out).reshape(t.shape)
        logits.append(model.forward_head(model.norm(model.layers[3](t)))[0])
        kept.append(img_kept)
    return torch.stack(logits), kept


@pytest.mark.parametrize("keep_ratio", [0.7, 0.9])
def test_inference_equals_an_explicit_per_image_computation(keep_ratio: float) -> None:
    model = randomise(student(keep_ratio)).eval()
    x = images(3)
    with torch.no_grad():
        expected, kept = per_image_forward(model, x)
        logits = model(x)
    _, masks = model.predict_with_masks(x)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    for b, img_kept in enumerate(kept):
        assert [set(m[b].nonzero().flatten().tolist()) for m in masks] == img_kept


def test_locations_rank_by_log_p_keep_and_ties_by_keep_odds() -> None:
    # (log p(keep), log p(drop)) per location. The reference sorts by log p(keep); where that ties
    # (it rounds to 0.0 once a predictor is confident) the keep odds still order the locations.
    scores = torch.tensor([[[-0.1, -5.0], [-0.2, -10.0], [0.0, -20.0], [0.0, -30.0], [-1.0, -0.5]]])
    assert rank_locations(scores).tolist() == [[3, 2, 0, 1, 4]]


def test_with_every_location_on_the_slow_path_the_student_is_its_teacher(monkeypatch, tmp_path) -> None:
    teacher = randomise(create_teacher(NAME, **TINY)).eval()
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    # One predictor at ρ = 1: nothing is dropped (with three, ρ − 0.2 and ρ − 0.4 always drop some).
    model = student(1.0, pruning_loc=(1,), checkpoint=tmp_path / "teacher.pth")
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), teacher(x), rtol=1e-5, atol=1e-5)
        # Training with every decision "keep": the slow stream is the teacher's map.
        shared_gumbel(monkeypatch, [torch.tensor([1e4, -1e4]).expand(3, N, 2)])
        out = model.train()(x)
        torch.testing.assert_close(out.logits, teacher.train()(x), rtol=1e-5, atol=1e-5)
        assert all(d.all() for d in out.decisions)


# --- checkpoints: the reference's layout and MSRA's -----------------------------------------------------


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A reference DynamicSwin with random weights, saved as a released file, and an MSRA teacher file."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("released")
    reference = randomise(DynamicSwinReference(**REFERENCE_ARGS), seed=1).eval()
    torch.save({"model": reference.state_dict()}, root / "dynamicswin.pth")
    msra = DynamicSwinReference(**REFERENCE_ARGS, pruning_loc=None).eval()
    msra.load_state_dict({k: v for k, v in reference.state_dict().items() if k in msra.state_dict()})
    torch.save({"model": msra.state_dict()}, root / "swin_msra.pth")
    return root, reference, msra


def test_reference_stand_ins_have_the_released_layouts(released) -> None:
    _, reference, msra = released
    keys = set(reference.state_dict())
    assert {"layers.0.downsample.reduction.weight", "layers.2.blocks.1.attn_mask", "head.weight"} <= keys
    assert {"layers.2.blocks.1.fastmlp.fc1.0.weight", "layers.2.blocks.3.fastmlp.fc1.1.bias"} <= keys
    assert {"layers.2.score_predictor.2.out_conv.4.weight", "layers.2.blocks.0.attn.relative_position_index"} <= keys
    assert "layers.3.downsample.reduction.weight" not in keys and "layers.2.blocks.0.fastmlp.fc1.0.weight" not in keys
    assert set(msra.state_dict()) == {k for k in keys if "fastmlp" not in k and "score_predictor" not in k}


@pytest.mark.parametrize("keep_ratio", [0.7, 0.9])
def test_released_file_loads_strictly_and_gives_the_reference_eval_logits(released, keep_ratio) -> None:
    root, reference, _ = released
    model = create_student(NAME, keep_ratio=keep_ratio, checkpoint=root / "dynamicswin.pth", **TINY).eval()
    x = images(4)
    with torch.no_grad():
        expected = reference(x, keep_ratio)
        torch.testing.assert_close(model(x), expected, rtol=3e-6, atol=3e-6 * expected.abs().max())


def test_released_file_gives_the_reference_training_forward(released, monkeypatch) -> None:
    root, reference, _ = released
    model = create_student(NAME, keep_ratio=0.7, checkpoint=root / "dynamicswin.pth", **TINY).train()
    x = images(4)
    noise = [-torch.empty(4, N, 2).exponential_().log() for _ in range(3)]
    with torch.no_grad():
        logits, featmap, decisions = reference(x, 0.7, gumbel_noise=noise)
        shared_gumbel(monkeypatch, noise)
        out = model(x)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.features.flatten(1, 2), featmap, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(out.decisions, decisions, strict=True):
        assert torch.equal(ours, theirs.squeeze(-1))


def test_msra_file_loads_into_teacher_and_into_student_with_fresh_pruning_parts(released) -> None:
    root, _, msra = released
    teacher = create_teacher(NAME, checkpoint=root / "swin_msra.pth", **TINY).eval()
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), msra(x), rtol=1e-5, atol=1e-5)
    model = student(0.7)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(model.new_param_prefixes)}
    report = load_checkpoint(model, root / "swin_msra.pth")
    assert sorted(report.missing) == sorted(fresh) and not report.unexpected
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fresh.items())
    # MSRA merges patches at the end of a stage, timm at the start of the next.
    assert torch.equal(model.layers[3].downsample.reduction.weight, msra.layers[2].downsample.reduction.weight)


def test_own_checkpoint_round_trips(tmp_path) -> None:
    model = randomise(student(0.7)).eval()
    torch.save(
        {"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()}, "pytorch-lightning_version": "2"},
        tmp_path / "last.ckpt",
    )
    again = student(0.7).eval()
    report = load_checkpoint(again, tmp_path / "last.ckpt")
    assert not report.missing and not report.unexpected
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_student_file_into_a_teacher_lists_the_pruning_keys(released) -> None:
    root, _, _ = released
    with pytest.raises(CheckpointMismatch, match=r"unexpected keys.*layers\.2\.(blocks\.\d\.fastmlp|score_predictor)"):
        create_teacher(NAME, checkpoint=root / "dynamicswin.pth", **TINY)


def test_checkpoint_of_another_size_is_a_clear_mismatch(tmp_path) -> None:
    deeper = DynamicSwinReference(**{**REFERENCE_ARGS, "depths": (1, 1, 6, 1)}, pruning_loc=None)
    torch.save({"model": deeper.state_dict()}, tmp_path / "deeper.pth")
    with pytest.raises(CheckpointMismatch, match="another Swin size"):
        create_teacher(NAME, checkpoint=tmp_path / "deeper.pth", **TINY)


# --- dense features for detection and segmentation ---------------------------------------------------


def test_dense_stage_maps_carry_the_pruned_stage_3_into_an_fpn(released) -> None:
    root, _, _ = released
    model = create_student(NAME, keep_ratio=0.7, checkpoint=root / "dynamicswin.pth", **TINY).eval()
    teacher = create_teacher(NAME, checkpoint=root / "swin_msra.pth", **TINY).eval()
    features = create_student(
        NAME, keep_ratio=0.7, checkpoint=root / "dynamicswin.pth", features_only=True, **TINY
    ).eval()
    x = images(2)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)  # NCHW, timm's convention
        listed = features(x)  # NHWC, as timm's features_only Swin
        dense = teacher.forward_intermediates(x, intermediates_only=True)
        pruned3, _ = model.layers[2].run_split(model.layers[2].downsample(maps[1].permute(0, 2, 3, 1)))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4)]
    for a, b in zip(maps, listed, strict=True):
        torch.testing.assert_close(a, b.permute(0, 3, 1, 2), rtol=0, atol=0)
    # Stages 1-2 are the backbone's own; stage 3 is the pruned computation (not the dense one).
    torch.testing.assert_close(maps[1], dense[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(maps[2], pruned3.permute(0, 3, 1, 2), rtol=0, atol=0)
    assert not torch.allclose(maps[2], dense[2], atol=1e-3)

    # An FPN as detection and segmentation frameworks build it, on the student's four maps.
    fpn = FeaturePyramidNetwork(features.feature_info.channels(), out_channels=24).eval()
    with torch.no_grad():
        levels = fpn(OrderedDict((str(i), m.permute(0, 3, 1, 2)) for i, m in enumerate(listed)))
        features.layers_2.keep_ratio = 0.9  # timm's wrapper names the stages layers_0 … layers_3
        other = fpn(OrderedDict((str(i), m.permute(0, 3, 1, 2)) for i, m in enumerate(features(x))))
    assert [tuple(v.shape) for v in levels.values()] == [(2, 24, 32, 32), (2, 24, 16, 16), (2, 24, 8, 8), (2, 24, 4, 4)]
    assert all(torch.isfinite(v).all() for v in levels.values())
    # A new keep ratio of the pruned stage reaches every level (through the FPN's top-down path).
    assert all(not torch.allclose(levels[k], other[k]) for k in levels)


def test_teacher_gives_logits_and_the_normed_final_map() -> None:
    teacher = randomise(create_teacher(NAME, **TINY)).eval()
    x = images(2)
    with torch.no_grad():
        logits, feature_map = forward_with_tokens(teacher, x)
        last = teacher.layers(teacher.patch_embed(x))
        expected = F.layer_norm(last, (128,), teacher.norm.weight, teacher.norm.bias, 1e-5)
    torch.testing.assert_close(logits, teacher(x))
    torch.testing.assert_close(feature_map, expected, rtol=1e-5, atol=1e-5)
    assert feature_map.shape == (2, 4, 4, 128)


# --- native resolution: the model decides the input -----------------------------------------------


def test_built_at_its_own_size_unless_told_and_the_digits_follow_it() -> None:
    assert data_config(create_teacher(NAME)).img_size == (224, 224)
    small = dict(num_classes=10, embed_dim=8, depths=(1, 1, 4, 1), num_heads=(1, 1, 1, 2))
    own = create_student("swin_digits", **small)
    assert own.mask_grid == (8, 8) and data_config(own).patch_size is None
    digits = ClutteredDigitsDataModule(patch_size=16, digit_scale=2)
    digits.follow(own)
    # The canvas is the model's 128 px; the mask keeps the DataModule's 16-px grid, the stage-3 map's.
    assert (digits.img_size, digits.patch_size, digits.num_patches) == (128, 16, own.num_locations)
    smaller = create_student("swin_digits", img_size=64, **small)
    assert smaller.mask_grid == (4, 4) and smaller(torch.randn(1, 1, 64, 64)).logits.shape == (1, 10)
    with pytest.raises(ValueError, match=r"img_size=256 but the model expects 128x128"):
        ClutteredDigitsDataModule(img_size=256, patch_size=16, digit_scale=2).follow(own)


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(keep_ratio=0.4), r"keeps 0 of 64 stage-3 locations at pruning stage 3 \(ratio ρ − 0.2·2"),
        (dict(keep_ratio=0.41), "keeps 0 of 64 stage-3 locations at pruning stage 3"),
        (dict(pruning_loc=(1, 2, 4)), r"must index blocks 0\.\.3 of stage 3 \(it has 4 blocks\)"),
        (dict(pruning_loc=(-1, 2)), "pruning acts inside stage 3 only"),
        (dict(img_size=65), r"not a multiple of swin_tiny_patch4_window7_224's patch size \(2, 2\): use e\.g\. 64"),
    ],
)
def test_bad_setup_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        student(**kwargs)


def test_setting_a_keep_ratio_whose_last_stage_keeps_nothing_raises_and_keeps_the_old_one() -> None:
    model = student(0.7)
    with pytest.raises(ValueError, match="keeps 0 of 64"):
        model.keep_ratio = 0.4
    assert model.keep_ratio == 0.7


@pytest.mark.parametrize(("name", "message"), [("swinv2_tiny_window8_256", "swin_tiny_patch4_window7_224")])
def test_backbones_it_cannot_convert_raise(name: str, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        create_student(name, num_classes=10, img_size=64, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 1, 1))


def test_a_converted_swin_is_not_converted_twice() -> None:
    with pytest.raises(TypeError, match="already a DynamicSwin"):
        DynamicSwin.from_swin(student())


# --- FLOPs at real sizes (fvcore, batch 1, 224²) -------------------------------------------------------

# Counted with fvcore on the reference model code (docs/reference.md, "FLOPs"): teacher, ρ 0.9, ρ 0.7.
REFERENCE_GFLOPS = {
    "swin_tiny_patch4_window7_224": (4.509, 4.266, 4.062),
    "swin_small_patch4_window7_224": (8.769, 7.534, 6.877),
    "swin_base_patch4_window7_224": (15.468, 13.272, 12.105),
}


@pytest.mark.parametrize("name", list(REFERENCE_GFLOPS))
def test_gflops_within_one_percent_of_the_reference(name: str) -> None:
    teacher_ref, at_09, at_07 = REFERENCE_GFLOPS[name]
    assert count_flops(create_teacher(name)) == pytest.approx(teacher_ref, rel=0.01)
    model = create_student(name, keep_ratio=0.7)
    assert count_flops(model) == pytest.approx(at_07, rel=0.01)
    if name == "swin_tiny_patch4_window7_224":
        model.keep_ratio = 0.9
        unfused = count_flops(model)
        assert unfused == pytest.approx(at_09, rel=0.01)
        # timm runs window attention through F.scaled_dot_product_attention (relative position bias
        # and shift mask as attn_mask) when fused attention is on; fvcore alone would skip it.
        attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
        assert len(attention) == 12
        for m in attention:
            m.fused_attn = True
        assert count_flops(model) == pytest.approx(unfused, rel=1e-9)
