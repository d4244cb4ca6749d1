"""LV-ViT (Jiang et al., "All Tokens Matter: Token Labeling for Training Better Vision Transformers", 2021).

A timm ``VisionTransformer`` with three changes: a convolutional patch stem, residual branches scaled
by ``1 / skip_lam`` and an auxiliary head that classifies every patch token. At inference the
prediction is ``head(cls) + 0.5 * max over patches of aux_head(patch)``. State-dict keys are those of
the released checkpoints (``patch_embed.conv1/bn1/…/proj``, ``blocks.{i}.attn.qkv``, ``head``,
``aux_head`` …), so they load strictly.

:class:`DynamicLVViT` is its DynamicViT student (Rao et al., 2021): it prunes before blocks 4, 8, 12
(LV-ViT-S) or 5, 10, 15 (LV-ViT-M) and distils the teacher's dense predictions with KL.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from dynvit.models.dynamic_vit import DynamicViT, StudentOutput
from dynvit.models.factory import DEFAULT_PRUNING_LOC
from dynvit.models.mixtoken import TokenBox, mix_tokens

# The DynamicViT paper's pruning locations for LV-ViT: a quarter of the depth apart.
# The embedded digits model prunes where ``vit_digits`` does, so the two pairs compare like for like.
DEFAULT_PRUNING_LOC.update(
    {"lvvit_t": (3, 6, 9), "lvvit_s": (4, 8, 12), "lvvit_m": (5, 10, 15), "lvvit_digits": (1, 3, 5)}
)

# Weight of the best patch's aux-head logits in the inference prediction (LV-ViT's fixed 0.5).
AUX_WEIGHT = 0.5


class Divide(nn.Module):
    """Divide by a fixed number, as LV-ViT divides its residual branches by ``skip_lam``.

    ``x / d`` rather than ``x * (1 / d)``: the two differ in the last bit when d is not a power of two.
    No parameters, so checkpoints keep their keys.
    """

    def __init__(self, divisor: float) -> None:
        super().__init__()
        self.divisor = divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.divisor

    def extra_repr(self) -> str:
        return f"{self.divisor:g}"


class ConvStemEmbed(nn.Module):
    """LV-ViT's "4_2" patch stem: three conv-BN-ReLU layers at stride 2, then a patch/2 conv to the width.

    7×7/2 conv to ``stem_chans``, two 3×3/1 convs, each followed by BatchNorm and ReLU, then a
    ``patch_size/2`` conv at stride ``patch_size/2``: 224 → 112 → 14×14 tokens for patch 16.
    Returns flattened tokens (B, N, C), like timm's ``PatchEmbed``.

    Args:
        img_size: Input resolution; must be a multiple of ``patch_size``.
        patch_size: Effective patch size (even): the stem's total stride.
        in_chans: Image channels.
        embed_dim: Token width.
        bias: Bias of the final projection.
        stem_chans: Channels of the three stem convolutions.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        bias: bool = True,
        stem_chans: int = 64,
        dynamic_img_pad: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        if dynamic_img_pad:
            raise ValueError("LV-ViT's conv stem needs a fixed input size: build it with dynamic_img_pad=False")
        if any(p % 2 for p in self.patch_size):
            raise ValueError(f"LV-ViT's stem halves the resolution first, so patch_size must be even, got {patch_size}")
        if any(s % p for s, p in zip(self.img_size, self.patch_size, strict=True)):
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        self.in_chans = in_chans
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_chans, stem_chans, 7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(stem_chans, **dd)
        self.conv2 = nn.Conv2d(stem_chans, stem_chans, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(stem_chans, **dd)
        self.conv3 = nn.Conv2d(stem_chans, stem_chans, 3, padding=1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(stem_chans, **dd)
        self.act = nn.ReLU(inplace=True)
        half = (self.patch_size[0] // 2, self.patch_size[1] // 2)
        self.proj = nn.Conv2d(stem_chans, embed_dim, half, stride=half, bias=bias, **dd)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        """The stem's total stride, as timm's ``PatchEmbed`` reports it (its feature and intermediate APIs ask)."""
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The token grid of ``img_size`` images: timm's ``forward_intermediates`` asks it to reshape tokens to maps."""
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-3:]) != (self.in_chans, *self.img_size):
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit this model: it expects (B, {self.in_chans}, "
                f"{self.img_size[0]}, {self.img_size[1]}) images; resize the data or build the model with "
                f"img_size={tuple(x.shape[-2:])}"
            )
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        x = self.act(self.bn3(self.conv3(x)))
        return self.proj(x).flatten(2).transpose(1, 2)


def scaled_residual_block(skip_lam: float = 1.0, **block_kwargs) -> Block:
    """timm's ``Block`` whose two residual branches are divided by ``skip_lam`` (x + f(x) / skip_lam).

    The scale takes the place of layer scale (``ls1``/``ls2``), so the block keeps timm's class and keys
    and becomes maskable for DynamicViT like any other timm block.
    """
    block = Block(**block_kwargs)
    if skip_lam != 1.0:
        block.ls1, block.ls2 = Divide(skip_lam), Divide(skip_lam)
    return block


class LVViTOutput(NamedTuple):
    """What :class:`LVViT` returns in training mode, the inputs of token labeling.

    Attributes:
        logits: Class-token logits ``head(cls)`` (B, num_classes).
        aux_logits: Aux-head logits of every patch token (B, N, num_classes).
    """

    logits: torch.Tensor
    aux_logits: torch.Tensor


class LVViT(VisionTransformer):
    """LV-ViT: a timm ViT with a conv stem, scaled residuals and a per-patch auxiliary head.

    ``eval()`` mode returns ``head(cls) + 0.5 · max_patches aux_head(patch)``; ``train()`` mode returns
    :class:`LVViTOutput` (class-token logits and dense aux logits) for token labeling, and accepts a
    MixToken ``mix_box`` (:func:`dynvit.models.mixtoken.sample_token_box`) whose patch tokens are swapped
    between images of the batch right after the patch stem.

    For token distillation :meth:`forward_dense` gives ``(head(cls), aux_head(patches))``, and
    ``token_distill = "kl"`` tells the loss to compare those dense predictions with KL.

    Layers and defaults are the official model's (``zihangJiang/TokenLabeling``, docs/reference.md
    "Fidelity"): ``nn.LayerNorm`` with eps 1e-5 in every block and the final norm (timm's ViT default
    is 1e-6), no qkv bias, attention scale ``head_dim ** -0.5``, MLP ratio 3, ``drop_rate`` as dropout
    after the position embedding, the attention projection and the MLP, and the class token
    initialised like the official one (truncated normal, std 0.02).

    Args:
        skip_lam: Residual branches are divided by this.
        stem_chans: Channels of the conv stem.
        mlp_ratio: MLP hidden width over token width (3 in every LV-ViT).
        qkv_bias: LV-ViT's attention has no qkv bias.
        drop_rate: Dropout after the position embedding and inside every block (the official
            ``drop_rate``; timm's own ``drop_rate`` would only drop before the head).
        norm_layer: Normalisation of the blocks and the final norm.
        **kwargs: Other ``VisionTransformer`` arguments (``img_size``, ``patch_size``, ``in_chans``,
            ``num_classes``, ``embed_dim``, ``depth``, ``num_heads``, ``drop_path_rate``, …).
    """

    token_distill = "kl"
    dynamic_class: type[DynamicLVViT]

    def __init__(
        self,
        *,
        skip_lam: float = 1.0,
        stem_chans: int = 64,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        **kwargs,
    ) -> None:
        for fixed in ("embed_layer", "block_fn", "class_token", "global_pool", "pos_drop_rate", "proj_drop_rate"):
            if fixed in kwargs:
                hint = "; drop_rate sets both dropouts, as in LV-ViT" if fixed.endswith("drop_rate") else ""
                raise ValueError(f"LV-ViT fixes {fixed}; remove it from the arguments{hint}")
        super().__init__(
            embed_layer=partial(ConvStemEmbed, stem_chans=stem_chans),
            block_fn=partial(scaled_residual_block, skip_lam=skip_lam),
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            class_token=True,
            global_pool="token",
            norm_layer=norm_layer,
            pos_drop_rate=drop_rate,
            proj_drop_rate=drop_rate,
            **kwargs,
        )
        self.skip_lam = skip_lam
        # timm starts the class token at std 1e-6; the official model draws it like pos_embed.
        trunc_normal_(self.cls_token, std=0.02)
        self.aux_head = self._new_head(self.num_classes)

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.embed_dim, num_classes, device=self.cls_token.device, dtype=self.cls_token.dtype)
        trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New class and aux heads for ``num_classes`` (e.g. to fine-tune on another dataset)."""
        super().reset_classifier(num_classes, global_pool)
        self.aux_head = self._new_head(num_classes)

    def forward_features(self, x: torch.Tensor, mix_box: TokenBox | None = None) -> torch.Tensor:
        """All tokens after the final norm (B, 1 + N, C); ``mix_box`` applies MixToken after the stem."""
        x = self.patch_embed(x)
        if mix_box is not None:
            x = mix_tokens(x, mix_box)
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))
        return self.norm(self.blocks(x))

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``head(cls)`` of final tokens (B, 1 + N, C)."""
        return super().forward_head(x)

    def dense_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``aux_head`` of every patch token of final tokens (B, 1 + N, C): (B, N, num_classes)."""
        return self.aux_head(x[:, self.num_prefix_tokens :])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """LV-ViT's prediction ``head(cls) + 0.5 · max_patches aux_head(patch)`` over the tokens present."""
        if pre_logits:
            return super().forward_head(x, pre_logits=True)
        return self.class_logits(x) + AUX_WEIGHT * self.dense_logits(x).amax(dim=1)

    def forward_dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class-token logits and dense aux logits (B, N, classes) of images: the token-distillation targets."""
        x = self.forward_features(x)
        return self.class_logits(x), self.dense_logits(x)

    def forward(self, x: torch.Tensor, mix_box: TokenBox | None = None) -> LVViTOutput | torch.Tensor:
        if not self.training:
            if mix_box is not None:
                raise ValueError("MixToken is a training augmentation: pass mix_box only in train() mode")
            return self.forward_head(self.forward_features(x))
        x = self.forward_features(x, mix_box=mix_box)
        return LVViTOutput(self.class_logits(x), self.dense_logits(x))


class DynamicLVViT(DynamicViT, LVViT):
    """DynamicViT on LV-ViT: keep predictors before ``pruning_loc`` blocks of an :class:`LVViT`.

    ``train()`` mode returns a :class:`~dynvit.models.StudentOutput` whose ``logits`` are ``head(cls)``
    and whose ``tokens`` are the aux-head logits of every patch token (B, N, classes), distilled with KL
    against the teacher's :meth:`LVViT.forward_dense` (``token_distill = "kl"``). ``eval()`` mode returns
    LV-ViT's prediction on the kept tokens.
    """

    @classmethod
    def check_convertible(cls, model: nn.Module) -> None:
        if not isinstance(model, LVViT):
            raise TypeError(
                f"DynamicLVViT converts an LVViT (e.g. timm.create_model('lvvit_s')), got {type(model).__name__}"
            )

    def train_output(self, x: torch.Tensor, decisions: list[torch.Tensor]) -> StudentOutput:
        return StudentOutput(
            logits=self.class_logits(x),
            tokens=self.dense_logits(x),
            mask=decisions[-1].detach(),
            decisions=decisions,
        )


LVViT.dynamic_class = DynamicLVViT


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv1",
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "lvvit_t": _cfg(),
        "lvvit_s": _cfg(),
        "lvvit_m": _cfg(crop_pct=1.0),
        "lvvit_digits": _cfg(num_classes=10, input_size=(1, 64, 64), mean=(0.0,), std=(1.0,), crop_pct=1.0),
    }
)


def _create_lvvit(variant: str, pretrained: bool, **kwargs) -> LVViT:
    if pretrained:
        raise ValueError(
            f"{variant} has no weights on the model hub: download the released LV-ViT checkpoint and pass it "
            f"as create_teacher({variant!r}, checkpoint=path)"
        )
    return build_model_with_cfg(LVViT, variant, pretrained=False, **kwargs)


@register_model
def lvvit_t(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-T: 12 blocks × 240, 4 heads, skip_lam 1 (8.5M parameters, 79.1 top-1)."""
    args = dict(patch_size=16, embed_dim=240, depth=12, num_heads=4, skip_lam=1.0)
    return _create_lvvit("lvvit_t", pretrained, **dict(args, **kwargs))


@register_model
def lvvit_s(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-S: 16 blocks × 384, 6 heads, skip_lam 2 (26.2M parameters, 6.6 GFLOPs, 83.3 top-1)."""
    args = dict(patch_size=16, embed_dim=384, depth=16, num_heads=6, skip_lam=2.0)
    return _create_lvvit("lvvit_s", pretrained, **dict(args, **kwargs))


@register_model
def lvvit_m(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-M: 20 blocks × 512, 8 heads, skip_lam 2 (55.8M parameters, 84.0 top-1)."""
    args = dict(patch_size=16, embed_dim=512, depth=20, num_heads=8, skip_lam=2.0)
    return _create_lvvit("lvvit_m", pretrained, **dict(args, **kwargs))


@register_model
def lvvit_digits(pretrained: bool = False, **kwargs) -> LVViT:
    """6 × 128 LV-ViT for 64×64 one-channel cluttered digits: 8 px effective patch, 8×8 = 64 tokens.

    The embedded counterpart of LV-ViT-S (MLP ratio 3, skip_lam 2, aux head) at ``vit_digits``' size:
    0.10 GFLOPs against its 0.074 (the stem has 32 channels instead of LV-ViT's 64 to stay close).
    """
    args = dict(
        img_size=64,
        patch_size=8,
        in_chans=1,
        num_classes=10,
        embed_dim=128,
        depth=6,
        num_heads=4,
        skip_lam=2.0,
        stem_chans=32,
    )
    return _create_lvvit("lvvit_digits", pretrained, **dict(args, **kwargs))


__all__ = [
    "AUX_WEIGHT",
    "ConvStemEmbed",
    "Divide",
    "DynamicLVViT",
    "LVViT",
    "LVViTOutput",
    "lvvit_digits",
    "lvvit_m",
    "lvvit_s",
    "lvvit_t",
    "scaled_residual_block",
]
