"""A tiny DataModule for the measurement tests: a bright square on noise, with its patch mask.

Validation batches are ``(x, y, patch_mask)`` like the cluttered digits', so recall and the
kept-token picture have an object to score and outline; the label is the square's position.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset


def make_squares(n: int, img_size: int, patch: int, in_chans: int, seed: int) -> TensorDataset:
    """``n`` images with a 2×2-patch square at one of ``num_classes`` grid cells; label = cell."""
    g = torch.Generator().manual_seed(seed)
    grid = img_size // patch
    cells = grid // 2
    x = 0.3 * torch.randn(n, in_chans, img_size, img_size, generator=g)
    y = torch.randint(0, cells * cells, (n,), generator=g)
    mask = torch.zeros(n, grid, grid, dtype=torch.bool)
    for i, label in enumerate(y.tolist()):
        r, c = 2 * (label // cells), 2 * (label % cells)
        x[i, :, r * patch : (r + 2) * patch, c * patch : (c + 2) * patch] += 2.0
        mask[i, r : r + 2, c : c + 2] = True
    return TensorDataset(x, y, mask.flatten(1))


class SquaresDataModule(L.LightningDataModule):
    """Bright squares for tiny ViTs (32 px, patch 4: 16 classes); mean 0 / std 1 as far as drawing goes.

    Args:
        num_train, num_val: Split sizes.
        batch_size: Per loader.
        in_chans: 1 or 3.
    """

    def __init__(self, num_train: int = 64, num_val: int = 32, batch_size: int = 16, in_chans: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.img_size, self.patch, self.in_chans = 32, 4, in_chans
        self.num_classes = (self.img_size // self.patch // 2) ** 2
        self.mean, self.std = (0.0,) * in_chans, (1.0,) * in_chans

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self.train_set = make_squares(hp.num_train, self.img_size, self.patch, self.in_chans, seed=0)
        self.val_set = make_squares(hp.num_val, self.img_size, self.patch, self.in_chans, seed=1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)


def tiny_config(root: Path, max_epochs: int = 1, **data_args) -> dict:
    """A CLI config (as a dict) that trains a 4-block, 32-wide DynamicViT on the squares in seconds."""
    return {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(root),
            "max_epochs": max_epochs,
            "accelerator": "cpu",
            "devices": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {
            "class_path": "dynvit.lightning.DynamicViTModule",
            "init_args": {
                "model_name": "vit_tiny_patch16_224",
                "keep_ratio": 0.7,
                "pruning_loc": [1, 2, 3],
                "model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2},
                "lr_base_batch_size": None,
                "warmup_epochs": 0,
            },
        },
        "data": {"class_path": "tests.tiny_data.SquaresDataModule", "init_args": {"in_chans": 3, **data_args}},
        "throughput": {"batch_size": 2, "warmup": 0, "repeats": 1},
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
