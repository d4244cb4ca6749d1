"""Shared fixtures: tiny ViTs so the whole suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

from dynvit.models.attention_kernel import set_attention_kernel

# Tests do not time: attention runs SDPA, as timm's fused path does, unless a test picks a kernel itself
# (tests/test_attention_kernel.py). The variable reaches the subprocesses that tests start.
os.environ["DYNVIT_ATTENTION_KERNEL"] = "sdpa"
set_attention_kernel("sdpa")

# Small enough for milliseconds per step, big enough to have several pruning stages.
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
TINY_LOC = (1, 2, 3)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_kwargs() -> dict:
    return dict(TINY)
