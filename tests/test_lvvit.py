"""LV-ViT and DynamicViT-LV-ViT: sizes against the papers, the released key layout, the two heads, pruning."""

from __future__ import annotations

import pytest
import timm
import torch

from dynvit import count_flops, count_params, create_student, create_teacher
from dynvit.models import CheckpointMismatch, DynamicLVViT, LVViTOutput, StudentOutput, default_pruning_loc
from dynvit.models.mixtoken import TokenBox

TINY_LV = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
TINY_LOC = (1, 2, 3)


def released_keys(depth: int) -> set[str]:
    """The state-dict keys of a released LV-ViT checkpoint, written out from the documented layout."""
    keys = {"cls_token", "pos_embed", "norm.weight", "norm.bias", "head.weight", "head.bias"}
    keys |= {"aux_head.weight", "aux_head.bias", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    for i in (1, 2, 3):
        keys.add(f"patch_embed.conv{i}.weight")
        keys |= {
            f"patch_embed.bn{i}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        }
    for i in range(depth):
        b = f"blocks.{i}."
        # LV-ViT's qkv projection has no bias.
        keys |= {b + "attn.qkv.weight", b + "attn.proj.weight", b + "attn.proj.bias"}
        for layer in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {b + layer + ".weight", b + layer + ".bias"}
    return keys


def shapes_only(model: torch.nn.Module) -> torch.nn.Module:
    """Materialise a meta-device model with zeros: FLOPs depend on shapes only, and this skips the init."""
    model.to_empty(device="cpu")
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data.zero_()
    return model


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("name, params", [("lvvit_t", 8.5), ("lvvit_s", 26.2), ("lvvit_m", 55.8)])
def test_parameter_count_matches_paper(name: str, params: float) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert count_params(model) == pytest.approx(params, rel=0.01)


def test_lvvit_s_flops_match_paper() -> None:
    with torch.device("meta"):
        model = timm.create_model("lvvit_s")
    assert count_flops(shapes_only(model)) == pytest.approx(6.6, rel=0.03)


@pytest.mark.parametrize("keep_ratio, gflops", [(0.7, 4.6), (0.5, 3.7)])
def test_dynamic_lvvit_s_flops_match_paper(keep_ratio: float, gflops: float) -> None:
    with torch.device("meta"):
        student = create_student("lvvit_s", keep_ratio=keep_ratio)
    assert student.pruning_loc == (4, 8, 12)
    assert count_flops(shapes_only(student)) == pytest.approx(gflops, rel=0.03)


def test_default_pruning_locations_are_the_papers() -> None:
    assert default_pruning_loc("lvvit_s", 16) == (4, 8, 12)
    assert default_pruning_loc("lvvit_m", 20) == (5, 10, 15)


def test_stem_gives_one_token_per_patch(images: torch.Tensor) -> None:
    model = create_teacher("lvvit_s", **TINY_LV)
    assert model.patch_embed.grid_size == (8, 8) and model.patch_embed.num_patches == 64
    assert model.forward_features(images).shape == (2, 1 + 64, 32)
    with pytest.raises(ValueError, match="img_size"):
        model.forward_features(torch.randn(2, 3, 48, 48))


def test_intermediates_are_the_token_grid_as_maps(images: torch.Tensor) -> None:
    # timm's forward_intermediates asks the embedding for the grid; the conv stem used to lack the method.
    model = create_teacher("lvvit_s", **TINY_LV).eval()
    final, maps = model.forward_intermediates(images, indices=2, norm=True)
    assert [m.shape for m in maps] == [(2, 32, 8, 8)] * 2
    torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), final[:, 1:])
    assert model.patch_embed.feat_ratio() == 4


def test_eval_prediction_adds_half_the_best_patch(images: torch.Tensor) -> None:
    model = create_teacher("lvvit_s", **TINY_LV).eval()
    tokens = model.forward_features(images)
    cls_logits, dense = model.head(tokens[:, 0]), model.aux_head(tokens[:, 1:])
    torch.testing.assert_close(model(images), cls_logits + 0.5 * dense.max(dim=1).values)
    got_cls, got_dense = model.forward_dense(images)
    torch.testing.assert_close(got_cls, cls_logits)
    torch.testing.assert_close(got_dense, dense)


def test_train_mode_returns_class_and_dense_logits(images: torch.Tensor) -> None:
    out = create_teacher("lvvit_s", **TINY_LV).train()(images)
    assert isinstance(out, LVViTOutput)
    assert out.logits.shape == (2, 10) and out.aux_logits.shape == (2, 64, 10)


def test_residual_branches_are_divided_by_skip_lam() -> None:
    model = create_teacher("lvvit_s", **TINY_LV).eval()
    assert model.skip_lam == 2.0
    block, x = model.blocks[0], torch.randn(2, 65, 32)
    h = x + block.attn(block.norm1(x)) / 2.0
    torch.testing.assert_close(block(x), h + block.mlp(block.norm2(h)) / 2.0)


@pytest.mark.parametrize("student", [False, True])
def test_every_layernorm_has_the_official_eps(student: bool) -> None:
    """The official LV-ViT (and its DynamicViT student) builds every norm as ``nn.LayerNorm``: eps 1e-5."""
    model = (
        create_student("lvvit_s", pruning_loc=TINY_LOC, **TINY_LV) if student else create_teacher("lvvit_s", **TINY_LV)
    )
    norms = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    # norm1 and norm2 of every block, the final norm, and one per keep predictor in the student.
    assert len(norms) == 2 * 4 + 1 + (3 if student else 0)
    assert {name: m.eps for name, m in norms.items()} == dict.fromkeys(norms, 1e-5)


def test_dropout_and_class_token_follow_the_official_model() -> None:
    model = create_teacher("lvvit_s", drop_rate=0.1, **TINY_LV)
    # The official drop_rate drops after the position embedding, the attention projection and the MLP.
    assert model.pos_drop.p == 0.1 and model.head_drop.p == 0.0
    assert {m.p for b in model.blocks for m in (b.attn.proj_drop, b.mlp.drop1, b.mlp.drop2)} == {0.1}
    # Drawn like the position embedding (std 0.02), not timm's std 1e-6.
    assert 0.005 < model.cls_token.std().item() < 0.05
    with pytest.raises(ValueError, match="drop_rate"):
        create_teacher("lvvit_s", proj_drop_rate=0.1, **TINY_LV)


def test_state_dict_has_the_released_layout() -> None:
    model = create_teacher("lvvit_s", **TINY_LV)
    assert set(model.state_dict()) == released_keys(depth=4)


def test_released_checkpoint_loads_strictly_into_teacher_and_student(tmp_path, images: torch.Tensor) -> None:
    source = create_teacher("lvvit_s", **TINY_LV).eval()
    path = tmp_path / "lvvit_s.pth"
    torch.save({"model": source.state_dict()}, path)

    teacher = create_teacher("lvvit_s", checkpoint=path, **TINY_LV).eval()
    torch.testing.assert_close(teacher(images), source(images))
    # At keep ratio 1 the student gathers every token (reordered): the same prediction as the teacher.
    student = create_student("lvvit_s", keep_ratio=1.0, pruning_loc=TINY_LOC, checkpoint=path, **TINY_LV).eval()
    torch.testing.assert_close(student(images), source(images), rtol=1e-4, atol=1e-5)

    state = source.state_dict()
    del state["aux_head.weight"]
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointMismatch, match="aux_head.weight"):
        create_teacher("lvvit_s", checkpoint=path, **TINY_LV)


def test_mix_box_swaps_patch_tokens_right_after_the_stem() -> None:
    model = create_teacher("lvvit_s", **TINY_LV).train()
    images = torch.randn(3, 3, 32, 32)
    seen = []
    # pos_drop receives the tokens after the position embedding: remove it to recover the mixed patch tokens.
    model.pos_drop.register_forward_hook(lambda m, inp, out: seen.append(inp[0][:, 1:] - model.pos_embed[:, 1:]))
    box = TokenBox(top=2, left=1, height=3, width=4, grid_size=(8, 8))
    out = model(images, mix_box=box)
    assert isinstance(out, LVViTOutput)

    embedded = model.patch_embed(images).view(3, 8, 8, 32)
    expected = embedded.clone()
    expected[:, 2:5, 1:5] = embedded.flip(0)[:, 2:5, 1:5]
    torch.testing.assert_close(seen[0], expected.view(3, 64, 32), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="train"):
        model.eval()(images, mix_box=box)


def test_student_train_output_and_gradients_to_predictors(images: torch.Tensor) -> None:
    student = create_student("lvvit_s", keep_ratio=0.5, pruning_loc=TINY_LOC, **TINY_LV).train()
    assert isinstance(student, DynamicLVViT) and student.token_distill == "kl"
    out = student(images)
    assert isinstance(out, StudentOutput)
    assert out.logits.shape == (2, 10)
    assert out.tokens.shape == (2, 64, 10), "tokens are the dense aux predictions of every patch"
    assert out.mask.shape == (2, 64) and len(out.decisions) == 3
    (out.logits.logsumexp(-1).sum() + out.tokens.logsumexp(-1).sum()).backward()
    for predictor in student.score_predictor:
        assert predictor.out_conv[-2].weight.grad.abs().sum() > 0


def test_student_eval_keeps_the_expected_token_counts(images: torch.Tensor) -> None:
    student = create_student("lvvit_s", keep_ratio=0.5, pruning_loc=TINY_LOC, **TINY_LV).eval()
    logits, masks = student.predict_with_masks(images)
    assert [m.sum(dim=1).tolist() for m in masks] == [[32, 32], [16, 16], [8, 8]]
    torch.testing.assert_close(logits, student(images))


def test_dynamic_lvvit_converts_only_lvvit() -> None:
    deit = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2)
    with pytest.raises(TypeError, match="LVViT"):
        DynamicLVViT.from_vit(deit, keep_ratio=0.5, pruning_loc=TINY_LOC)
