"""DynamicSwin: timm's ``SwinTransformer`` with dynamic spatial sparsification in stage 3 (DynamicViT journal version).

A built timm Swin is converted in place (:meth:`DynamicSwin.from_swin`): stage-3 blocks from the
first pruning location on get a fast path (``fastmlp``: LayerNorm + Linear C→C) beside their MLP, and
the stage gets the keep predictors. (Shifted) window attention always runs on the full map, with
timm's own cyclic shift, padding and attention mask. See :mod:`dynvit.models.spatial_pruning` for
the method and docs/reference.md ("Dynamic spatial sparsification") for the reference's details.

Checkpoints: the original MSRA Swin files and released DynamicSwin files (MSRA's keys plus
``layers.2.blocks.{j}.fastmlp.*`` and ``layers.2.score_predictor.*``) load through timm's own MSRA →
timm key mapping, which leaves the pruning parameters where this student has them
(see :func:`swin_layout`).
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from timm.layers import Mlp
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerStage,
    _create_swin_transformer,
    checkpoint_filter_fn,
)
from torch import nn

from dynvit.models.checkpoint import CheckpointMismatch, register_layout
from dynvit.models.dynamic_vit import init_predictor
from dynvit.models.factory import Family, check_img_size, register_family
from dynvit.models.spatial_pruning import SpatialPruningStage, SpatialPruningStudent, split_apply

# The stage that is pruned: the third (index 2), the longest in every Swin.
PRUNED_STAGE = 2


class FastMlp(nn.Module):
    """The fast path of a pruned Swin block: LayerNorm + Linear (C→C), no hidden layer, no layer scale.

    Parameter names follow the released DynamicSwin checkpoints (``fc1.0`` the norm, ``fc1.1`` the
    linear layer) so they load as they are.
    """

    def __init__(self, dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc1(x))


class FastMlpBlock(SwinTransformerBlock):
    """A timm ``SwinTransformerBlock`` with a fast path for the locations its MLP skips.

    Attention (timm's ``_attn``: cyclic shift, padding, shifted-window mask) runs on the full map and
    is added to the block's input. Slow path: the block's own ``norm2`` → ``mlp``; fast path:
    ``fastmlp``. Either is added to the attention output through ``drop_path2``.
    """

    new_param_names = ("fastmlp",)

    @classmethod
    def convert(cls, block: SwinTransformerBlock) -> FastMlpBlock:
        """Add a freshly initialised fast path to a built block, in place."""
        param = block.norm1.weight
        block.__class__ = cls
        # The reference gives the fast path the dropout of the block's MLP.
        block.fastmlp = FastMlp(block.dim, block.mlp.drop1.p).to(param.device, param.dtype)
        init_predictor(block.fastmlp)
        return block

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention half of the block on the full map (B, H, W, C), residual included."""
        return x + self.drop_path1(self._attn(self.norm1(x)))

    def slow(self, tokens: torch.Tensor) -> torch.Tensor:
        """The block's MLP branch on tokens (…, C)."""
        return self.mlp(self.norm2(tokens))

    def forward_streams(
        self, slow: torch.Tensor, fast: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: both streams (B, H, W, C) and the keep mask (B, H, W, 1) → both streams.

        Attention runs once on the blended map. Each path's input is the attention output where the
        mask gives it the location and the path's own stream elsewhere; both paths add to the
        attention output (unlike ConvNeXt, where each stream adds to its own input).
        """
        x = self.attend(slow * mask + fast * (1 - mask))
        slow_out = self.slow(x * mask + slow * (1 - mask))
        fast_out = self.fastmlp(x * (1 - mask) + fast * mask)
        return x + self.drop_path2(slow_out), x + self.drop_path2(fast_out)

    def forward_split(self, x: torch.Tensor, order: torch.Tensor, count: int) -> torch.Tensor:
        """Inference: attention on the full map (B, H, W, C), slow path on the first ``count`` locations
        of ``order`` (B, H·W), fast path on the rest."""
        x = self.attend(x)
        B, H, W, C = x.shape
        out = split_apply(x.reshape(B, H * W, C), order, count, self.slow, self.fastmlp)
        return x + self.drop_path2(out.view(B, H, W, C))


class PrunedSwinStage(SpatialPruningStage, SwinTransformerStage):
    """timm's ``SwinTransformerStage`` with keep predictors and fast-path blocks (NHWC maps)."""

    pruned_block = FastMlpBlock
    channels_last = True


class DynamicSwin(SpatialPruningStudent, SwinTransformer):
    """A timm ``SwinTransformer`` pruned in stage 3 by dynamic spatial sparsification.

    Build one with :func:`dynvit.create_student` (``swin_tiny_patch4_window7_224``, ``swin_small_…``,
    ``swin_base_…``) or convert a timm Swin in place with :meth:`from_swin`. ``train()`` mode returns
    a :class:`~dynvit.models.spatial_pruning.SpatialOutput` (features NHWC, as timm's Swin); ``eval()``
    mode returns logits of the inference path, and ``forward_features``/``forward_intermediates``/
    timm's ``FeatureListNet`` give dense stage maps computed with it.
    """

    pruned_stage_name = f"layers.{PRUNED_STAGE}"

    @classmethod
    def from_swin(
        cls, model: SwinTransformer, keep_ratio: float = 0.7, pruning_loc: Sequence[int] | None = None
    ) -> DynamicSwin:
        """Turn a built timm Swin into its DynamicSwin student in place (weights kept) and return it.

        Args:
            keep_ratio: Base keep ratio ρ; pruning stage s keeps ``int(N · (ρ − 0.2·s))`` of the N
                stage-3 locations.
            pruning_loc: Stage-3 blocks before which a predictor sits; None: the reference's (1, 2, 3
                for a 6-block stage 3 as in Swin-T, 2, 4, 6 for 18 blocks as in -S/-B).
        """
        check_convertible(model)
        stage = model.layers[PRUNED_STAGE]
        if pruning_loc is None:
            pruning_loc = default_pruning_loc(len(stage.blocks))
        dim = model.feature_info[PRUNED_STAGE]["num_chs"]
        PrunedSwinStage.convert(stage, dim, keep_ratio, pruning_loc, tuple(stage.output_resolution))
        model.__class__ = cls
        return model

    def forward_pruned(self, x: torch.Tensor, inference: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed(x)
        masks: list[torch.Tensor] = []
        for i, stage in enumerate(self.layers):
            if i == PRUNED_STAGE:
                x, masks = stage.forward_blocks(stage.downsample(x), inference)
            else:
                x = stage(x)
        return self.norm(x), masks

    def distilled_map(self, features: torch.Tensor) -> torch.Tensor:
        """Swin's features already are the final map after the final norm: (B, H, W, C)."""
        return features


def default_pruning_loc(depth: int) -> tuple[int, int, int]:
    """The reference's predictor locations for a stage 3 of ``depth`` blocks: every depth/9 blocks
    (at least 1), so (1, 2, 3) for Swin-T's 6 blocks and (2, 4, 6) for -S/-B's 18."""
    step = max(1, depth // 9)
    return (step, 2 * step, 3 * step)


def check_convertible(model: nn.Module) -> None:
    """Raise ``TypeError`` naming the reason unless ``model`` is a Swin this student can convert."""
    if not isinstance(model, SwinTransformer):
        raise TypeError(f"{type(model).__name__} is not a timm SwinTransformer (e.g. swin_tiny_patch4_window7_224)")
    if isinstance(model, DynamicSwin):
        raise TypeError("this Swin is already a DynamicSwin student")
    if len(model.layers) != 4:
        raise TypeError(f"DynamicSwin prunes stage 3 of a 4-stage Swin; this one has {len(model.layers)} stages")
    for block in model.layers[PRUNED_STAGE].blocks:
        if type(block) is not SwinTransformerBlock or type(block.mlp) is not Mlp:
            raise TypeError(
                "DynamicSwin needs timm SwinTransformerBlocks with a plain Mlp in stage 3 (Swin V1, as "
                f"swin_tiny/small/base_patch4_window7_224 have); this model has {type(block).__name__}"
            )


def build_swin(
    name: str, pretrained: bool, num_classes: int, img_size: int | Sequence[int] | None, **timm_kwargs
) -> SwinTransformer:
    """The timm Swin ``name`` at ``img_size`` (one side or (height, width); None: its own pretrained size),
    which must be a multiple of its patch size. Swin's window geometry is fixed at construction, so the
    size is built in."""
    if img_size is not None:
        timm_kwargs["img_size"] = img_size
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **timm_kwargs)
    patch = tuple(model.patch_embed.patch_size)
    check_img_size(name, img_size, patch, f"patch size {patch}")
    return model


def distilled_features(model: SwinTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Swin teacher's logits and final map after the final norm (B, H, W, C)."""
    features = model.forward_features(x)
    return model.forward_head(features), features


def swin_layout(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """MSRA Swin and released DynamicSwin weights → timm's keys; timm-layout weights pass unchanged.

    timm's own filter (``timm.models.swin_transformer.checkpoint_filter_fn``) moves each stage's patch
    merging to the start of the next stage, renames ``head`` to ``head.fc`` and drops the buffers timm
    rebuilds (``relative_position_index``, ``attn_mask``). The reference keeps its predictors in the
    pruned stage (``layers.2.score_predictor.*``) and its fast paths in the blocks
    (``layers.2.blocks.{j}.fastmlp.*``), where this student has them too, so they pass unchanged.
    """
    try:
        return checkpoint_filter_fn(state_dict, model)
    except AttributeError as e:
        # timm's filter looks up the model's block of every relative position table; a block it lacks raises.
        raise CheckpointMismatch(
            f"a checkpoint weight has no place in this {type(model).__name__} ({e}): is the checkpoint of "
            "another Swin size?"
        ) from None


register_layout(SwinTransformer, swin_layout)
register_family(
    Family(
        backbone=SwinTransformer,
        # timm's Swin models, and those registered below.
        modules=("swin_transformer", __name__.rsplit(".", 1)[-1]),
        build=build_swin,
        to_student=DynamicSwin.from_swin,
        distilled_features=distilled_features,
        examples=("swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224"),
    )
)


# timm looks up a model's default config (input size, normalisation) here when it is registered.
default_cfgs = generate_default_cfgs(
    {"swin_digits.untrained": dict(num_classes=10, input_size=(1, 128, 128), mean=(0.0,), std=(1.0,), crop_pct=1.0)}
)


@register_model
def swin_digits(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """A narrow Swin for the one-channel cluttered digits on a 128-px canvas.

    The data of ``convnext_digits`` (``ClutteredDigitsDataModule(patch_size=16, digit_scale=4)``
    following the model's 128 px: the default digits scaled 2×): Swin's own 4-pixel patches put stage 3
    at 8×8, one location per 16-pixel patch of the data's patch mask, so kept-location recall and
    pictures line up with it. Windows of 4 (stage 3: four windows, shifted by 2 in every other block;
    stage 4 is one window). Depths 1, 1, 6, 1 (stage 3 six blocks with predictors before 1, 2, 3, as in
    Swin-T's 2, 2, 6, 2), widths 16, 32, 64, 128: narrow enough for a CPU to train it in minutes. The
    head max-pools the last map, as ``convnext_digits``'s does and for the same reason: with average
    pooling the teacher stayed at chance (validation top-1 9–12 %) for 4 epochs, with max pooling it
    reached 38 %.
    """
    args = dict(
        img_size=128,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        window_size=4,
        embed_dim=16,
        depths=(1, 1, 6, 1),
        num_heads=(1, 1, 2, 4),
        global_pool="max",
    )
    return _create_swin_transformer("swin_digits", pretrained=pretrained, **dict(args, **kwargs))
