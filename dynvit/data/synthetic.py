"""Random-tensor images for smoke tests and speed runs: no files, any size, fixed by a seed."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dynvit.data._common import (
    ShuffleSampler,
    check_batching,
    followed_img_size,
    loader_kwargs,
    model_data_config,
    resolve_pin_memory,
    trainer_model,
)

DEFAULT_IMG_SIZE = 32  # without a model to follow

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class SyntheticImages(Dataset):
    """Sample ``i`` is ``noise_i + signal · pattern[label_i]``, generated on demand from (seed, split, i).

    ``noise_i`` is standard normal (C, H, W); ``pattern`` holds one fixed standard-normal image per class
    (shared by all splits), so ``signal > 0`` makes labels learnable and ``signal = 0`` makes them pure noise.

    Args:
        size: Number of samples.
        num_classes: Number of classes; labels are drawn uniformly.
        img_size: Image side.
        in_chans: Image channels.
        signal: Scale of the class pattern added to the noise.
        seed: Seed of labels, patterns and noise.
        split: ``"train"``, ``"val"`` or ``"test"``; each draws its own samples.
    """

    def __init__(
        self, size: int, num_classes: int, img_size: int, in_chans: int, signal: float, seed: int, split: str
    ) -> None:
        self.size = size
        self.shape = (in_chans, img_size, img_size)
        self.signal = signal
        self.seed = seed
        self.split_code = _SPLIT_CODES[split]
        self.labels = np.random.default_rng((seed, self.split_code)).integers(num_classes, size=size)
        self.patterns = np.random.default_rng((seed, len(_SPLIT_CODES))).standard_normal(
            (num_classes, *self.shape), dtype=np.float32
        )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        label = int(self.labels[index])
        image = np.random.default_rng((self.seed, self.split_code, index)).standard_normal(self.shape, np.float32)
        if self.signal:
            image += self.signal * self.patterns[label]
        return torch.from_numpy(image), label


class SyntheticDataModule(L.LightningDataModule):
    """Random images with labels, fixed by ``seed``; batches are ``(images, labels)``.

    Images are ``N(0, 1)`` noise plus ``signal`` times a fixed random pattern of their class (one
    standard-normal image per class), so with the default ``signal=1.0`` a model can learn the labels and
    a loss falls; ``signal=0`` gives unlearnable labels (pure speed runs). Samples are generated on demand,
    so large ``img_size``/``train_size`` cost no memory. Test and predict use a separate test split of
    ``val_size`` samples. The image size follows the model (:meth:`follow`, called by ``setup()`` with the
    Trainer's model and by ``cli.py``); without one it is 32.

    Args:
        num_classes: Number of classes.
        img_size: Image side in pixels; ``None`` follows the model, another value must equal the model's.
        in_chans: Image channels.
        train_size: Training samples (the same every epoch, in an order fixed by (seed, epoch)).
        val_size: Validation samples (also the size of the test split).
        signal: Strength of the class-dependent pattern; 0 for labels that cannot be learnt.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory; ``None`` means "when CUDA is available".
        seed: Seed of every label and pixel.
    """

    def __init__(
        self,
        num_classes: int = 10,
        img_size: int | None = None,
        in_chans: int = 3,
        train_size: int = 256,
        val_size: int = 64,
        signal: float = 1.0,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # img_size is the model's to decide: a None here must not clash with the model's hparam.
        self.save_hyperparameters(ignore=["img_size"])
        sizes = dict(num_classes=num_classes, in_chans=in_chans, train_size=train_size, val_size=val_size)
        if img_size is not None:
            sizes["img_size"] = img_size
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_classes = num_classes
        self.requested_img_size = img_size
        self.img_size = img_size if img_size is not None else DEFAULT_IMG_SIZE
        self.in_chans = in_chans
        self.class_names = tuple(str(k) for k in range(num_classes))
        check_batching(batch_size, num_workers)
        self.batch_size = batch_size
        self.num_workers = num_workers
        if train_size < batch_size:
            raise ValueError(
                f"train_size ({train_size}) < batch_size ({batch_size}): training drops the last partial batch, so no batch would remain"
            )
        self.pin_memory = resolve_pin_memory(pin_memory)
        self.seed = seed
        self.datasets: dict[str, SyntheticImages] = {}

    def follow(self, model: nn.Module) -> None:
        """Make images of the size ``model`` (a network, or a LightningModule with ``net``) expects.

        Raises:
            ValueError: an explicit ``img_size`` or ``in_chans`` differs from the model's.
        """
        config = model_data_config(model)
        if config is not None:
            self.img_size = followed_img_size(self.requested_img_size, config, self.in_chans, type(self).__name__)

    def setup(self, stage: str | None = None) -> None:
        model = trainer_model(self)
        if model is not None:
            self.follow(model)
        hp = self.hparams
        sizes = {"train": hp.train_size, "val": hp.val_size, "test": hp.val_size}
        for split, size in sizes.items():
            self.datasets[split] = SyntheticImages(
                size, self.num_classes, self.img_size, self.in_chans, hp.signal, self.seed, split
            )

    def _loader(self, split: str, **kwargs) -> DataLoader:
        if not self.datasets:
            raise RuntimeError("call setup() before asking for dataloaders")
        return DataLoader(
            self.datasets[split], **loader_kwargs(self.batch_size, self.num_workers, self.pin_memory), **kwargs
        )

    def train_dataloader(self) -> DataLoader:
        sampler = ShuffleSampler(self.hparams.train_size, seed=self.seed)
        return self._loader("train", sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
