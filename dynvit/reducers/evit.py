"""EViT (Liang et al., "Not All Patches are What You Need", ICLR 2022) and its fusion-free variant, top-k.

At chosen blocks, between attention and MLP, the non-class tokens are ranked by the class token's
attention (mean over heads) in that block; the top ``ceil(keep_rate · n)`` of the n current ones
stay and the MLP runs on them. EViT also fuses the dropped tokens into one token appended after the
kept ones, ``Σ_dropped a_i x_i`` with a the head-averaged class attention as the softmax gave it (not
renormalised over the dropped set: the official ``youweiliang/evit`` code); at a later stage that fused
token is ranked like any other (and fused again if dropped). ``fusion="dynvit_mean"`` fuses the
attention-weighted *mean* instead (dynvit's earlier variant, kept as an option). Top-k just drops them.
No parameters are added; EViT is meant to be fine-tuned, top-k is used training-free. Prefix tokens
(distillation, register tokens) are kept like the class token; a ViT without a class token is refused,
since the method ranks by its attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dynvit.models.dynamic_vit import gather_tokens
from dynvit.reducers.base import ReducedRun, SelectionViT, validate_loc, validate_rate

# How EViT fuses the dropped tokens: the official sum weighted by raw class attention, or dynvit's
# attention-weighted mean (the same weights renormalised to sum to 1 over the dropped tokens).
FUSIONS = ("official", "dynvit_mean")


def attentive_count(keep_rate: float, num_tokens: int) -> int:
    """Tokens kept out of ``num_tokens``: ``ceil(keep_rate · num_tokens)``, so at least one stays.

    The float product as the official EViT takes it (``math.ceil(keep_rate * (N - 1))``), float noise
    included: 0.55 · 100 is 55.00000000000001, so 56 of 100 tokens stay, as there.
    """
    return math.ceil(keep_rate * num_tokens)


def keep_attentive(
    x: torch.Tensor, cls_attn: torch.Tensor, keep: int, fusion: str | None, num_prefix: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``keep`` non-prefix tokens the class token attends to most; optionally fuse the rest.

    Args:
        x: Tokens (B, P + n, C), the P prefix tokens (class token first) in front.
        cls_attn: The class token's attention over the same tokens (B, P + n), averaged over heads.
        keep: Non-prefix tokens to keep, 1..n. ``keep = n`` returns x unchanged (nothing to fuse).
        fusion: ``None`` drops the rest; ``"official"`` appends ``Σ_dropped a_i x_i`` (EViT's token,
            raw attention weights); ``"dynvit_mean"`` appends the attention-weighted mean of the dropped.
        num_prefix: P, the tokens always kept.
    Returns:
        The new tokens (B, P + keep [+ 1], C) — prefix tokens, kept ones in their original order, fused
        one — and the positions (B, keep) of the kept tokens among the n non-prefix ones.
    """
    if fusion is not None and fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS} or None, got {fusion!r}")
    tokens, scores = x[:, num_prefix:], cls_attn[:, num_prefix:]
    n = tokens.shape[1]
    if keep >= n:
        return x, torch.arange(n, device=x.device).expand(x.shape[0], -1)
    top = scores.topk(keep, dim=1).indices.sort(dim=1).values
    parts = [x[:, :num_prefix], gather_tokens(tokens, top)]
    if fusion is not None:
        weight = scores.scatter(1, top, 0.0)  # attention of the dropped tokens, zero on the kept
        if fusion == "dynvit_mean":
            weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
        parts.append((weight.unsqueeze(-1) * tokens).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1), top


def attentive_schedule(
    num_patches: int, depth: int, keep_rate: float, pruning_loc: Sequence[int], fuse: bool, num_prefix: int = 1
) -> list[tuple[int, int]]:
    """Tokens (prefix tokens included) in attention and MLP of every block for EViT / top-k."""
    counts, n = [], num_patches
    for i in range(depth):
        before = n
        if i in pruning_loc:
            keep = attentive_count(keep_rate, n)
            n = keep + (fuse and keep < n)
        counts.append((before + num_prefix, n + num_prefix))
    return counts


class AttentiveViT(SelectionViT):
    """A timm ViT that keeps the class token's most attended tokens at ``pruning_loc`` blocks.

    Build with ``apply_reducer(vit, "evit", keep_rate=0.7)`` or ``"topk"``.
    """

    fusion: str | None = None  # EViT's fused token (see FUSIONS); None drops the rest
    needs_class_token = True

    @property
    def fuse(self) -> bool:
        """Whether the dropped tokens are fused into one extra token."""
        return self.fusion is not None

    def configure(self, keep_rate: float = 0.7, pruning_loc: Sequence[int] | None = None) -> None:
        """Args:
        keep_rate: Fraction in (0, 1] of the current non-class tokens kept at each stage (rounded up).
        pruning_loc: Blocks in which tokens are reduced, after attention; by default DynamicViT's
            stage blocks (3, 6, 9 for a 12-block ViT, EViT's 4th, 7th and 10th).
        """
        validate_rate("keep_rate", keep_rate)
        loc = self.default_loc() if pruning_loc is None else tuple(pruning_loc)
        validate_loc(loc, len(self.blocks), self.num_patches)
        self.keep_rate, self.pruning_loc = float(keep_rate), loc

    def token_schedule(self) -> list[tuple[int, int]]:
        return attentive_schedule(
            self.num_patches, len(self.blocks), self.keep_rate, self.pruning_loc, self.fuse, self.num_prefix_tokens
        )

    def run_blocks(self, x: torch.Tensor) -> ReducedRun:
        B = x.shape[0]
        # Original patch index of each non-class token; the fused token gets num_patches.
        index = torch.arange(self.num_patches, device=x.device).expand(B, -1)
        kept, n = [], self.num_patches  # n: current non-class tokens, a Python int even under jit tracing
        for i, block in enumerate(self.blocks):
            if i not in self.pruning_loc:
                x = block(x)
                continue
            x, stats = block.attend(x, cls_attn=True)
            keep = attentive_count(self.keep_rate, n)
            x, top = keep_attentive(x, stats.cls_attn.mean(dim=1), keep, self.fusion, self.num_prefix_tokens)
            index = torch.gather(index, 1, top)
            fused = self.fuse and keep < n  # nothing dropped, nothing to fuse
            if fused:
                index = torch.cat([index, index.new_full((B, 1), self.num_patches)], dim=1)
            n = keep + fused
            kept.append(index)
            x = block.feed_forward(x)
        counts = torch.tensor(self.token_schedule(), device=x.device).expand(B, -1, -1)
        return ReducedRun(tokens=x, kept=kept, counts=counts)


class EViT(AttentiveViT):
    """EViT: :class:`AttentiveViT` plus one fused token made of the dropped ones."""

    method = "evit"

    def configure(
        self, keep_rate: float = 0.7, pruning_loc: Sequence[int] | None = None, fusion: str = "official"
    ) -> None:
        """Args:
        keep_rate, pruning_loc: As :meth:`AttentiveViT.configure`.
        fusion: ``"official"``: the fused token is ``Σ_dropped a_i x_i`` with the raw head-averaged class
            attention a, as the official EViT; ``"dynvit_mean"``: the a-weighted mean of the dropped tokens
            (dynvit's variant, docs/reference.md "Fidelity").
        """
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        super().configure(keep_rate, pruning_loc)
        self.fusion = fusion


class TopKViT(AttentiveViT):
    """Attention top-k: EViT's selection without the fused token, training-free."""

    method = "topk"


__all__ = [
    "FUSIONS",
    "AttentiveViT",
    "EViT",
    "TopKViT",
    "attentive_count",
    "attentive_schedule",
    "keep_attentive",
]
