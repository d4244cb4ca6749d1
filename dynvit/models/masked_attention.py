"""Attention with a multiplicative keep mask inside the softmax (DynamicViT training).

In training the student keeps every token and *masks* dropped ones instead, so shapes stay fixed
and the straight-through Gumbel decisions receive gradients through attention. An additive
``-inf`` mask would give the same forward but no gradient to the mask, hence the explicit formula.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Attention, Block

MASK_EPS = 1e-6


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor, eps: float = MASK_EPS) -> torch.Tensor:
    """Softmax over keys where query i sees key j only if ``keep[j] = 1`` or ``j = i``.

    Computed in float32 for stability at any input dtype:
    ``w_ij = exp(a_ij - max_j a_ij) * M_ij``, ``p_ij = (w_ij + eps / N) / (sum_j w_ij + eps)``.

    Args:
        scores: Attention logits (B, H, N, N).
        keep: Keep mask (B, N) in [0, 1], differentiable.
    Returns:
        Attention weights (B, H, N, N) in float32.
    """
    n = scores.shape[-1]
    keep = keep.float()[:, None, None, :]
    eye = torch.eye(n, dtype=keep.dtype, device=keep.device)
    # A dropped token still attends to itself so its row stays a valid distribution.
    allowed = keep + (1.0 - keep) * eye
    scores = scores.float()
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp() * allowed
    return (weights + eps / n) / (weights.sum(dim=-1, keepdim=True) + eps)


class MaskedAttention(Attention):
    """timm's ``Attention`` plus a keep-masked path; without a mask it is timm's fused attention."""

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if keep is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = masked_softmax((q * self.scale) @ k.transpose(-2, -1), keep)
        x = self.attn_drop(attn).to(v.dtype) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class MaskedBlock(Block):
    """timm's ``Block`` whose attention can take a keep mask (B, N)."""

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if keep is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), keep=keep)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def make_block_maskable(block: Block) -> None:
    """Swap a timm ``Block`` (and its ``Attention``) to the maskable subclasses, in place."""
    if type(block) is not Block or type(block.attn) is not Attention:
        raise TypeError(
            f"DynamicViT needs timm's plain Block/Attention, got {type(block).__name__}/"
            f"{type(block.attn).__name__}; pick a ViT built from timm.models.vision_transformer.Block"
        )
    block.__class__ = MaskedBlock
    block.attn.__class__ = MaskedAttention


__all__ = ["MASK_EPS", "MaskedAttention", "MaskedBlock", "make_block_maskable", "masked_softmax"]
