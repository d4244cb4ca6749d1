"""DVT as a registered method: the cascade built from one pretrained ViT, its knob and the benchmark row's exit shares."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from dynvit import create_teacher, methods
from dynvit.models.dvt import DVT, build_dvt, default_patches
from dynvit.run.report import ResultRow, format_table, records

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


@pytest.fixture
def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    vit = create_teacher("deit_tiny_patch16_224", **TINY).eval()
    with torch.no_grad():  # off its init, so zero biases and unit norms hide nothing
        for p in vit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vit


def test_default_patches_are_the_released_deit_s_and_the_digits_cascades():
    # The released DeiT-S cascade (7x7, 10x10, 14x14 grids of 224 px): patch 32; 23 padded by 3; 16.
    assert default_patches(224, 14) == [(32, 0), (23, 3), (16, 0)]
    # 4x4, 6x6, 8x8 grids of a 64-px canvas, from a ViT on its 8x8 grid.
    assert default_patches(64, 8) == [(16, 0), (11, 1), (8, 0)]


def test_every_exit_starts_from_the_teachers_weights(teacher):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = teacher(x)
    source = copy.deepcopy(teacher)
    plain = build_dvt(copy.deepcopy(teacher), feature_reuse=False, relation_reuse=False).eval()
    assert plain.grids == [2, 3, 4] and plain.tokens_per_exit == [5, 10, 17]
    # Without reuse the finest exit is the teacher itself.
    torch.testing.assert_close(plain.forward_exits(x)[-1], expected)
    for backbone, patch, padding, grid in zip(plain.exits, (16, 11, 8), (0, 1, 0), (2, 3, 4), strict=True):
        proj = backbone.patch_embed.proj
        assert proj.kernel_size == (patch, patch) and proj.padding == (padding, padding)
        torch.testing.assert_close(proj.weight, resample_patch_embed(source.patch_embed.proj.weight, [patch, patch]))
        torch.testing.assert_close(
            backbone.pos_embed, resample_abs_pos_embed(source.pos_embed, [grid, grid], [4, 4], num_prefix_tokens=1)
        )
        torch.testing.assert_close(backbone.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
        torch.testing.assert_close(backbone.head.weight, source.head.weight)

    # With feature reuse, exits 2 and 3's widened MLPs are the teacher's on its own channels, zero on the reused.
    dvt = build_dvt(copy.deepcopy(teacher))
    dim = TINY["embed_dim"]
    for backbone in dvt.exits[1:]:
        for block, original in zip(backbone.blocks, source.blocks, strict=True):
            assert block.mlp.fc1.in_features == dim + 48
            torch.testing.assert_close(block.mlp.fc1.weight[:, :dim], original.mlp.fc1.weight)
            assert not block.mlp.fc1.weight[:, dim:].any()
            torch.testing.assert_close(block.mlp.fc2.weight, original.mlp.fc2.weight)
            torch.testing.assert_close(block.norm2.weight[:dim], original.norm2.weight)
            assert block.norm2.weight[dim:].eq(1).all() and not block.norm2.bias[dim:].any()


def test_the_knob_is_one_threshold_for_exits_1_and_2(teacher):
    method = methods.get("dvt")
    dvt = method.build(copy.deepcopy(teacher), threshold=0.4)
    assert isinstance(dvt, DVT) and methods.of(dvt) is method and dvt.thresholds.tolist() == pytest.approx([0.4, 0.4])
    assert method.apply(dvt, threshold=0.7) is dvt and dvt.thresholds.tolist() == pytest.approx([0.7, 0.7])
    assert method.apply(dvt) is dvt and dvt.thresholds is None  # no threshold: every exit runs
    x = [torch.randn(8, 3, 32, 32)]
    costs = dvt.exit_gflops()
    assert dvt.mean_exit_cost(x) == pytest.approx((costs[-1], 16.0))
    assert dvt.leaving_shares(x) == [0.0, 0.0, 1.0]
    method.apply(dvt, threshold=1 / TINY["num_classes"])  # every top softmax probability reaches 1 / classes
    assert dvt.mean_exit_cost(x) == pytest.approx((costs[0], 4.0)) and dvt.leaving_shares(x) == [1.0, 0.0, 0.0]


def test_bad_settings_are_refused_clearly(teacher):
    with pytest.raises(ValueError, match=r"threshold is a confidence in \(0, 1\]"):
        build_dvt(copy.deepcopy(teacher), threshold=1.5)
    pooled = create_teacher("deit_tiny_patch16_224", class_token=False, global_pool="avg", **TINY)
    with pytest.raises(TypeError, match="no class token.*which need none"):
        build_dvt(pooled)
    coarse = create_teacher("deit_tiny_patch16_224", **{**TINY, "patch_size": 16})  # a 2x2 grid
    with pytest.raises(ValueError, match="too coarse for DVT.*give patches="):
        build_dvt(coarse)
    with pytest.raises(ValueError, match="each of the 3 exits"):
        build_dvt(copy.deepcopy(teacher), patches=((16, 0), (8, 0)))


def test_benchmark_says_how_a_trained_cascade_is_measured(teacher):
    from dynvit.reducers.matching import student_at

    # It said "DVT has no threshold to vary" of a cascade whose thresholds were set.
    cascade = build_dvt(teacher, threshold=0.5)
    with pytest.raises(TypeError, match=r"trained dvt model.*mean_exit_cost.*--methods dvt"):
        student_at(cascade)


def test_exit_shares_survive_the_flat_record_and_show_in_the_table():
    row = ResultRow("dvt (at init)", 0.7, 1.0, 2.0, param="T=0.5", exit_shares=[0.625, 0.25, 0.125])
    teacher = ResultRow("teacher", 1.0, 2.0, 2.0)
    flat = records([teacher, row])
    assert (flat[1]["exit1"], flat[1]["exit2"], flat[1]["exit3"]) == (0.625, 0.25, 0.125)
    assert flat[0]["exit1"] is None
    assert [ResultRow.from_flat(r) for r in flat] == [teacher, row]
    header, _, *cells = [
        [c.strip() for c in line.strip("|").split("|")] for line in format_table([teacher, row]).splitlines()
    ]
    column = header.index("% left at exit 1/2/3")
    assert cells[0][column] == "–" and cells[1][column] == "62/25/12"
