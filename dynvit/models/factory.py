"""Build teachers and students by name, the way ``timm.create_model`` does."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from dynvit.models.checkpoint import load_checkpoint
from dynvit.models.dynamic_vit import DynamicViT, validate_pruning

# Where each backbone family prunes by default, as in the papers: 12-block DeiT/ViT before
# blocks 3, 6, 9 (a quarter of the depth each); other depths get the same proportions.
DEFAULT_PRUNING_LOC: dict[str, tuple[int, ...]] = {}

_NOT_A_VIT = "{name} is not a vision transformer with patch tokens; pick a ViT such as deit_small_patch16_224"


def default_pruning_loc(name: str, depth: int) -> tuple[int, ...]:
    """Registered locations for ``name``, else before blocks depth/4, depth/2 and 3·depth/4."""
    if name in DEFAULT_PRUNING_LOC:
        return DEFAULT_PRUNING_LOC[name]
    return tuple(sorted({max(1, round(depth * f)) for f in (0.25, 0.5, 0.75)}))


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('*vit*')"
        raise ValueError(f"unknown model name {name!r}{hint}")


def _create_vit(name: str, pretrained: bool, num_classes: int, img_size: int, **timm_kwargs) -> nn.Module:
    """``timm.create_model`` for a ViT-like ``name``; a model that takes no ``img_size`` is not one."""
    _check_name(name)
    try:
        model = timm.create_model(
            name, pretrained=pretrained, num_classes=num_classes, img_size=img_size, **timm_kwargs
        )
    except TypeError as e:
        # CNNs such as resnet18 reject img_size: say what to pick instead of timm's bare TypeError.
        if "img_size" not in str(e):
            raise
        raise TypeError(_NOT_A_VIT.format(name=name)) from e
    _check_token_model(model, name, img_size)
    return model


def create_teacher(
    name: str,
    num_classes: int = 1000,
    img_size: int = 224,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    **timm_kwargs,
) -> nn.Module:
    """The timm ViT called ``name`` (unpruned), optionally loaded from ``checkpoint``.

    Its final patch tokens (after the final norm) come beside the logits from
    :func:`forward_with_tokens`, which is what token distillation compares against.

    Args:
        name: A timm model name (``deit_small_patch16_224``, ``vit_base_patch16_224``, …) or one this
            toolkit registers with timm.
        num_classes: Size of the classifier head.
        img_size: Input resolution; must be a multiple of the patch size.
        checkpoint: A DeiT/timm/DynamicViT/Lightning checkpoint to load strictly (see :func:`load_checkpoint`).
        pretrained: Fetch timm's pretrained weights (needs access to the model hub).
        **timm_kwargs: Passed to ``timm.create_model``, e.g. ``depth=4, embed_dim=64, num_heads=2``.
    """
    model = _create_vit(name, pretrained, num_classes, img_size, **timm_kwargs)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, offer_reset_head=False)
    return model


def create_student(
    name: str,
    keep_ratio: float = 0.7,
    pruning_loc: Sequence[int] | None = None,
    num_classes: int = 1000,
    img_size: int = 224,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    **timm_kwargs,
) -> DynamicViT:
    """A DynamicViT student on the timm ViT ``name`` with one keep predictor per pruning location.

    Args:
        keep_ratio: Base keep ratio ρ in (0, 1]; stage s keeps ``int(N * ρ**s)`` of N patch tokens.
        pruning_loc: Block indices before which tokens are scored and pruned; ``None`` (default) picks the
            backbone's default (``DEFAULT_PRUNING_LOC``, else a quarter of the depth apart).
        checkpoint: A released DynamicViT checkpoint, a teacher checkpoint (predictors keep their
            fresh init) or a Lightning ``.ckpt`` of this toolkit.
        Other arguments as :func:`create_teacher`.
    """
    vit = _create_vit(name, pretrained, num_classes, img_size, **timm_kwargs)
    if pruning_loc is None:
        pruning_loc = default_pruning_loc(name, len(vit.blocks))
    validate_pruning(keep_ratio, pruning_loc, len(vit.blocks), vit.patch_embed.num_patches)
    from_vit = getattr(type(vit), "dynamic_class", DynamicViT).from_vit
    student = from_vit(vit, keep_ratio=keep_ratio, pruning_loc=pruning_loc)
    if checkpoint is not None:
        load_checkpoint(student, checkpoint, offer_reset_head=False)
    return student


def forward_with_tokens(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and what token distillation compares, from an unpruned teacher.

    For a ViT: the final patch tokens (B, N, C) after the final norm. For backbones with dense
    per-token predictions (LV-ViT's ``forward_dense``): those predictions (B, N, num_classes).
    """
    if hasattr(model, "forward_dense"):
        return model.forward_dense(x)
    features = model.forward_features(x)
    return model.forward_head(features), features[:, model.num_prefix_tokens :]


def _check_token_model(model: nn.Module, name: str, img_size: int | Sequence[int]) -> None:
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(model, "num_prefix_tokens"):
        raise TypeError(_NOT_A_VIT.format(name=name))
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    patch = tuple(patch_embed.patch_size)
    if any(s % p for s, p in zip(size, patch, strict=True)):
        raise ValueError(
            f"img_size {size} is not a multiple of {name}'s patch size {patch}: use e.g. {size[0] // patch[0] * patch[0]}"
        )
