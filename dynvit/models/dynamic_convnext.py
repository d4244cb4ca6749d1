"""DynamicCNN: timm's ``ConvNeXt`` with dynamic spatial sparsification in stage 3 (DynamicViT journal version).

A built timm ConvNeXt is converted in place (:meth:`DynamicCNN.from_convnext`): stage-3 blocks from
the first pruning location on get a fast path (LayerNorm + Linear C→C, layer-scaled by its own
``fast_path_gamma``) beside their MLP, and the stage gets the keep predictors. The depthwise
convolution always runs on the full map. See :mod:`dynvit.models.spatial_pruning` for the method and
docs/reference.md ("Dynamic spatial sparsification") for the reference's details.

Checkpoints: the original FB ConvNeXt files and released DynamicCNN files (``downsample_layers.*``,
``stages.{i}.{j}.*``, ``score_predictor.*``) load through timm's own FB → timm key mapping plus the
pruning parameters (see :func:`convnext_layout`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import timm
import torch
from timm.layers import Mlp, NormMlpClassifierHead, to_2tuple
from timm.models import generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt, ConvNeXtBlock, ConvNeXtStage, _create_convnext, checkpoint_filter_fn
from torch import nn

from dynvit.models.checkpoint import CheckpointMismatch, register_layout
from dynvit.models.dynamic_vit import init_predictor, input_size
from dynvit.models.factory import Family, check_img_size, register_family
from dynvit.models.spatial_pruning import SpatialPruningStage, SpatialPruningStudent, split_apply

# The stage that is pruned: the third (index 2), the longest in every ConvNeXt.
PRUNED_STAGE = 2
# The reference initialises the fast path's layer scale as the blocks' own (ConvNeXt's 1e-6).
FAST_PATH_LS_INIT = 1e-6


class FastPathBlock(ConvNeXtBlock):
    """A timm ``ConvNeXtBlock`` with a fast path for the locations its MLP skips.

    Slow path: the block's own LayerNorm → MLP → layer scale ``gamma``. Fast path:
    ``fast_path = [LayerNorm, Linear C→C]``, layer-scaled by ``fast_path_gamma``. Both after the
    depthwise convolution, both added to the block's input.
    """

    new_param_names = ("fast_path",)

    @classmethod
    def convert(cls, block: ConvNeXtBlock) -> FastPathBlock:
        """Add a freshly initialised fast path to a built block, in place."""
        dim = block.conv_dw.out_channels
        block.__class__ = cls
        param = block.conv_dw.weight
        block.fast_path = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, dim)).to(param.device, param.dtype)
        init_predictor(block.fast_path)
        block.fast_path_gamma = (
            None if block.gamma is None else nn.Parameter(torch.full_like(block.gamma, FAST_PATH_LS_INIT))
        )
        return block

    def slow(self, tokens: torch.Tensor) -> torch.Tensor:
        """The block's MLP branch on channels-last tokens (…, C)."""
        out = self.mlp(self.norm(tokens))
        return out if self.gamma is None else out * self.gamma

    def fast(self, tokens: torch.Tensor) -> torch.Tensor:
        """The fast path on channels-last tokens (…, C)."""
        out = self.fast_path(tokens)
        return out if self.fast_path_gamma is None else out * self.fast_path_gamma

    def forward_streams(
        self, slow: torch.Tensor, fast: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: both streams (B, C, H, W) and the keep mask (B, 1, H, W) → both streams.

        The depthwise conv runs once on the blended map; each stream takes its result where the mask
        gives it the location and keeps its own input elsewhere, then goes through its path.
        """
        mixed = self.conv_dw(slow * mask + fast * (1 - mask))
        slow_in = mixed * mask + slow * (1 - mask)
        fast_in = mixed * (1 - mask) + fast * mask
        slow_out = self.slow(slow_in.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        fast_out = self.fast(fast_in.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return slow + self.drop_path(slow_out), fast + self.drop_path(fast_out)

    def forward_split(self, x: torch.Tensor, order: torch.Tensor, count: int) -> torch.Tensor:
        """Inference: depthwise conv on the full map (B, C, H, W), slow path on the first ``count``
        locations of ``order`` (B, H·W), fast path on the rest.

        The map is kept in channels-last memory (same NCHW shape): the conv reads and writes it, and
        the token views for the gather and the residual add then cost no copy.
        """
        x = x.contiguous(memory_format=torch.channels_last)
        mixed = self.conv_dw(x)
        B, C, H, W = mixed.shape
        tokens = mixed.permute(0, 2, 3, 1).reshape(B, H * W, C)
        out = split_apply(tokens, order, count, self.slow, self.fast).view(B, H, W, C).permute(0, 3, 1, 2)
        return x + self.drop_path(out)


class PrunedConvNeXtStage(SpatialPruningStage, ConvNeXtStage):
    """timm's ``ConvNeXtStage`` with keep predictors and fast-path blocks (NCHW maps)."""

    pruned_block = FastPathBlock
    channels_last = False


class DynamicCNN(SpatialPruningStudent, ConvNeXt):
    """A timm ``ConvNeXt`` pruned in stage 3 by dynamic spatial sparsification.

    Build one with :func:`dynvit.create_student` (``convnext_tiny``/``_small``/``_base``) or convert a
    timm ConvNeXt in place with :meth:`from_convnext`. ``train()`` mode returns a
    :class:`~dynvit.models.spatial_pruning.SpatialOutput`; ``eval()`` mode returns logits of the
    inference path, and ``forward_features``/``forward_intermediates``/timm's ``FeatureListNet`` give
    dense stage maps computed with it.
    """

    pruned_stage_name = f"stages.{PRUNED_STAGE}"

    @classmethod
    def from_convnext(
        cls, model: ConvNeXt, keep_ratio: float = 0.7, pruning_loc: Sequence[int] | None = None
    ) -> DynamicCNN:
        """Turn a built timm ConvNeXt into its DynamicCNN student in place (weights kept) and return it.

        Args:
            keep_ratio: Base keep ratio ρ; pruning stage s keeps ``int(N · (ρ − 0.2·s))`` of the N
                stage-3 locations.
            pruning_loc: Stage-3 blocks before which a predictor sits; None: the reference's (1, 2, 3
                for a 9-block stage 3 as in ConvNeXt-T, 3, 6, 9 for 27 blocks as in -S/-B).
        """
        check_convertible(model)
        stage = model.stages[PRUNED_STAGE]
        if pruning_loc is None:
            pruning_loc = default_pruning_loc(len(stage.blocks))
        _, height, width = input_size(model)
        reduction = model.feature_info[PRUNED_STAGE]["reduction"]
        grid = (height // reduction, width // reduction)
        dim = model.feature_info[PRUNED_STAGE]["num_chs"]
        PrunedConvNeXtStage.convert(stage, dim, keep_ratio, pruning_loc, grid, predictor_eps=1e-6)
        model.__class__ = cls
        return model

    def forward_pruned(self, x: torch.Tensor, inference: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.stem(x)
        masks: list[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            if i == PRUNED_STAGE:
                x, masks = stage.forward_blocks(stage.downsample(x), inference)
            else:
                x = stage(x)
        return self.norm_pre(x), masks

    def distilled_map(self, features: torch.Tensor) -> torch.Tensor:
        """The final norm (the head's LayerNorm) on every location of the last map: (B, C, H, W)."""
        return self.head.norm(features)


def default_pruning_loc(depth: int) -> tuple[int, int, int]:
    """The reference's predictor locations for a stage 3 of ``depth`` blocks: every depth/9 blocks,
    so (1, 2, 3) for ConvNeXt-T's 9 blocks and (3, 6, 9) for -S/-B's 27."""
    step = max(1, depth // 9)
    return (step, 2 * step, 3 * step)


def check_convertible(model: nn.Module) -> None:
    """Raise ``TypeError`` naming the reason unless ``model`` is a ConvNeXt this student can convert."""
    if not isinstance(model, ConvNeXt):
        raise TypeError(f"{type(model).__name__} is not a timm ConvNeXt (e.g. convnext_tiny)")
    if isinstance(model, DynamicCNN):
        raise TypeError("this ConvNeXt is already a DynamicCNN student")
    if len(model.stages) != 4:
        raise TypeError(f"DynamicCNN prunes stage 3 of a 4-stage ConvNeXt; this one has {len(model.stages)} stages")
    for block in model.stages[PRUNED_STAGE].blocks:
        if block.use_conv_mlp or type(block.mlp) is not Mlp:
            raise TypeError(
                "DynamicCNN needs stage-3 blocks with a channels-last Linear MLP (conv_mlp=False, no GRN), as "
                "convnext_tiny/small/base/large have; this model uses conv_mlp or ConvNeXt-V2's GRN"
            )
        if not isinstance(block.shortcut, nn.Identity) or block.conv_dw.stride != (1, 1):
            raise TypeError("DynamicCNN needs stride-1 stage-3 blocks with identity shortcuts")
    if not isinstance(model.head, NormMlpClassifierHead) or not isinstance(model.norm_pre, nn.Identity):
        raise TypeError(
            "DynamicCNN distils the final map after the head's norm; build the ConvNeXt with head_norm_first=False"
        )


def build_convnext(
    name: str, pretrained: bool, num_classes: int, img_size: int | Sequence[int] | None, **timm_kwargs
) -> ConvNeXt:
    """The timm ConvNeXt ``name``; an ``img_size`` (one side or (height, width)) other than ``None`` (its own
    pretrained size) is recorded as its ``pretrained_cfg["input_size"]``, which is where the DataModule reads
    the size."""
    if img_size is not None:
        in_chans = timm_kwargs.get("in_chans", 3)
        timm_kwargs["pretrained_cfg_overlay"] = dict(input_size=(in_chans, *to_2tuple(img_size)))
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **timm_kwargs)
    stride = model.feature_info[-1]["reduction"]
    check_img_size(name, img_size, stride, f"total stride {stride}")
    return model


def distilled_features(model: ConvNeXt, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ConvNeXt teacher's logits and final map after the final norm (B, C, H, W)."""
    features = model.forward_features(x)
    return model.forward_head(features), model.head.norm(features)


# Reference (FB) block keys ``stages.{i}.{j}.…``; timm's are ``stages.{i}.blocks.{j}.…``.
_FB_BLOCK = re.compile(r"^stages\.(\d+)\.(\d+)\.")


def convnext_layout(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """FB ConvNeXt and released DynamicCNN weights → timm's keys; timm-layout weights pass unchanged.

    The backbone goes through timm's own FB → timm filter (``timm.models.convnext.checkpoint_filter_fn``).
    What DynamicCNN adds is moved here: ``stages.{i}.{j}.fast_path*`` → ``stages.{i}.blocks.{j}.fast_path*``,
    and the reference's top-level ``score_predictor.*`` into stage 3, its 1×1 convolutions (C_out, C_in,
    1, 1) becoming our Linear weights (C_out, C_in).
    """
    pruning = {k: v for k, v in state_dict.items() if k.startswith("score_predictor.") or ".fast_path" in k}
    backbone = {k: v for k, v in state_dict.items() if k not in pruning}
    try:
        out = checkpoint_filter_fn(backbone, model)
    except KeyError as e:
        # timm's filter looks up the model's shape of every FB MLP weight; a block it lacks raises.
        raise CheckpointMismatch(
            f"checkpoint weight {e.args[0]} has no place in this {type(model).__name__}: is the checkpoint of "
            "another ConvNeXt size?"
        ) from None
    for key, value in pruning.items():
        key = _FB_BLOCK.sub(r"stages.\1.blocks.\2.", key)
        if key.startswith("score_predictor."):
            key = f"stages.{PRUNED_STAGE}.{key}"
            if value.ndim == 4:
                value = value.flatten(1)
        out[key] = value
    return out


register_layout(ConvNeXt, convnext_layout)
register_family(
    Family(
        backbone=ConvNeXt,
        # timm's ConvNeXt models, and those registered below.
        modules=("convnext", __name__.rsplit(".", 1)[-1]),
        build=build_convnext,
        to_student=DynamicCNN.from_convnext,
        distilled_features=distilled_features,
        examples=("convnext_tiny", "convnext_small", "convnext_base"),
    )
)


# timm looks up a model's default config (input size, normalisation) here when it is registered.
default_cfgs = generate_default_cfgs(
    {"convnext_digits.untrained": dict(num_classes=10, input_size=(1, 128, 128), mean=(0.0,), std=(1.0,), crop_pct=1.0)}
)


@register_model
def convnext_digits(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """A narrow ConvNeXt for one-channel cluttered digits on a 128×128 canvas.

    ConvNeXt's stages sit at strides 4, 8, 16, 32 whatever the stem, so the canvas is 128 pixels
    (``ClutteredDigitsDataModule(img_size=128, patch_size=16, digit_scale=4)``, the default digits
    scaled 2×): stage 3 is then 8×8, one location per 16-pixel patch of the data's patch mask, so
    kept-location recall and pictures line up with it. Depths 1, 1, 6, 1 and widths 16, 32, 64, 128
    (0.42 M parameters, 0.024 GFLOPs): stage 3 holds 60 % of the compute, as the pruned stage does in
    ConvNeXt-T, and a CPU trains it in minutes. The head max-pools the last map instead of averaging
    it: the digit fills one or two of its 4×4 cells among clutter, and with average pooling the
    network stayed at chance for 300 steps where max pooling started learning within 100.
    """
    args = dict(in_chans=1, num_classes=10, depths=(1, 1, 6, 1), dims=(16, 32, 64, 128), global_pool="max")
    return _create_convnext("convnext_digits", pretrained=pretrained, **dict(args, **kwargs))
