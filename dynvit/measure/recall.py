"""Kept-token recall: how much of the object a pruned model still looks at after each stage."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def kept_token_recall(keep: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of each image's object patches that ``keep`` still holds.

    Args:
        keep: Kept patches (B, N), bool, over the original patch grid (e.g. one stage of
            ``DynamicViT.predict_with_masks``).
        target: The object's patches (B, N), bool or 0/1 (e.g. the cluttered digits' patch mask).

    Returns:
        Recall in [0, 1] for every image that has at least one object patch, shape (B',) with
        B' <= B; images without an object are left out rather than counted as 0 or 1.
    """
    if keep.shape != target.shape or keep.ndim != 2:
        raise ValueError(
            f"keep mask {tuple(keep.shape)} and object mask {tuple(target.shape)} must both be (B, N) over the "
            "same patch grid"
        )
    keep, target = keep.bool(), target.bool()
    has_object = target.any(dim=1)
    recall = (keep & target).sum(dim=1) / target.sum(dim=1).clamp_min(1)
    return recall[has_object]


def stage_recall(masks: Sequence[torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
    """:func:`kept_token_recall` for every stage's keep mask: one (B',) tensor per stage."""
    return [kept_token_recall(mask, target) for mask in masks]


def source_purity(sources: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of each image's object patches that sit in object-majority tokens, for tokens standing for sets of
    patches (merges, clusters).

    A token is object-majority when strictly more than half of the patches it stands for are object patches:
    1 when no object patch is merged into a mostly-background token, lower as the object is absorbed into
    background.

    Args:
        sources: Which original patches each token stands for (B, M, N), bool (e.g. ``predict_with_sources``).
        target: The object's patches (B, N), bool or 0/1.

    Returns:
        Purity in [0, 1] for every image with at least one object patch (B',), as :func:`kept_token_recall`.
    """
    if sources.ndim != 3 or sources.shape[::2] != target.shape:
        raise ValueError(
            f"sources {tuple(sources.shape)} must be (B, M, N) over the patch grid of the object mask {tuple(target.shape)}"
        )
    target = target.bool()
    size = sources.sum(dim=-1)
    inside = (sources & target.unsqueeze(1)).sum(dim=-1)
    pure = (inside * (2 * inside > size)).sum(dim=1)
    has_object = target.any(dim=1)
    return (pure / target.sum(dim=1).clamp_min(1))[has_object]
