"""Tiny CLI configs for the measurement tests: a 4-block, 32-wide DynamicViT on 32-px cluttered digits.

The digits' validation batches are ``(x, y, patch_mask)``, so recall and the kept-token picture
have an object to score and outline; images are one-channel and normalised with the DataModule's
``mean``/``std``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from dynvit.run.cli import DynViTCLI

# 32-px canvas, 4-px patches (8×8 = 64 tokens), 8-px digits (at most 9 patches).
DIGITS = dict(img_size=32, patch_size=4, digit_scale=1, train_samples_per_epoch=32, num_val=16, batch_size=8)
FOLLOWING_DIGITS = {k: v for k, v in DIGITS.items() if k not in ("img_size", "patch_size")}
STUDENT = dict(
    model_name="vit_tiny_patch16_224",
    pruning_loc=[1, 2, 3],
    model_kwargs={"patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2},
    lr_base_batch_size=None,
    warmup_epochs=0,
)


def tiny_config(root: Path, max_epochs: int = 1) -> dict:
    """A config (as a dict) that trains in seconds: 2 batches of 8 per epoch, 1 validation batch.

    A fresh copy every call: tests edit the nested dicts of theirs.
    """
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
            "init_args": {**copy.deepcopy(STUDENT), "keep_ratio": 0.7, "img_size": DIGITS["img_size"]},
        },
        # The model decides the canvas and patch sides; the DataModule follows it.
        "data": {"class_path": "dynvit.data.ClutteredDigitsDataModule", "init_args": dict(FOLLOWING_DIGITS)},
        "throughput": {"batch_size": 2, "pairs": 1, "block_time": 0.0, "warmup_time": 0.0},
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# Benchmark options that make a call take moments: one timing pair per row, no warm-up, no batch-1 latency.
QUICK_BENCHMARK = ["--batch_size=2", "--pairs=1", "--block_time=0", "--warmup_time=0", "--latency=false"]


def benchmark_rows(config: Path, out: Path, *options: str) -> list[dict]:
    """``cli.py benchmark --config config --out out`` with :data:`QUICK_BENCHMARK` and ``options``; the
    rows of its ``results.json``."""
    DynViTCLI(args=["benchmark", f"--config={config}", f"--out={out}", *QUICK_BENCHMARK, *options])
    return json.loads((out / "results.json").read_text())["rows"]


def fit_offline(root: Path, config: dict) -> None:
    """``cli.py fit`` of ``config`` (written to ``root/tiny.yaml``) with W&B offline under ``root``: for
    module-scoped fixtures, which cannot use the ``monkeypatch`` fixture."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(root))
        mp.setenv("WANDB_SILENT", "true")
        DynViTCLI(args=["fit", f"--config={write_config(root / 'tiny.yaml', config)}"])
