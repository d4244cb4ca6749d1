"""Which output token each original patch went to, for pictures of clusters and merges.

A merger's or clustering method's tokens stand for sets of patches. Its pictures colour every patch by
the token it ended in, so that patches merged together share a colour. What a model can say is its
registry entry's ``reports`` (:func:`dynvit.models.contract.reports`):

- ``"assignments"`` (clustering methods): per stage, the cluster of every patch
  (:func:`dynvit.reducers.clustering.patch_assignment`);
- ``"sources"`` (ToMe and the other mergers): which patches each token stands for, after a few blocks
  where the model reports every block's (:class:`~dynvit.models.contract.BlockSourceReporting`), else
  after the last one.

A patch's group is the index of its token; ``-1`` marks a patch that no token stands for (pruned).
"""

from __future__ import annotations

import colorsys

import torch
from torch import nn

from dynvit.models.contract import BlockSourceReporting, reports
from dynvit.reducers.clustering import patch_assignment

# Pictures of per-block sources show this many blocks: the last, and others evenly before it.
SOURCE_COLUMNS = 3
# Reports that give groups, in the order they are preferred (a clustering's stages over its final sources).
GROUP_REPORTS = ("assignments", "sources")


def groups_of_sources(sources: torch.Tensor) -> torch.Tensor:
    """The token (B, N) int64 each patch stands in, from sources (B, M, N) bool; -1 where no token holds it.

    Raises:
        ValueError: a patch stands in more than one token (sources must be a partition of the kept patches).
    """
    if sources.ndim != 3 or sources.dtype != torch.bool:
        raise ValueError(f"sources must be (B, M, N) bool, got {tuple(sources.shape)} {sources.dtype}")
    if (sources.sum(dim=1) > 1).any():
        raise ValueError("a patch stands in more than one token: sources must give each patch one token at most")
    return torch.where(sources.any(dim=1), sources.int().argmax(dim=1), -1)


def evenly_spaced(count: int, columns: int) -> list[int]:
    """``columns`` of the indices 0..count-1 (all when fewer), evenly spaced and ending at the last."""
    if count <= columns:
        return list(range(count))
    return [round((k + 1) * count / columns) - 1 for k in range(columns)]


def token_groups(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor] | None:
    """Per picture column, the group (B, N) int64 of every original patch (see the module docstring); None for a
    model whose tokens are single patches (it reports masks, or nothing)."""
    offers = reports(model)
    if "assignments" in offers:
        _, assignments = model.predict_with_assignments(x)
        return [patch_assignment(assignments, s) for s in range(len(assignments))]
    if "sources" in offers:
        if isinstance(model, BlockSourceReporting):
            _, blocks = model.predict_with_block_sources(x)
            # Only the blocks where tokens went away show something new.
            changed = [i for i, s in enumerate(blocks) if i == 0 or s.shape[1] != blocks[i - 1].shape[1]]
            return [groups_of_sources(blocks[changed[i]]) for i in evenly_spaced(len(changed), SOURCE_COLUMNS)]
        return [groups_of_sources(model.predict_with_sources(x)[1])]
    return None


def group_colours(groups: torch.Tensor) -> torch.Tensor:
    """An RGB colour (…, 3) in [0, 1] for each group id (…): hues a golden-ratio step apart, so that any two
    groups differ, and a patch in no group (-1) mid-grey."""
    ids = groups.flatten().tolist()
    palette = {g: colorsys.hsv_to_rgb((g * 0.6180339887) % 1.0, 0.75, 0.95) for g in set(ids) if g >= 0}
    palette[-1] = (0.5, 0.5, 0.5)
    return torch.tensor([palette[g] for g in ids], dtype=torch.float32).view(*groups.shape, 3)


__all__ = ["GROUP_REPORTS", "SOURCE_COLUMNS", "evenly_spaced", "group_colours", "groups_of_sources", "token_groups"]
