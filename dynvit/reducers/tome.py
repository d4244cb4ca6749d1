"""ToMe: token merging by bipartite soft matching (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

In every block, between attention and MLP, the tokens are split alternately into sets A and B;
each A token is linked to its most similar B token (cosine similarity of the attention keys, mean
over heads) and the ``r`` most similar links are merged by size-weighted averaging. Sizes (how many
patches a token stands for) are tracked, and attention adds ``log(size)`` to its logits
("proportional attention") so a merged token keeps the weight of the tokens it replaced. Prefix
tokens are never merged: the last of them (the class token of a plain ViT) is the first token of set
A, protected as in ToMe, and any before it (a distilled DeiT's class token, all registers but the last)
stay out of the matching; a ViT without prefix tokens merges all of them, as ToMe does. Average and
attention pools weigh tokens by size. Training-free on a trained ViT; fine-tunes like the plain model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from dynvit.models.dynamic_vit import gather_tokens
from dynvit.reducers.base import ReducedRun, ReducedViT, key_bias


class MergePlan(NamedTuple):
    """Which tokens of a (B, N, ·) sequence merge where, as found by :func:`bipartite_soft_matching`.

    Indices are into set A (even positions) and set B (odd positions) of the sequence.

    Attributes:
        unmerged: A tokens that stay (B, |A| - r), ascending, so the class token stays first.
        src: A tokens merged away (B, r).
        dst: The B token each of them merges into (B, r).
    """

    unmerged: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor


def max_merges(num_patches: int) -> int:
    """Most tokens one bipartite matching can merge with the class token protected: every non-class
    A token at most once, i.e. ``num_patches // 2``."""
    return num_patches // 2


def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_first: bool = True) -> MergePlan:
    """Pick the ``r`` most similar (A, B) pairs; token 0 (the class token) is never merged unless
    ``protect_first`` is False (a ViT without a class token).

    Args:
        metric: One vector per token (B, N, D), e.g. the attention keys averaged over heads.
        r: Tokens to merge, at most ``max_merges(N - protect_first)``.
    """
    patches = metric.shape[1] - int(protect_first)  # int: under jit tracing the shape is a tensor
    if not 0 <= r <= max_merges(patches):
        raise ValueError(f"r={r} merges are impossible among {patches} patch tokens")
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-2, -1)
    if protect_first:
        scores[:, 0] = -float("inf")  # the class token (A's first) never finds a partner
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src = order[:, :r]
    return MergePlan(unmerged=order[:, r:].sort(dim=-1).values, src=src, dst=torch.gather(partner, 1, src))


def merge_sum(plan: MergePlan, x: torch.Tensor) -> torch.Tensor:
    """Apply a plan by summing: merged-away A rows are added onto their B partners.

    Returns (B, N - r, C): the unmerged A tokens, then all B tokens.
    """
    a, b = x[:, ::2], x[:, 1::2]
    b = b.scatter_add(1, plan.dst.unsqueeze(-1).expand(-1, -1, x.shape[-1]), gather_tokens(a, plan.src))
    return torch.cat([gather_tokens(a, plan.unmerged), b], dim=1)


def merge_weighted(plan: MergePlan, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge of tokens x (B, N, C) with sizes (B, N, 1); returns both, merged."""
    # Sum x·size and size in one pass (size rides along as an extra channel), then divide.
    merged = merge_sum(plan, torch.cat([x * size, size], dim=-1))
    size = merged[..., -1:]
    return merged[..., :-1] / size, size


def merge_schedule(num_patches: int, depth: int, r: int | Sequence[int]) -> list[int]:
    """Merges actually made in each block: ``r`` (per block if a sequence), capped where fewer than
    ``2 r`` patch tokens remain, as in ToMe (each A token merges at most once).

    Raises:
        ValueError: r is negative, not an integer, of the wrong length, or more than even the first
            block can merge (``num_patches // 2``).
    """
    rs = [r] * depth if isinstance(r, int) else list(r)
    if len(rs) != depth or any(isinstance(v, bool) or not isinstance(v, int) for v in rs):
        raise ValueError(f"r must be an int or {depth} ints (one per block), got {r!r}")
    if any(v < 0 for v in rs):
        raise ValueError(f"r must be >= 0, got {r!r}")
    if any(v > max_merges(num_patches) for v in rs):
        raise ValueError(
            f"r={r!r} asks one block to merge more than the {max_merges(num_patches)} that bipartite matching "
            f"can merge among {num_patches} patch tokens: use r <= {max_merges(num_patches)}"
        )
    merges, patches = [], num_patches
    for v in rs:
        merges.append(min(v, max_merges(patches)))
        patches -= merges[-1]
    return merges


class ToMeViT(ReducedViT):
    """A timm ViT that merges tokens in every block (ToMe). Build with ``apply_reducer(vit, "tome", r=13)``."""

    method = "tome"

    def configure(self, r: int | Sequence[int] = 13, prop_attn: bool = True) -> None:
        """Args:
        r: Tokens merged per block (an int for all blocks, or one per block); capped where fewer than
            ``2 r`` patch tokens are left (see :func:`merge_schedule`). ``r=0`` is the unmodified model.
        prop_attn: Add ``log(size)`` to the attention logits (proportional attention).
        """
        self.merges = merge_schedule(self.num_patches, len(self.blocks), r)
        self.r = r
        self.prop_attn = bool(prop_attn)

    def token_schedule(self) -> list[tuple[int, int]]:
        counts, n = [], self.num_patches + self.num_prefix_tokens
        for m in self.merges:
            counts.append((n, n - m))
            n -= m
        return counts

    def run_blocks(self, x: torch.Tensor) -> ReducedRun:
        x, size = self._merge_through(x)
        counts = torch.tensor(self.token_schedule(), device=x.device).expand(x.shape[0], -1, -1)
        return ReducedRun(tokens=x, kept=[], counts=counts, sizes=None if size is None else size.squeeze(-1))

    @torch.no_grad()
    def sizes_per_block(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Tokens and their sizes (B, M, 1) after every block, for images x: to inspect the merging."""
        steps: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._merge_through(self.embed(x), record=steps)
        return [(t, s if s is not None else t.new_ones(*t.shape[:2], 1)) for t, s in steps]

    def _merge_through(self, x: torch.Tensor, record: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens through all blocks and their sizes (B, M, 1), None while nothing merged; ``record``
        collects (tokens, sizes or None) after each block."""
        size = None  # all ones until the first merge; no bias until then, so r=0 is the plain model
        # Prefix tokens before the last one never enter the matching; the last one is A's protected first.
        held = max(self.num_prefix_tokens - 1, 0)
        for block, r in zip(self.blocks, self.merges, strict=True):
            if size is None and r == 0:
                x = block(x)
            else:
                bias = key_bias(size.squeeze(-1).log()) if size is not None and self.prop_attn else None
                x, stats = block.attend(x, bias=bias)
                if r:
                    size = x.new_ones(*x.shape[:2], 1) if size is None else size
                    plan = bipartite_soft_matching(stats.keys.mean(dim=1)[:, held:], r, self.num_prefix_tokens > 0)
                    merged, merged_size = merge_weighted(plan, x[:, held:], size[:, held:])
                    x, size = torch.cat([x[:, :held], merged], dim=1), torch.cat([size[:, :held], merged_size], dim=1)
                x = block.feed_forward(x)
            if record is not None:
                record.append((x, size))
        return x, size


__all__ = [
    "MergePlan",
    "ToMeViT",
    "bipartite_soft_matching",
    "max_merges",
    "merge_schedule",
    "merge_sum",
    "merge_weighted",
]
