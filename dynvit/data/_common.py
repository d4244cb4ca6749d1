"""Loader settings shared by the DataModules, and how they follow the model they feed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import Sampler

from dynvit.models.factory import DataConfig, data_config


def model_data_config(model: nn.Module) -> DataConfig | None:
    """The :class:`~dynvit.models.DataConfig` of ``model`` (a network, or a LightningModule keeping it as
    ``net``); None for a model that is not a timm one (no patch embedding, no ``pretrained_cfg``), which
    leaves a DataModule's own settings."""
    net = getattr(model, "net", model)
    timm_model = hasattr(net, "patch_embed") or isinstance(getattr(net, "pretrained_cfg", None), dict)
    return data_config(net) if timm_model else None


def trainer_model(datamodule: L.LightningDataModule) -> nn.Module | None:
    """The LightningModule of the Trainer ``datamodule`` is attached to, if any (set when ``setup`` runs)."""
    trainer = datamodule.trainer
    return None if trainer is None else trainer.lightning_module


def followed_img_size(requested: int | None, config: DataConfig, in_chans: int, owner: str) -> int:
    """The image side a DataModule makes for ``config``'s model: the model's, which ``requested`` (the
    DataModule's own ``img_size``, None to follow) must equal; ``ValueError`` naming both sizes otherwise."""
    height, width = config.img_size
    if height != width:
        raise ValueError(f"{owner} makes square images; the model expects {height}x{width}")
    if requested is not None and requested != height:
        raise ValueError(
            f"{owner} has img_size={requested} but the model expects {height}x{width} images: drop the "
            f"DataModule's img_size (it follows the model) or build the model with img_size={requested}"
        )
    if in_chans != config.in_chans:
        raise ValueError(
            f"{owner} makes {in_chans}-channel images but the model expects {config.in_chans}: build the model "
            f"with in_chans={in_chans}"
        )
    return height


def resolve_pin_memory(pin_memory: bool | None) -> bool:
    """``pin_memory`` as given, or True exactly when CUDA is available (pinning helps only host→GPU copies)."""
    return torch.cuda.is_available() if pin_memory is None else bool(pin_memory)


def check_batching(batch_size: int, num_workers: int) -> None:
    """``ValueError`` unless ``batch_size >= 1`` and ``num_workers >= 0``: DataModules call it as they are
    built, so that the mistake stops the run before it makes its run folder."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def loader_kwargs(batch_size: int, num_workers: int, pin_memory: bool) -> dict[str, Any]:
    """DataLoader keyword arguments common to every split.

    Workers persist across epochs when there are any: re-forking them each epoch costs seconds per
    epoch on small CPU boxes and re-pickles the dataset.
    """
    check_batching(batch_size, num_workers)
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
