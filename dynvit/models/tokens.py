"""Token operations every reducer and student shares: gather, index → mask, weighted pooling, bipartite
matching and merging (with sizes, anchors and sources), prefix-token handling, and one location check.

Conventions: tokens are (B, M, C) with the P prefix tokens (class, distillation, register tokens) in
front; an *index* (B, n) gives, for each of the n non-prefix tokens, the original patch it is (or, for a
merged token, the patch it kept its place from); tokens that are no original patch (EViT's fused token,
ATS padding) carry the index N, the number of patches, which every mask drops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Batched ``x[b, index[b]]`` for tokens x (B, N, C) and indices (B, K): one kernel, no loop."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def select_tokens(x: torch.Tensor, pos: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """The P prefix tokens of x (B, P + n, C), then the non-prefix tokens at positions ``pos`` (B, k) among the n."""
    return torch.cat([x[:, :num_prefix], gather_tokens(x[:, num_prefix:], pos)], dim=1)


def index_to_mask(index: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Boolean mask (B, N) of the original patches named in ``index`` (B, K); the index N names none."""
    # One spare column takes the "no original patch" index, then goes.
    mask = torch.zeros(index.shape[0], num_patches + 1, dtype=torch.bool, device=index.device)
    return mask.scatter_(1, index, True)[:, :num_patches]


def weighted_mean(x: torch.Tensor, weight: torch.Tensor, min_total: float | None = None) -> torch.Tensor:
    """Mean of tokens x (B, N, C) weighted by ``weight`` (B, N) → (B, C): ToMe's size-weighted pool, and
    DynamicViT's mean over kept tokens (weight = the keep mask). ``min_total`` keeps an all-zero weight finite."""
    weight = weight.unsqueeze(-1).to(x.dtype)
    total = weight.sum(dim=1)
    return (x * weight).sum(dim=1) / (total if min_total is None else total.clamp_min(min_total))


def key_bias(weights: torch.Tensor) -> torch.Tensor:
    """Per-key additive attention bias (B, N) → (B, 1, 1, N), broadcast over heads and queries."""
    return weights[:, None, None, :]


def log_sizes(sizes: torch.Tensor) -> torch.Tensor:
    """``log(sizes)``, ``-inf`` where a size is 0, with a zero gradient there: plain ``sizes.log()`` gives the
    gradient ``inf · 0 = NaN`` at 0 (a DTEM token that gave all of itself away in training)."""
    return sizes.clamp_min(torch.finfo(sizes.dtype).tiny).log().masked_fill(sizes == 0, float("-inf"))


def embed_tokens(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``VisionTransformer``'s way from images to the tokens its blocks see: patch embedding, prefix
    tokens and position embedding, patch dropout, pre-norm."""
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))


def validate_loc(pruning_loc: Sequence[int], depth: int, name: str = "pruning_loc") -> tuple[int, ...]:
    """The block indices as a tuple; ``ValueError`` unless they are integers, at least one, strictly
    increasing and inside a ``depth``-block model."""
    if not isinstance(pruning_loc, Sequence) or isinstance(pruning_loc, str):
        raise ValueError(f"{name} must be a sequence of block indices, e.g. [3, 6, 9], got {pruning_loc!r}")
    locs = tuple(pruning_loc)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in locs):
        raise ValueError(f"{name} must hold integer block indices, got {locs}")
    if not locs:
        raise ValueError(f"{name} is empty: give at least one block index, e.g. (3, 6, 9)")
    if any(b <= a for a, b in zip(locs, locs[1:], strict=False)):
        raise ValueError(f"{name} must be strictly increasing, got {locs}")
    if locs[0] < 0 or locs[-1] >= depth:
        raise ValueError(f"{name} {locs} must index blocks 0..{depth - 1} of this {depth}-block model")
    return locs


# --- bipartite soft matching (ToMe) ------------------------------------------------------------------------


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
    merged = torch.cat([gather_tokens(a, plan.unmerged), b], dim=1)
    # Added in place onto the copy of B that the cat made: the same sums as b.scatter_add, one copy fewer.
    dst = plan.dst.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    merged[:, plan.unmerged.shape[1] :].scatter_add_(1, dst, gather_tokens(a, plan.src))
    return merged


def writes_out(*inputs: torch.Tensor) -> bool:
    """Whether an op on ``inputs`` may write into a preallocated tensor (``out=``), saving a copy: in eager
    mode with no gradient to record. Autograd takes no ``out=``, and torch.compile and export break their graph
    at an ``out=`` into a view (and fuse the copy themselves), so there the copying form is used: the same
    values."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))


def merge_weighted(plan: MergePlan, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge of tokens x (B, N, C) with sizes (B, N, 1); returns both, merged."""
    # Sum x·size and size in one pass (size rides along as an extra channel), then divide; where allowed the
    # product is written straight into the wider tensor, where a cat would copy every token once more.
    if not writes_out(x, size):
        weighted = torch.cat([x * size, size], dim=-1)
    else:
        weighted = x.new_empty(*x.shape[:-1], x.shape[-1] + 1)
        torch.mul(x, size, out=weighted[..., :-1])
        weighted[..., -1:] = size
    merged = merge_sum(plan, weighted)
    size = merged[..., -1:]
    return merged[..., :-1] / size, size


def merge_index(plan: MergePlan, index: torch.Tensor) -> torch.Tensor:
    """The index (B, N) of each token after the plan (B, N - r): a B token that absorbs A tokens keeps its
    own place, as does every unmerged token; the merged-away A tokens leave."""
    return torch.cat([torch.gather(index[:, ::2], 1, plan.unmerged), index[:, 1::2]], dim=1)


def merge_sources(plan: MergePlan, sources: torch.Tensor) -> torch.Tensor:
    """Which original tokens (B, N - r, S) each token stands for after the plan, from ``sources`` (B, N, S) bool:
    a B token then stands for its own and those of the A tokens merged into it."""
    return merge_sum(plan, sources.to(torch.uint8)) > 0


def top_indices(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest keys of each row of ``keys`` (B, N), largest first, equal keys in index order.

    One tie rule for eager PyTorch and an exported graph, so that both keep the same tokens when keys tie
    at the cut (a freshly initialised keep predictor scores tokens within ~1e-6 of each other, often
    exactly equal): ``torch.topk`` returns equal keys in no fixed order on the CPU, so eager mode sorts
    stably; a stable sort has no ONNX function (torch 2.15), so while exporting ``torch.topk`` is used,
    which becomes ONNX ``TopK``, whose specification puts equal values in index order.
    """
    if torch.compiler.is_exporting():
        return torch.topk(keys, k, dim=1).indices
    return torch.argsort(keys, dim=1, descending=True, stable=True)[:, :k]


__all__ = [
    "top_indices",
    "MergePlan",
    "bipartite_soft_matching",
    "embed_tokens",
    "gather_tokens",
    "index_to_mask",
    "key_bias",
    "log_sizes",
    "max_merges",
    "merge_index",
    "merge_sources",
    "merge_sum",
    "merge_weighted",
    "writes_out",
    "select_tokens",
    "validate_loc",
    "weighted_mean",
]
