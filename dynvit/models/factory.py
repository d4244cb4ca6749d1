"""Build teachers and students by name, the way ``timm.create_model`` does."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

from dynvit.models.checkpoint import load_checkpoint
from dynvit.models.dynamic_vit import (
    TokenPruning,
    final_patch_tokens,
    input_size,
    student_class,
    validate_pruning,
)

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


def _create_vit(
    name: str, pretrained: bool, num_classes: int, img_size: int | Sequence[int] | None, **timm_kwargs
) -> nn.Module:
    """``timm.create_model`` for a ViT-like ``name``, at its own resolution unless ``img_size`` is given."""
    _check_name(name)
    if img_size is not None:
        timm_kwargs["img_size"] = img_size
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **timm_kwargs)
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
    img_size: int | Sequence[int] | None = None,
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
        img_size: Input resolution, a multiple of the patch size. ``None`` (default) builds the model at
            its own pretrained resolution (timm's ``pretrained_cfg``: 384 for ``vit_small_patch16_384``).
            Another size gets another patch grid: timm resamples the position embedding of pretrained
            weights to it, and so does :func:`load_checkpoint` for a checkpoint of another grid.
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
    img_size: int | Sequence[int] | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    **timm_kwargs,
) -> TokenPruning:
    """A DynamicViT student on the timm ViT ``name`` with one keep predictor per pruning location.

    Class-token, distilled (DeiT), register-token, average-pooling and attention-pooling ViTs are
    supported (:func:`~dynvit.models.dynamic_vit.check_prunable` names what is not); LV-ViT and T2T-ViT
    get their own student classes.

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
    student = student_class(vit).from_vit(vit, keep_ratio=keep_ratio, pruning_loc=pruning_loc)
    if checkpoint is not None:
        load_checkpoint(student, checkpoint, offer_reset_head=False)
    return student


def forward_with_tokens(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and what token distillation compares, from an unpruned teacher.

    For a ViT: the final patch tokens (B, N, C) after the final norm (``fc_norm`` applied per token
    where the model normalises after pooling, see :func:`~dynvit.models.dynamic_vit.final_patch_tokens`).
    For backbones with dense per-token predictions (LV-ViT's ``forward_dense``): those predictions
    (B, N, num_classes).
    """
    if hasattr(model, "forward_dense"):
        return model.forward_dense(x)
    features = model.forward_features(x)
    return model.forward_head(features), final_patch_tokens(model, features)


def _check_token_model(model: nn.Module, name: str, img_size: int | Sequence[int] | None) -> None:
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(model, "num_prefix_tokens"):
        raise TypeError(_NOT_A_VIT.format(name=name))
    if img_size is None:
        return
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    patch = tuple(patch_embed.patch_size)
    if any(s % p for s, p in zip(size, patch, strict=True)):
        raise ValueError(
            f"img_size {size} is not a multiple of {name}'s patch size {patch}: use e.g. {size[0] // patch[0] * patch[0]}"
        )


class DataConfig(NamedTuple):
    """What data must look like for a built model; DataModules follow it (``follow(model)``).

    Attributes:
        img_size: (H, W) the model was built for: its patch embedding's (not the pretrained config's: they
            differ when a ViT was built at another ``img_size``), else its ``pretrained_cfg``'s.
        in_chans: Image channels.
        patch_size: (h, w) of one patch token; None for a model without a patch embedding.
        mean, std, interpolation, crop_pct: Preprocessing of the weights the model names, from timm's
            ``pretrained_cfg`` (timm's ImageNet defaults for a model without one).
    """

    img_size: tuple[int, int]
    in_chans: int
    patch_size: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float


def data_config(model: nn.Module) -> DataConfig:
    """The :class:`DataConfig` of a built timm model: a ViT-like one (with a ``patch_embed``), or any
    other with a ``pretrained_cfg``."""
    cfg = resolve_model_data_config(model)
    embed = getattr(model, "patch_embed", None)
    in_chans, height, width = input_size(model) if embed is not None else cfg["input_size"]
    if embed is None:  # the built stem's channels, which in_chans= may have changed from the config's
        in_chans = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), in_chans)
    return DataConfig(
        img_size=(height, width),
        in_chans=in_chans,
        patch_size=tuple(embed.patch_size) if embed is not None else None,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg["interpolation"],
        crop_pct=cfg["crop_pct"],
    )
