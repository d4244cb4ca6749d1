"""Accuracy, kept-token recall and merge purity of any registered model on a validation loader.

What a model reports (:func:`~dynvit.models.contract.reports`: its registry entry's declaration) decides
what is scored: every model gives logits (top-1); a model that reports kept-token masks
(:class:`~dynvit.models.contract.MaskReporting`) gets recall per stage, and one whose tokens stand for sets
of patches (:class:`~dynvit.models.contract.SourceReporting`) gets purity, both when the batches carry the
object's patch mask ``(x, y, patch_mask)``; a clustering model (:class:`~dynvit.models.contract.AssignmentReporting`)
gets the purity of its last stage's clusters. Benchmark and sweep score every
row of one table here, on the same images (:class:`LimitedLoader`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from dynvit.measure.recall import source_purity, stage_recall
from dynvit.measure.throughput import model_dtype
from dynvit.models.contract import reports
from dynvit.reducers.clustering import cluster_purity, patch_assignment, stage_tokens


class LimitedLoader:
    """The first batches of a loader, as Lightning's ``limit_val_batches`` picks them, every time it is iterated.

    Args:
        loader: Validation batches.
        limit: Lightning's setting: an int is a number of batches, a float in [0, 1] a fraction of the
            loader's length (rounded down); None or 1.0 keeps them all.

    Raises:
        ValueError: a fraction that leaves no batch (as Lightning refuses it), or a limit out of range.
    """

    def __init__(self, loader: Iterable, limit: int | float | None = None) -> None:
        if isinstance(limit, bool) or (limit is not None and not isinstance(limit, int | float)):
            raise TypeError(f"limit must be an int, a float or None, got {limit!r}")
        if isinstance(limit, float) and not 0.0 <= limit <= 1.0:
            raise ValueError(f"a fractional limit must be in [0, 1], got {limit}")
        if isinstance(limit, int) and limit < 0:
            raise ValueError(f"limit must be >= 0 batches, got {limit}")
        self.loader = loader
        if isinstance(limit, float):
            batches = int(len(loader) * limit)  # Lightning's rounding
            if batches == 0 and limit > 0:
                raise ValueError(
                    f"a limit of {limit} of {len(loader)} validation batches leaves none: use at least {1 / len(loader):g}"
                )
            limit = None if limit == 1.0 else batches
        self.limit = limit

    def __iter__(self) -> Iterator:
        return iter(self.loader) if self.limit is None else itertools.islice(self.loader, self.limit)

    def __len__(self) -> int:
        return len(self.loader) if self.limit is None else min(self.limit, len(self.loader))


def count_images(loader: LimitedLoader) -> int:
    """Images a limited loader yields, counted from its batch sampler where it has one (no image is loaded)."""
    sampler = getattr(loader.loader, "batch_sampler", None)
    if sampler is None:
        return sum(len(batch[0]) for batch in loader)
    batches = sampler if loader.limit is None else itertools.islice(sampler, loader.limit)
    return sum(len(indices) for indices in batches)


class Evaluation(NamedTuple):
    """What :func:`evaluate` measured.

    Attributes:
        top1: Top-1 as a fraction.
        recall: Per stage, the mean share of the object's patches still kept (empty when not measured).
        purity: The mean share of the object's patches in object-majority tokens (None when not measured).
        images: How many images were scored.
    """

    top1: float
    recall: list[float]
    purity: float | None
    images: int


def _mean(total: torch.Tensor | None, count: int) -> Any:
    return None if total is None or count == 0 else (total / count).tolist()


def final_purity(
    model: nn.Module, x: torch.Tensor, offers: frozenset[str], target: torch.Tensor
) -> torch.Tensor | None:
    """Purity (B',) of the final tokens on the images with an object: from merge sources where the model reports
    them, else from its last stage's cluster assignment; None for a model that reports neither."""
    if "sources" in offers:
        return source_purity(model.predict_with_sources(x)[1].cpu(), target).double()
    if "assignments" in offers:
        assignments = model.predict_with_assignments(x)[1]
        patch_token = patch_assignment(assignments, -1).cpu()
        purity = cluster_purity(patch_token, target.bool(), stage_tokens(assignments[-1]))
        return purity[target.bool().any(dim=1)]  # images without an object have none (NaN), as for sources
    return None


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> Evaluation:
    """Top-1 of ``model`` in eval mode over ``loader``, and its recall and purity where it reports them.

    Images are cast to the model's dtype (bf16 for a bf16 copy). Batches are ``(x, y)`` or
    ``(x, y, patch_mask)``; recall and purity need the patch mask.
    """
    device = torch.device(device)
    dtype = model_dtype(model)
    was_training = model.training
    model.eval()
    offers = reports(model)
    correct = seen = 0
    recall_sum = purity_sum = None  # over images that show the object
    recall_count = purity_count = 0
    try:
        for batch in loader:
            x, y, *rest = batch
            x, y = x.to(device, dtype), y.to(device)
            if "masks" in offers:
                logits, masks = model.predict_with_masks(x)
            else:
                logits, masks = model(x), []
            correct += (logits.float().argmax(dim=-1) == y).sum().item()
            seen += y.numel()
            if not rest:
                continue
            target = rest[0].cpu()
            if masks:
                per_stage = stage_recall([m.cpu() for m in masks], target)
                sums = torch.stack([r.sum() for r in per_stage]).double()
                recall_sum = sums if recall_sum is None else recall_sum + sums
                recall_count += per_stage[0].numel()
            purity = final_purity(model, x, offers, target)
            if purity is not None:
                purity_sum = purity.sum() if purity_sum is None else purity_sum + purity.sum()
                purity_count += purity.numel()
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("the validation loader yielded no images")
    return Evaluation(correct / seen, _mean(recall_sum, recall_count) or [], _mean(purity_sum, purity_count), seen)


__all__ = ["Evaluation", "LimitedLoader", "count_images", "evaluate"]
