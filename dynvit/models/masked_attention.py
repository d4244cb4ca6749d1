"""Attention with a multiplicative keep mask inside the softmax (DynamicViT training).

In training the student keeps every token and *masks* dropped ones instead, so shapes stay fixed
and the straight-through Gumbel decisions receive gradients through attention. An additive
``-inf`` mask would give the same forward but no gradient to the mask, hence the explicit formula.
:class:`MaskedAttention` computes it with :func:`~dynvit.models.masked_attention_function.masked_attention`,
which keeps no N×N tensor for backward; :func:`masked_softmax` is the plain formula it is tested against.
"""

from __future__ import annotations

import torch
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import Attention, Block
from torch import nn

from dynvit.models.attention_kernel import attend, planned_kernel
from dynvit.models.masked_attention_function import KEEP_GRADIENTS, MASK_EPS, check_keep_gradient, masked_attention


def masked_softmax(
    scores: torch.Tensor, keep: torch.Tensor, eps: float = MASK_EPS, attend_self: bool = True
) -> torch.Tensor:
    """Softmax over keys where query i sees key j only if ``keep[j] = 1`` (or ``j = i``).

    Computed in float32 for stability at any lower input dtype (float64 stays float64):
    ``w_ij = exp(a_ij - max_j a_ij) * M_ij``, ``p_ij = (w_ij + eps / N) / (sum_j w_ij + eps)``.

    Args:
        scores: Attention logits (B, H, Q, N); Q = N for self-attention.
        keep: Keep mask (B, N) in [0, 1], differentiable.
        attend_self: Let query i always see key i (self-attention, Q = N). Off for queries that are
            not tokens of the sequence, such as an attention pool's latent query.
    Returns:
        Attention weights (B, H, Q, N) in float32 (float64 for float64 scores).
    """
    n = scores.shape[-1]
    dtype = torch.promote_types(scores.dtype, torch.float32)
    keep = keep.to(dtype)[:, None, None, :]
    allowed = keep
    if attend_self:
        # A dropped token still attends to itself so its row stays a valid distribution.
        allowed = keep + (1.0 - keep) * torch.eye(n, dtype=dtype, device=keep.device)
    scores = scores.to(dtype)
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp() * allowed
    return (weights + eps / n) / (weights.sum(dim=-1, keepdim=True) + eps)


def attention_inputs(
    attn: Attention, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """timm ``Attention``'s queries, keys and values (B, H, N, head_dim) of x (B, N, C), q/k norms applied,
    and its output gate (None without one): what every attention variant here starts from."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v, gate


def attention_output(attn: Attention, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """timm ``Attention``'s way from the heads' outputs x (B, H, N, head_dim) to its output (B, N, C)."""
    B, _, N, _ = x.shape
    x = attn.norm(x.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x))


class KernelAttention(Attention):
    """timm's ``Attention`` whose fused path runs the kernel :func:`~dynvit.models.attention_kernel.attend`
    picks for its shape (SDPA or the explicit math); masks, causal attention and unfused layers stay timm's."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal or not self.fused_attn:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        shape = torch.Size((B, self.num_heads, N, self.head_dim))
        # Parameters, not .weight: a quantized qkv (torch.ao's dynamic Linear) has a weight() method instead.
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.qkv.parameters())
        )
        if planned_kernel(shape, shape, x.dtype, x.device, needs_grad) == "sdpa":
            # timm's own forward, nothing added: at batch 1 a block is dispatch-bound.
            return super().forward(x)
        q, k, v, gate = attention_inputs(self, x)
        x = attend(q, k, v, self.scale, dropout_p=self.attn_drop.p if self.training else 0.0)
        return attention_output(self, x, gate)


class MaskedAttention(KernelAttention):
    """timm's ``Attention`` plus a keep-masked path; without a mask it is timm's attention on the kernel
    :class:`KernelAttention` picks.

    With a mask it runs :func:`~dynvit.models.masked_attention_function.masked_attention`, which
    recomputes the attention weights in backward instead of storing them. Setting ``recompute =
    False`` (see :func:`set_recompute`) selects the plain autograd formula instead, which keeps the
    float32 (B, H, N, N) intermediates; so does attention dropout in training, which needs them.
    ``keep_gradient`` (see :func:`set_keep_gradient`) picks the gradient the keep mask receives.
    """

    recompute: bool = True
    keep_gradient: str = "tangent"

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if keep is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        q, k, v, gate = attention_inputs(self, x)
        if self.recompute and not (self.training and self.attn_drop.p > 0):
            x = masked_attention(q, k, v, keep, self.scale, keep_gradient=self.keep_gradient)
        elif self.keep_gradient != "tangent":
            raise ValueError(
                f"keep_gradient={self.keep_gradient!r} is computed by the recomputing masked attention only: "
                "call set_recompute(model, True) and build the model with attn_drop_rate=0"
            )
        else:
            attn = masked_softmax((q * self.scale) @ k.transpose(-2, -1), keep)
            x = self.attn_drop(attn).to(v.dtype) @ v
        return attention_output(self, x, gate)


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


class MaskedAttentionPool(AttentionPoolLatent):
    """timm's attention pool (``global_pool='map'``) whose keys can take a keep mask (B, N).

    The latent query sees key j with weight ``keep_j`` inside the softmax, as :func:`masked_softmax`
    computes it for the blocks: a dropped token then adds nothing to the pooled feature, and the
    predictors get a gradient through the pool too (an additive ``-inf`` mask would give them none).
    Without a mask it is timm's pool.
    """

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        if keep is None:
            return super().forward(x, attn_mask=attn_mask)
        B, N, C = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, self.latent_len, self.num_heads, self.head_dim)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q.transpose(1, 2)), self.k_norm(k)
        attn = masked_softmax((q * self.scale) @ k.transpose(-2, -1), keep, attend_self=False)
        x = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(B, self.latent_len, C)
        x = self.proj_drop(self.proj(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm(x))
        if self.pool == "token":
            return x[:, 0]
        return x.mean(1) if self.pool == "avg" else x


def make_pool_maskable(pool: nn.Module) -> None:
    """Swap timm's ``AttentionPoolLatent`` to :class:`MaskedAttentionPool`, in place."""
    if type(pool) is not AttentionPoolLatent or pool.pos_embed is not None:
        # A position embedding of the pool's own would need every token in its place.
        raise TypeError(
            f"DynamicViT masks timm's AttentionPoolLatent without a position embedding, got {type(pool).__name__}"
        )
    pool.__class__ = MaskedAttentionPool


def make_block_maskable(block: Block) -> None:
    """Swap a timm ``Block`` (and its ``Attention``) to the maskable subclasses, in place."""
    if type(block) is not Block or type(block.attn) is not Attention:
        raise TypeError(
            f"DynamicViT needs timm's plain Block/Attention, got {type(block).__name__}/"
            f"{type(block.attn).__name__}; pick a ViT built from timm.models.vision_transformer.Block"
        )
    block.__class__ = MaskedBlock
    block.attn.__class__ = MaskedAttention


def set_keep_gradient(model: nn.Module, mode: str) -> int:
    """Choose the gradient every :class:`MaskedAttention` in ``model`` gives its keep mask; returns how
    many layers were set (``ValueError`` for a mode other than the tangent on a model with none).

    ``"tangent"`` (the reference) is the derivative at the hard 0/1 decision. ``"secant"`` gives a
    dropped key j the slope of the line from keep_j = 0 to keep_j = 1 instead: for a loss linear in
    the attention output it is exactly the change that keeping j would make, so it stays bounded.
    The tangent at keep_j = 0 scales with ``exp(s_ij) / Σ_kept exp(s_ik)``, which on peaked attention
    (one dropped key far above every kept one) reaches 1e5 and drowns the keep-ratio loss. Kept keys
    get the same gradient either way.
    """
    check_keep_gradient(mode)
    layers = [m for m in model.modules() if isinstance(m, MaskedAttention)]
    if not layers and mode != "tangent":
        raise ValueError(
            f"keep_gradient={mode!r} acts in masked attention, which {type(model).__name__} does not have: "
            "leave it at 'tangent'"
        )
    for layer in layers:
        layer.keep_gradient = mode
    return len(layers)


def set_recompute(model: nn.Module, enabled: bool) -> int:
    """Choose, for every :class:`MaskedAttention` in ``model``, the recomputing Function (``True``,
    the default) or the plain autograd formula (``False``). Returns how many layers were set."""
    layers = [m for m in model.modules() if isinstance(m, MaskedAttention)]
    for layer in layers:
        layer.recompute = enabled
    return len(layers)


__all__ = [
    "KEEP_GRADIENTS",
    "MASK_EPS",
    "KernelAttention",
    "MaskedAttention",
    "MaskedAttentionPool",
    "MaskedBlock",
    "attention_inputs",
    "attention_output",
    "make_block_maskable",
    "make_pool_maskable",
    "masked_attention",
    "masked_softmax",
    "set_keep_gradient",
    "set_recompute",
]
