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
