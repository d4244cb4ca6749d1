"""T2T-ViT and DynamicViT-T2T-ViT: sizes against the paper, the T2T layers' maths, the released key layout, pruning."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from dynvit import count_flops, count_params, create_student, create_teacher
from dynvit.models import CheckpointMismatch, DynamicT2TViT, StudentOutput, default_pruning_loc
from dynvit.models.t2t_vit import TokenPerformer, TokensToToken, TokenTransformer

TINY_T2T = dict(img_size=64, embed_dim=32, depth=4, num_heads=2, token_dim=16, num_classes=10)
TINY_LOC = (1, 2, 3)


def released_keys(depth: int, tokens_type: str) -> set[str]:
    """The state-dict keys of a released T2T-ViT checkpoint, written out from the documented layout."""
    keys = {"cls_token", "pos_embed", "norm.weight", "norm.bias", "head.weight", "head.bias"}
    keys |= {"tokens_to_token.project.weight", "tokens_to_token.project.bias"}
    if tokens_type == "performer":
        layer = ["kqv.weight", "kqv.bias", "proj.weight", "proj.bias", "w"]
        layer += [f"{m}.{p}" for m in ("norm1", "norm2", "mlp.0", "mlp.2") for p in ("weight", "bias")]
    else:
        layer = ["attn.qkv.weight", "attn.proj.weight", "attn.proj.bias"]
        layer += [f"{m}.{p}" for m in ("norm1", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")]
    keys |= {f"tokens_to_token.attention{i}.{k}" for i in (1, 2) for k in layer}
    for i in range(depth):
        b = f"blocks.{i}."
        keys |= {b + "attn.qkv.weight", b + "attn.proj.weight", b + "attn.proj.bias"}
        keys |= {b + f"{m}.{p}" for m in ("norm1", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}
    return keys


def shapes_only(model: torch.nn.Module) -> torch.nn.Module:
    """Materialise a meta-device model with zeros: FLOPs depend on shapes only, and this skips the init."""
    model.to_empty(device="cpu")
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data.zero_()
    return model


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("name, params", [("t2t_vit_7", 4.3), ("t2t_vit_14", 21.5), ("t2t_vit_t_14", 21.5)])
def test_parameter_count_matches_paper(name: str, params: float) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert count_params(model) == pytest.approx(params, rel=0.01)


def test_t2t_vit_14_flops_match_paper() -> None:
    with torch.device("meta"):
        model = timm.create_model("t2t_vit_14")
    assert count_flops(shapes_only(model)) == pytest.approx(4.8, rel=0.03)


def test_default_pruning_locations() -> None:
    assert default_pruning_loc("t2t_vit_14", 14) == (3, 6, 9)
    assert default_pruning_loc("t2t_vit_7", 7) == (2, 4, 6)


def test_tokens_to_token_gives_196_tokens_at_224() -> None:
    t2t = TokensToToken(img_size=224, embed_dim=48, token_dim=8)
    assert t2t.split_sizes == [(56, 56), (28, 28), (14, 14)]
    assert t2t.patch_size == (16, 16) and t2t.num_patches == 196
    assert t2t(torch.randn(1, 3, 224, 224)).shape == (1, 196, 48)
    with pytest.raises(ValueError, match="multiple of 16"):
        TokensToToken(img_size=200)
    with pytest.raises(ValueError, match="tokens_type"):
        TokensToToken(tokens_type="conv")


def test_performer_is_normalised_random_feature_attention() -> None:
    layer = TokenPerformer(dim=27, width=16).eval()
    x = torch.randn(2, 10, 27)
    k, q, v = layer.kqv(layer.norm1(x)).split(16, dim=-1)
    m = layer.w.shape[0]

    def phi(t: torch.Tensor) -> torch.Tensor:
        return torch.exp(t @ layer.w.T - (t * t).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    kernel = phi(q) @ phi(k).transpose(1, 2)  # (B, T, T): the quadratic form linear attention avoids
    y = v + layer.proj((kernel @ v) / kernel.sum(-1, keepdim=True))
    torch.testing.assert_close(layer(x), y + layer.mlp(layer.norm2(y)), rtol=1e-4, atol=1e-5)
    assert not layer.w.requires_grad and m == 8


def test_token_transformer_is_softmax_attention_scaled_by_input_width() -> None:
    layer = TokenTransformer(dim=27, width=16).eval()
    x = torch.randn(2, 10, 27)
    q, k, v = layer.attn.qkv(layer.norm1(x)).split(16, dim=-1)
    y = v + layer.attn.proj(((q @ k.transpose(1, 2)) * 27**-0.5).softmax(-1) @ v)
    torch.testing.assert_close(layer(x), y + layer.mlp(layer.norm2(y)), rtol=1e-4, atol=1e-5)


def test_position_embedding_is_fixed_sinusoid() -> None:
    model = create_teacher("t2t_vit_14", **TINY_T2T)
    pe = model.pos_embed
    assert pe.shape == (1, 17, 32) and not pe.requires_grad and "pos_embed" in model.state_dict()
    for pos, i in [(0, 0), (3, 4), (16, 10)]:
        angle = pos / 10000 ** (i / 32)  # channels 2j and 2j+1 share the frequency 10000^(-2j/d)
        assert pe[0, pos, i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert pe[0, pos, i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


@pytest.mark.parametrize("name", ["t2t_vit_14", "t2t_vit_t_14"])
def test_every_layernorm_has_the_official_eps(name: str) -> None:
    """The official T2T-ViT builds every norm (T2T layers, blocks, final) as ``nn.LayerNorm``: eps 1e-5."""
    model = create_student(name, pruning_loc=TINY_LOC, **TINY_T2T)
    norms = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    # Two per T2T layer, two per block, the final norm, one per keep predictor.
    assert len(norms) == 2 * 2 + 2 * 4 + 1 + 3
    assert {name: m.eps for name, m in norms.items()} == dict.fromkeys(norms, 1e-5)


def test_backbone_attention_uses_the_released_scale() -> None:
    # The released weights were trained with logits scaled by embed_dim ** -0.5, not head_dim ** -0.5.
    model = create_teacher("t2t_vit_14", **TINY_T2T).eval()
    attn, x = model.blocks[0].attn, torch.randn(2, 17, 32)
    q, k, v = attn.qkv(x).view(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    y = ((q @ k.transpose(-2, -1)) * 32**-0.5).softmax(-1) @ v
    torch.testing.assert_close(attn(x), attn.proj(y.transpose(1, 2).reshape(2, 17, 32)), rtol=1e-4, atol=1e-5)


def test_forward_shapes(images: torch.Tensor) -> None:
    model = create_teacher("t2t_vit_14", **TINY_T2T).eval()
    assert model.patch_embed is model.tokens_to_token and model.patch_embed.grid_size == (4, 4)
    assert model.forward_features(images).shape == (2, 17, 32)
    assert model(images).shape == (2, 10)
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("name, tokens_type", [("t2t_vit_14", "performer"), ("t2t_vit_t_14", "transformer")])
def test_state_dict_has_the_released_layout(name: str, tokens_type: str) -> None:
    model = create_teacher(name, **TINY_T2T)
    assert set(model.state_dict()) == released_keys(depth=4, tokens_type=tokens_type)


def test_released_checkpoint_loads_strictly_into_teacher_and_student(tmp_path, images: torch.Tensor) -> None:
    source = create_teacher("t2t_vit_14", **TINY_T2T).eval()
    path = tmp_path / "t2t_vit_14.pth.tar"
    # The released T2T-ViT files are timm training checkpoints: the weights sit under "state_dict".
    torch.save({"epoch": 309, "state_dict": source.state_dict()}, path)
    teacher = create_teacher("t2t_vit_14", checkpoint=path, **TINY_T2T).eval()
    torch.testing.assert_close(teacher(images), source(images))
    # At keep ratio 1 the student gathers every token (reordered): the same prediction as the teacher.
    student = create_student("t2t_vit_14", keep_ratio=1.0, pruning_loc=TINY_LOC, checkpoint=path, **TINY_T2T).eval()
    torch.testing.assert_close(student(images), source(images), rtol=1e-4, atol=1e-5)

    with pytest.raises(CheckpointMismatch, match="tokens_to_token"):
        create_teacher("t2t_vit_t_14", checkpoint=path, **TINY_T2T)


def test_student_train_output(images: torch.Tensor) -> None:
    student = create_student("t2t_vit_14", keep_ratio=0.5, pruning_loc=TINY_LOC, **TINY_T2T).train()
    assert isinstance(student, DynamicT2TViT)
    out = student(images)
    assert isinstance(out, StudentOutput)
    assert out.logits.shape == (2, 10) and out.tokens.shape == (2, 16, 32)
    assert out.mask.shape == (2, 16) and len(out.decisions) == 3
    (out.logits.logsumexp(-1).sum() + out.tokens.pow(2).sum()).backward()
    for predictor in student.score_predictor:
        assert predictor.out_conv[-2].weight.grad.abs().sum() > 0


def test_student_eval_prunes_the_t2t_tokens(images: torch.Tensor) -> None:
    student = create_student("t2t_vit_14", keep_ratio=0.5, pruning_loc=TINY_LOC, **TINY_T2T).eval()
    logits, masks = student.predict_with_masks(images)
    assert [m.sum(dim=1).tolist() for m in masks] == [[8, 8], [4, 4], [2, 2]]
    torch.testing.assert_close(logits, student(images))


def test_dynamic_t2t_converts_only_t2t() -> None:
    deit = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2)
    with pytest.raises(TypeError, match="T2TViT"):
        DynamicT2TViT.from_vit(deit, keep_ratio=0.5, pruning_loc=TINY_LOC)
