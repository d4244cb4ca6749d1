"""Shared fixtures: tiny ViTs so the whole suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from dynvit import create_teacher
from dynvit.models.attention_kernel import set_attention_kernel

# Tests do not time: attention runs SDPA, as timm's fused path does, unless a test picks a kernel itself
# (tests/test_attention_kernel.py). The variable reaches the subprocesses that tests start.
os.environ["DYNVIT_ATTENTION_KERNEL"] = "sdpa"
set_attention_kernel("sdpa")

# Under pytest-xdist (`make test`: a process per core) each process, and the CLIs it starts, takes one intra-op
# thread: a second one per process only contends for the cores the other processes use (12 minutes against 7
# for the suite on 2 cores), and the tiny models gain nothing from it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Small enough for milliseconds per step, big enough to have several pruning stages.
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
TINY_LOC = (1, 2, 3)
# The reducer tests' backbone: DeiT-S's design at TINY sizes, 8 × 8 patch tokens after a class token.
REDUCED_NAME = "deit_small_patch16_224"
N = 64


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run the CLI in-process with ``args=``; without pytest's own arguments in ``sys.argv``, LightningCLI
    has no reason to warn that both were given, whatever warning filters the run sets."""
    monkeypatch.setattr("sys.argv", sys.argv[:1])


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a test module of tiny models: they gain nothing from a second one, and on a
    busy 2-core machine it only waits. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_kwargs() -> dict:
    return dict(TINY)


@pytest.fixture(scope="module")
def base() -> nn.Module:
    """The tiny plain ViT the reducer tests convert, one per test module: they convert deep copies of it."""
    torch.manual_seed(0)
    return create_teacher(REDUCED_NAME, **TINY).eval()


def record_counts(model: nn.Module, x: torch.Tensor) -> list[tuple[int, int]]:
    """Tokens actually entering each block (its first ``norm1`` call: MCTF calls it again after fusing) and
    its MLP, read off the tensors by hooks."""
    seen: dict[tuple[int, str], int] = {}

    def hook(key):
        def record(_, args):
            seen.setdefault(key, args[0].shape[1])

        return record

    hooks = [
        m.register_forward_pre_hook(hook((i, part)))
        for i, block in enumerate(model.blocks)
        for part, m in (("attn", block.norm1), ("mlp", block.norm2))
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return [(seen[i, "attn"], seen[i, "mlp"]) for i in range(len(model.blocks))]
