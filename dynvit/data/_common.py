"""Loader settings shared by the DataModules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler


def resolve_pin_memory(pin_memory: bool | None) -> bool:
    """``pin_memory`` as given, or True exactly when CUDA is available (pinning helps only host→GPU copies)."""
    return torch.cuda.is_available() if pin_memory is None else bool(pin_memory)


def loader_kwargs(batch_size: int, num_workers: int, pin_memory: bool) -> dict[str, Any]:
    """DataLoader keyword arguments common to every split.

    Workers persist across epochs when there are any: re-forking them each epoch costs seconds per
    epoch on small CPU boxes and re-pickles the dataset.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return dict(
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


class ShuffleSampler(Sampler[int]):
    """A fresh permutation of ``range(num_samples)`` each epoch, fixed by (seed, epoch).

    Unlike ``shuffle=True`` (whose order follows the global RNG, so a resumed run sees other orders),
    epoch ``e`` always has the same order. Lightning's fit loop calls :meth:`set_epoch` before each epoch;
    under DDP it wraps this sampler in its ``DistributedSamplerWrapper``, which forwards ``set_epoch``
    and shards the permutation between ranks. (A ``DistributedSampler`` with one replica would not do:
    Lightning leaves those unwrapped, and every rank would see the whole set.)
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())
