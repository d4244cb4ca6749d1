"""Build teachers and students by name, the way ``timm.create_model`` does.

ViT-like names (any timm ``VisionTransformer``, and the seed backbones registered here) build
DynamicViT students. Other backbone families register a :class:`Family` (ConvNeXt in
``dynamic_convnext``): how to build their timm models and convert them to students; names of the
timm modules a family lists are dispatched to it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from timm.data import resolve_model_data_config
from timm.layers import to_2tuple
from timm.models import FeatureListNet
from torch import nn

from dynvit.methods import Knob, Method, locations, register
from dynvit.models.checkpoint import load_checkpoint
from dynvit.models.contract import DensePredicting
from dynvit.models.dynamic_vit import (
    TokenPruning,
    final_patch_tokens,
    input_size,
    student_class,
    validate_pruning,
)
from dynvit.models.spatial_pruning import SpatialPruningStudent

# Where each backbone family prunes by default, as in the papers: 12-block DeiT/ViT before
# blocks 3, 6, 9 (a quarter of the depth each); other depths get the same proportions.
DEFAULT_PRUNING_LOC: dict[str, tuple[int, ...]] = {}

_NOT_A_VIT = (
    "{name} is not a vision transformer with patch tokens; pick a ViT such as deit_small_patch16_224 "
    "(or a hierarchical backbone: {families})"
)


@dataclass(frozen=True)
class Family:
    """How the factory builds teachers and students of one kind of non-ViT timm backbone.

    Attributes:
        backbone: The timm class the family's models are instances of.
        modules: Names of the timm modules that register its models (``timm.models.is_model_in_modules``),
            e.g. ``("convnext",)``; a module of this toolkit that registers more adds its own name.
        build: ``(name, pretrained, num_classes, img_size, **timm_kwargs) -> model``: the timm model, with
            ``img_size`` recorded in its ``pretrained_cfg["input_size"]`` when the class takes no size.
        to_student: ``(model, keep_ratio, pruning_loc or None) -> student``, converting in place (``None``
            picks the family's default locations for that model).
        distilled_features: ``(teacher, images) -> (logits, features)``: what the student's features are
            distilled towards (the final feature map after the final norm).
        examples: Names to suggest in error messages.
    """

    backbone: type[nn.Module]
    modules: tuple[str, ...]
    build: Callable[..., nn.Module]
    to_student: Callable[[nn.Module, float, Sequence[int] | None], nn.Module]
    distilled_features: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    examples: tuple[str, ...] = ()


FAMILIES: list[Family] = []


def register_family(family: Family) -> Family:
    """Make :func:`create_teacher`/:func:`create_student` build the models of ``family``'s timm modules."""
    FAMILIES.append(family)
    return family


def family_of(name_or_model: str | nn.Module) -> Family | None:
    """The registered family a model name (by its timm module) or a built model (by class) belongs to;
    None for ViT-like models."""
    if isinstance(name_or_model, nn.Module):
        return next((f for f in FAMILIES if isinstance(name_or_model, f.backbone)), None)
    return next((f for f in FAMILIES if timm.models.is_model_in_modules(name_or_model, f.modules)), None)


def _feature_extractor(model: nn.Module, out_indices: Sequence[int] | None) -> nn.Module:
    """timm's ``features_only`` wrapper around a built (possibly pruned) model: a list of stage maps."""
    indices = tuple(range(len(model.feature_info))) if out_indices is None else tuple(out_indices)
    return FeatureListNet(
        model, out_indices=indices, flatten_sequential=True, output_fmt=getattr(model, "output_fmt", "NCHW")
    )


def default_pruning_loc(name: str, depth: int) -> tuple[int, ...]:
    """Registered locations for ``name``, else before blocks depth/4, depth/2 and 3·depth/4."""
    if name in DEFAULT_PRUNING_LOC:
        return DEFAULT_PRUNING_LOC[name]
    return tuple(sorted({max(1, round(depth * f)) for f in (0.25, 0.5, 0.75)}))


def default_stage_blocks(vit: nn.Module) -> tuple[int, ...]:
    """:func:`default_pruning_loc` of a built ViT (by its ``pretrained_cfg`` architecture): where DynamicViT,
    and methods placed like it, reduce unless told otherwise (3, 6, 9 on a 12-block ViT)."""
    architecture = (getattr(vit, "pretrained_cfg", None) or {}).get("architecture", "")
    return default_pruning_loc(architecture, len(vit.blocks))


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('*vit*')"
        raise ValueError(f"unknown model name {name!r}{hint}")


def _not_a_vit(name: str) -> str:
    families = ", ".join(e for f in FAMILIES for e in f.examples) or "none registered"
    return _NOT_A_VIT.format(name=name, families=families)


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
        raise TypeError(_not_a_vit(name)) from e
    _check_token_model(model, name, img_size)
    return model


def _split_feature_args(name: str, family: Family | None, timm_kwargs: dict) -> tuple[bool, Sequence[int] | None]:
    """Take timm's ``features_only``/``out_indices`` out of the kwargs: they wrap the finished model."""
    features_only, out_indices = bool(timm_kwargs.pop("features_only", False)), timm_kwargs.pop("out_indices", None)
    if (features_only or out_indices is not None) and family is None:
        raise ValueError(f"features_only/out_indices are offered for hierarchical backbones, not for the ViT {name}")
    return features_only, out_indices


def create_teacher(
    name: str,
    num_classes: int = 1000,
    img_size: int | Sequence[int] | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    **timm_kwargs,
) -> nn.Module:
    """The timm model called ``name`` (unpruned), optionally loaded from ``checkpoint``.

    Its final patch tokens (after the final norm; for hierarchical backbones the final feature map)
    come beside the logits from :func:`forward_with_tokens`, which is what distillation compares against.

    Args:
        name: A timm ViT name (``deit_small_patch16_224``, ``vit_base_patch16_224``, …), a name of a
            registered :class:`Family` (``convnext_tiny``, …) or one this toolkit registers with timm.
        num_classes: Size of the classifier head.
        img_size: Input resolution, a multiple of the patch size (of the total stride for hierarchical
            backbones). ``None`` (default) builds the model at its own pretrained resolution (timm's
            ``pretrained_cfg``: 384 for ``vit_small_patch16_384``). Another size gets another patch grid:
            timm resamples the position embedding of pretrained weights to it, and so does
            :func:`load_checkpoint` for a checkpoint of another grid.
        checkpoint: A DeiT/timm/DynamicViT/Lightning checkpoint, or the original layout of a registered
            family (e.g. FB ConvNeXt), to load strictly (see :func:`load_checkpoint`).
        pretrained: Fetch timm's pretrained weights (needs access to the model hub).
        **timm_kwargs: Passed to ``timm.create_model``, e.g. ``depth=4, embed_dim=64, num_heads=2``.
            ``features_only=True`` (with ``out_indices``) returns timm's ``FeatureListNet`` of the stage
            maps of a hierarchical backbone, after the checkpoint is loaded.
    """
    family = family_of(name)
    features_only, out_indices = _split_feature_args(name, family, timm_kwargs)
    if family is None:
        model = _create_vit(name, pretrained, num_classes, img_size, **timm_kwargs)
    else:
        _check_name(name)
        model = family.build(name, pretrained, num_classes, img_size, **timm_kwargs)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, offer_reset_head=False)
    return _feature_extractor(model, out_indices) if features_only else model


def create_student(
    name: str,
    keep_ratio: float = 0.7,
    pruning_loc: Sequence[int] | None = None,
    num_classes: int = 1000,
    img_size: int | Sequence[int] | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    **timm_kwargs,
) -> nn.Module:
    """A DynamicViT student on the timm ViT ``name`` with one keep predictor per pruning location, or
    the dynamic spatial sparsification student of a hierarchical backbone (``convnext_tiny``, …).

    Class-token, distilled (DeiT), register-token, average-pooling and attention-pooling ViTs are
    supported (:func:`~dynvit.models.dynamic_vit.check_prunable` names what is not); LV-ViT and T2T-ViT
    get their own student classes.

    Args:
        keep_ratio: Base keep ratio ρ in (0, 1]. ViTs: stage s keeps ``int(N * ρ**s)`` of N patch tokens.
            Hierarchical backbones: pruning stage s runs the slow path on ``int(N * (ρ - 0.2·s))`` of
            the N stage-3 locations.
        pruning_loc: Block indices before which tokens are scored and pruned (for hierarchical
            backbones: blocks of stage 3); ``None`` (default) picks the backbone's default
            (``DEFAULT_PRUNING_LOC``, else a quarter of the depth apart; the family's for hierarchical ones).
        checkpoint: A released DynamicViT/DynamicCNN checkpoint, a teacher checkpoint (predictors and
            fast paths keep their fresh init) or a Lightning ``.ckpt`` of this toolkit.
        Other arguments as :func:`create_teacher` (``features_only`` included).
    """
    family = family_of(name)
    features_only, out_indices = _split_feature_args(name, family, timm_kwargs)
    if family is not None:
        _check_name(name)
        model = family.build(name, pretrained, num_classes, img_size, **timm_kwargs)
        student = family.to_student(model, keep_ratio, pruning_loc)
        if checkpoint is not None:
            load_checkpoint(student, checkpoint, offer_reset_head=False)
        return _feature_extractor(student, out_indices) if features_only else student
    vit = _create_vit(name, pretrained, num_classes, img_size, **timm_kwargs)
    if pruning_loc is None:
        pruning_loc = default_pruning_loc(name, len(vit.blocks))
    student = to_student(vit, keep_ratio=keep_ratio, pruning_loc=pruning_loc)
    if checkpoint is not None:
        load_checkpoint(student, checkpoint, offer_reset_head=False)
    return student


def to_student(vit: nn.Module, keep_ratio: float = 0.7, pruning_loc: Sequence[int] | None = None) -> TokenPruning:
    """A built ViT (pretrained or not) turned into its DynamicViT student in place, weights kept and the keep
    predictors at their init: the registry's builder of ``dynamicvit``.

    Args:
        pruning_loc: Blocks before which tokens are pruned; ``None`` picks the backbone's default
            (:func:`default_pruning_loc` of its ``pretrained_cfg`` architecture).
    """
    if pruning_loc is None:
        pruning_loc = default_stage_blocks(vit)
    validate_pruning(keep_ratio, pruning_loc, len(vit.blocks), vit.patch_embed.num_patches)
    return student_class(vit).from_vit(vit, keep_ratio=keep_ratio, pruning_loc=pruning_loc)


def set_keep_ratio(student: nn.Module, keep_ratio: float) -> nn.Module:
    """A trained student at another keep ratio ρ (its predictors unchanged), in place.

    Raises:
        TypeError: ``student`` is no pruning student (a DynamicViT, or a hierarchical family's).
        ValueError: ρ outside (0, 1], or keeping no token at some stage of this model.
    """
    if not isinstance(student, TokenPruning | SpatialPruningStudent):
        raise TypeError(
            f"{type(student).__name__} has no keep_ratio to vary: it needs a pruned student "
            "(e.g. DynamicViTModule's net)"
        )
    student.keep_ratio = keep_ratio
    return student


def forward_with_tokens(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and what token distillation compares, from an unpruned teacher.

    For a ViT: the final patch tokens (B, N, C) after the final norm (``fc_norm`` applied per token
    where the model normalises after pooling, see :func:`~dynvit.models.dynamic_vit.final_patch_tokens`).
    For backbones with dense per-token predictions (LV-ViT's ``forward_dense``): those predictions
    (B, N, num_classes). For a registered hierarchical family: the final feature map after the final norm.
    """
    family = family_of(model)
    if family is not None:
        return family.distilled_features(model, x)
    if isinstance(model, DensePredicting):
        return model.forward_dense(x)
    features = model.forward_features(x)
    return model.forward_head(features), final_patch_tokens(model, features)


def _check_token_model(model: nn.Module, name: str, img_size: int | Sequence[int] | None) -> None:
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(model, "num_prefix_tokens"):
        raise TypeError(_not_a_vit(name))
    patch = tuple(patch_embed.patch_size)
    check_img_size(name, img_size, patch, f"patch size {patch}")


def check_img_size(
    name: str, img_size: int | Sequence[int] | None, step: int | Sequence[int], what: str
) -> tuple[int, int] | None:
    """``img_size`` as (height, width) (None stays None); ``ValueError`` naming a size that fits unless each side
    is a multiple of ``step``, which ``what`` names (a ViT's patch size, a hierarchical backbone's stride)."""
    if img_size is None:
        return None
    size, step = tuple(to_2tuple(img_size)), tuple(to_2tuple(step))
    if len(size) != 2:
        raise ValueError(f"img_size is one side or (height, width), got {img_size!r}")
    if any(s % p for s, p in zip(size, step, strict=True)):
        fit = tuple(max(p, s // p * p) for s, p in zip(size, step, strict=True))
        raise ValueError(
            f"img_size {size} is not a multiple of {name}'s {what}: use e.g. {fit[0] if fit[0] == fit[1] else fit}"
        )
    return size


class DataConfig(NamedTuple):
    """What data must look like for a built model; DataModules follow it (``follow(model)``).

    Attributes:
        img_size: (H, W) the model was built for: its patch embedding's (not the pretrained config's: they
            differ when a ViT was built at another ``img_size``), else its ``pretrained_cfg``'s.
        in_chans: Image channels.
        patch_size: (h, w) of one patch token; None for a model without patch tokens (CNNs, and
            hierarchical backbones such as Swin, whose pruned locations are not its patches).
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
        # A hierarchical backbone's patches are not the tokens it prunes: the digits keep their own grid.
        patch_size=tuple(embed.patch_size) if embed is not None and family_of(model) is None else None,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg["interpolation"],
        crop_pct=cfg["crop_pct"],
    )


register(
    Method(
        name="dynamicvit",
        summary="learned keep predictors before chosen blocks drop the least useful tokens (DynamicViT)",
        learned=True,
        build=to_student,
        knob=Knob("keep_ratio", 0.0, 1.0),
        cost="schedule",
        at_stages=locations("pruning_loc"),
        set_params=set_keep_ratio,
        reports=frozenset({"counts", "masks"}),
        reference="raoyongming/DynamicViT",
        objective="dynamicvit",
        released={"keep 0.7": {"keep_ratio": 0.7}},
    )
)
