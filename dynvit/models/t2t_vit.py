"""T2T-ViT (Yuan et al., "Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet", 2021).

The image becomes tokens through a *tokens-to-token* module: three soft splits (overlapping unfolds
7/4/2, 3/2/1, 3/2/1) with a small one-head transformer layer of width 64 between them, then a linear
projection: 224 → 56² → 28² → 14² = 196 tokens. A deep-narrow ViT backbone with a class token and a
fixed sinusoidal position embedding follows. T2T-ViT-7/14 use a Performer (random-feature linear
attention) in the T2T layers, T2T-ViT_t-7/14 plain attention. State-dict keys are those of the
released checkpoints (``tokens_to_token.{attention1,attention2,project}``, ``cls_token``,
``pos_embed``, ``blocks.{i}…``, ``norm``, ``head``).

FLOPs: fvcore counts the Performer's einsums (the random-feature projections of q and k, the
normaliser and the two linear-attention products) as multiply-accumulates like any matrix product;
like softmax in ordinary attention, the exponentials and other element-wise work are not counted.
They are real work done per image, and small: 32 MFLOPs of T2T-ViT-14's 4.80 G (4.77 without them).

:class:`DynamicT2TViT` is its DynamicViT student: it prunes in the backbone (before blocks 3, 6, 9 of
T2T-ViT-14 by default), the keep ratio applying to the 196 tokens the T2T module produces.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Mlp, calculate_drop_path_rates, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block
from torch import nn

from dynvit.models.dynamic_vit import TokenPruning
from dynvit.models.factory import DEFAULT_PRUNING_LOC

# T2T-ViT-14 prunes like a 12-block DeiT (three full blocks, then a stage every three blocks); the
# 7-block models prune after two full blocks, then every two.
DEFAULT_PRUNING_LOC.update(
    {
        "t2t_vit_12": (3, 6, 9),
        "t2t_vit_14": (3, 6, 9),
        "t2t_vit_t_14": (3, 6, 9),
        "t2t_vit_7": (2, 4, 6),
        "t2t_vit_t_7": (2, 4, 6),
    }
)

# The soft splits: (kernel, stride, padding) of each unfold.
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))


class Scale(nn.Module):
    """Multiply by a fixed factor (the backbone's query scale). No parameters, so checkpoints keep their keys."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"{self.factor:g}"


def sinusoid_position_embedding(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed Transformer position code (1, num_positions, dim): sin on even, cos on odd channels."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    # Channels 2i and 2i+1 share the frequency 1 / 10000^(2i / dim).
    freq = torch.pow(10000.0, -2.0 * (torch.arange(dim) // 2).double() / dim)
    angle = position * freq
    code = torch.where(torch.arange(dim) % 2 == 0, angle.sin(), angle.cos())
    return code[None].float()


class TokenPerformer(nn.Module):
    """One T2T layer with Performer attention: linear attention through positive random features.

    ``φ(x) = exp(w·x − |x|²/2) / √m`` for m = ``width · kernel_ratio`` fixed random directions ``w``
    (orthogonal, scaled by √m): the softmax kernel ``exp(q·k)`` becomes ``φ(q)·φ(k)`` and attention costs
    O(N·m·width) instead of O(N²·width). The value path is the skip connection because the layer narrows
    the tokens from ``dim`` to ``width``. Parameter names follow the released checkpoints
    (``kqv``, ``proj``, ``norm1``, ``norm2``, ``mlp.0``, ``mlp.2``, ``w``).

    Args:
        dim: Input token width (channels × kernel area of the preceding soft split).
        width: Output token width.
        kernel_ratio: Random features per output channel.
        drop: Dropout after the attention projection and the MLP (T2T-ViT fixes 0.1).
    """

    def __init__(self, dim: int, width: int = 64, kernel_ratio: float = 0.5, drop: float = 0.1) -> None:
        super().__init__()
        self.width = width
        self.kqv = nn.Linear(dim, 3 * width)
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(width, width)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.Dropout(drop))
        m = int(width * kernel_ratio)
        w = nn.init.orthogonal_(torch.empty(m, width)) * math.sqrt(m)
        self.w = nn.Parameter(w, requires_grad=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Positive random features φ(x) (B, T, m) of x (B, T, width), in float32 (exp overflows in half)."""
        x = x.float()
        projected = torch.einsum("btd,md->btm", x, self.w.float())
        return torch.exp(projected - 0.5 * (x * x).sum(dim=-1, keepdim=True)) / math.sqrt(self.w.shape[0])

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        # The released layout orders the projection k, q, v.
        k, q, v = self.kqv(x).split(self.width, dim=-1)
        kp, qp = self.features(k), self.features(q)
        normaliser = torch.einsum("btm,bm->bt", qp, kp.sum(dim=1)).unsqueeze(-1)
        context = torch.einsum("btd,btm->bdm", v.float(), kp)
        y = torch.einsum("btm,bdm->btd", qp, context) / (normaliser + 1e-8)
        return v + self.dp(self.proj(y.to(v.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenAttention(nn.Module):
    """One-head softmax attention that narrows tokens from ``dim`` to ``width``, with the value as skip.

    Logits are scaled by ``dim ** -0.5`` (the *input* width), as the released T2T-ViT_t weights were
    trained.
    """

    def __init__(self, dim: int, width: int = 64) -> None:
        super().__init__()
        self.width = width
        self.scale = dim**-0.5
        self.qkv = nn.Linear(dim, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.width, dim=-1)
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=self.scale)[:, 0]
        return v + self.proj(y)


class TokenTransformer(nn.Module):
    """One T2T layer with plain attention (T2T-ViT_t): norm → :class:`TokenAttention` → norm → MLP.

    Args:
        dim: Input token width.
        width: Output token width.
        mlp_ratio: MLP hidden width over ``width``.
    """

    def __init__(self, dim: int, width: int = 64, mlp_ratio: float = 1.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokensToToken(nn.Module):
    """The T2T module: soft split → T2T layer → re-fold → soft split → T2T layer → re-fold → soft split → linear.

    Plays the part of a patch embedding (``img_size``, ``patch_size`` = the effective stride 16,
    ``grid_size``, ``num_patches``, ``in_chans``) and returns tokens (B, N, embed_dim).

    Args:
        img_size: Input resolution, a multiple of 16.
        in_chans: Image channels.
        embed_dim: Backbone width.
        token_dim: Width of the two T2T layers.
        tokens_type: ``"performer"`` (T2T-ViT) or ``"transformer"`` (T2T-ViT_t).
        soft_splits: (kernel, stride, padding) of the three unfolds; DVT's coarser exits use others.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        embed_dim: int = 384,
        token_dim: int = 64,
        tokens_type: Literal["performer", "transformer"] = "performer",
        soft_splits: tuple[tuple[int, int, int], ...] = SOFT_SPLITS,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        soft_splits = tuple(tuple(split) for split in soft_splits)
        stride = math.prod(s for _, s, _ in soft_splits)
        self.patch_size = (stride, stride)
        if soft_splits == SOFT_SPLITS and any(s % stride for s in self.img_size):
            raise ValueError(f"T2T-ViT needs an img_size that is a multiple of {stride}, got {self.img_size}")
        self.in_chans = in_chans
        self.soft_split0, self.soft_split1, self.soft_split2 = (
            nn.Unfold(kernel_size=k, stride=s, padding=p) for k, s, p in soft_splits
        )
        layer = {"performer": TokenPerformer, "transformer": TokenTransformer}.get(tokens_type)
        if layer is None:
            raise ValueError(f"tokens_type must be 'performer' or 'transformer', got {tokens_type!r}")
        self.tokens_type = tokens_type
        self.attention1 = layer(in_chans * soft_splits[0][0] ** 2, token_dim)
        self.attention2 = layer(token_dim * soft_splits[1][0] ** 2, token_dim)
        self.project = nn.Linear(token_dim * soft_splits[2][0] ** 2, embed_dim)
        sizes = [self.img_size]
        for k, s, p in soft_splits:
            sizes.append(tuple((n + 2 * p - k) // s + 1 for n in sizes[-1]))
        if min(min(size) for size in sizes[1:]) < 1:
            raise ValueError(f"img_size {self.img_size} is too small for the soft splits {soft_splits}")
        self.split_sizes = sizes[1:]
        self.grid_size = sizes[-1]
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-3:]) != (self.in_chans, *self.img_size):
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit this model: it expects (B, {self.in_chans}, "
                f"{self.img_size[0]}, {self.img_size[1]}) images; resize the data or build the model with "
                f"img_size={tuple(x.shape[-2:])}"
            )
        x = self.attention1(self.soft_split0(x).transpose(1, 2))
        x = self.attention2(self.soft_split1(self._refold(x, self.split_sizes[0])).transpose(1, 2))
        return self.project(self.soft_split2(self._refold(x, self.split_sizes[1])).transpose(1, 2))

    @staticmethod
    def _refold(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Tokens (B, h·w, C) back to an image (B, C, h, w) for the next soft split."""
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *size)


class T2TViT(nn.Module):
    """T2T-ViT: the tokens-to-token module, then a ViT backbone of timm ``Block`` s with a class token.

    ``tokens_to_token`` is also reachable as ``patch_embed`` (the name the rest of the toolkit uses).

    Args:
        img_size: Input resolution, a multiple of 16.
        in_chans: Image channels.
        num_classes: Classes of the head (0: no head).
        tokens_type: T2T layers: ``"performer"`` (T2T-ViT) or ``"transformer"`` (T2T-ViT_t).
        token_dim: Width of the T2T layers.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: The backbone.
        qk_scale: Attention-logit scale of the backbone; ``None`` is ``head_dim ** -0.5``. The released
            T2T-ViT weights were trained with ``embed_dim ** -0.5``, which the registered models use.
        drop_rate: Dropout after the position embedding and inside the blocks.
        attn_drop_rate: Attention dropout.
        drop_path_rate: Stochastic depth, rising linearly to this over the blocks.
        soft_splits: (kernel, stride, padding) of the T2T module's three unfolds.
    """

    num_prefix_tokens = 1
    dynamic_class: type[DynamicT2TViT]

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        tokens_type: Literal["performer", "transformer"] = "performer",
        token_dim: int = 64,
        embed_dim: int = 384,
        depth: int = 14,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        soft_splits: tuple[tuple[int, int, int], ...] = SOFT_SPLITS,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.in_chans = in_chans
        self.tokens_to_token = TokensToToken(img_size, in_chans, embed_dim, token_dim, tokens_type, soft_splits)
        num_patches = self.tokens_to_token.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sinusoid_position_embedding(num_patches + 1, embed_dim), requires_grad=False)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rate,
                    # The official blocks use nn.LayerNorm (eps 1e-5); timm's Block defaults to 1e-6.
                    norm_layer=nn.LayerNorm,
                )
                for rate in rates
            ]
        )
        if qk_scale is not None:
            # Scaling q before attention keeps timm's fused kernel (which applies head_dim ** -0.5 itself).
            for block in self.blocks:
                block.attn.q_norm = Scale(qk_scale / block.attn.scale)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear)

    @property
    def patch_embed(self) -> TokensToToken:
        return self.tokens_to_token

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for ``num_classes`` (``global_pool`` is accepted for timm compatibility only)."""
        self.num_classes = num_classes
        device = self.cls_token.device
        self.head = nn.Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_linear)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """T2T tokens, class token and position code: the tokens the blocks see (B, 1 + N, C)."""
        x = self.tokens_to_token(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm (B, 1 + N, C)."""
        return self.norm(self.blocks(self.embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DynamicT2TViT(TokenPruning, T2TViT):
    """DynamicViT on T2T-ViT: keep predictors before ``pruning_loc`` blocks of the backbone.

    Pruning acts on the N tokens the T2T module produces (196 at 224). ``train()`` mode returns a
    :class:`~dynvit.models.StudentOutput` (final patch tokens for MSE distillation); ``eval()`` mode
    returns logits from the pruned forward.
    """

    @classmethod
    def check_convertible(cls, model: nn.Module) -> None:
        if not isinstance(model, T2TViT):
            raise TypeError(
                f"DynamicT2TViT converts a T2TViT (e.g. timm.create_model('t2t_vit_14')), got {type(model).__name__}"
            )


T2TViT.dynamic_class = DynamicT2TViT


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
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {name: _cfg() for name in ("t2t_vit_7", "t2t_vit_12", "t2t_vit_14", "t2t_vit_t_7", "t2t_vit_t_14")}
)


def _create_t2t(variant: str, pretrained: bool, **kwargs) -> T2TViT:
    if pretrained:
        raise ValueError(
            f"{variant} has no weights on the model hub: download the released T2T-ViT checkpoint and pass it "
            f"as create_teacher({variant!r}, checkpoint=path)"
        )
    # The released weights were trained with attention logits scaled by embed_dim ** -0.5.
    kwargs.setdefault("qk_scale", kwargs["embed_dim"] ** -0.5)
    return build_model_with_cfg(T2TViT, variant, pretrained=False, **kwargs)


_T2T_7 = dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0)
T2T_12_ARGS = dict(embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0)
T2T_14_ARGS = dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0)


@register_model
def t2t_vit_7(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-7 (Performer T2T layers): 7 blocks × 256, 4 heads, MLP 2 (4.3M parameters, 71.7 top-1)."""
    return _create_t2t("t2t_vit_7", pretrained, **dict(_T2T_7, tokens_type="performer", **kwargs))


@register_model
def t2t_vit_12(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-12 (Performer T2T layers): 12 blocks × 256, 4 heads, MLP 2 (6.9M parameters, 76.5 top-1)."""
    return _create_t2t("t2t_vit_12", pretrained, **dict(T2T_12_ARGS, tokens_type="performer", **kwargs))


@register_model
def t2t_vit_14(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-14 (Performer T2T layers): 14 blocks × 384, 6 heads, MLP 3 (21.5M parameters, 4.8 G, 81.5 top-1)."""
    return _create_t2t("t2t_vit_14", pretrained, **dict(T2T_14_ARGS, tokens_type="performer", **kwargs))


@register_model
def t2t_vit_t_7(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT_t-7 (plain-attention T2T layers): 7 blocks × 256, 4 heads, MLP 2."""
    return _create_t2t("t2t_vit_t_7", pretrained, **dict(_T2T_7, tokens_type="transformer", **kwargs))


@register_model
def t2t_vit_t_14(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT_t-14 (plain-attention T2T layers): 14 blocks × 384, 6 heads, MLP 3 (21.5M, 6.1 G, 81.7 top-1)."""
    return _create_t2t("t2t_vit_t_14", pretrained, **dict(T2T_14_ARGS, tokens_type="transformer", **kwargs))


__all__ = [
    "DynamicT2TViT",
    "Scale",
    "T2TViT",
    "TokenAttention",
    "TokenPerformer",
    "TokenTransformer",
    "TokensToToken",
    "sinusoid_position_embedding",
    "t2t_vit_12",
    "t2t_vit_14",
    "t2t_vit_7",
    "t2t_vit_t_14",
    "t2t_vit_t_7",
]
