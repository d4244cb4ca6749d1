"""Shared fixtures: tiny ViTs so the whole suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

# Small enough for milliseconds per step, big enough to have several pruning stages.
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
TINY_LOC = (1, 2, 3)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_kwargs() -> dict:
    return dict(TINY)
