"""Images per second in eval mode, measured the way papers report it."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from dynvit.models.dynamic_vit import input_size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(
    model: nn.Module,
    batch_size: int = 64,
    img_size: int | Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    warmup: int = 3,
    repeats: int = 10,
    compile: bool = False,
    channels_last: bool = False,
) -> float:
    """Median images/s of ``repeats`` timed forward passes after ``warmup`` untimed ones.

    The model runs in eval mode under ``torch.inference_mode``; half types run under autocast with
    float32 weights, as mixed-precision users run it. CUDA work is synchronised before each clock
    read. The model's mode, device and memory format are restored afterwards.

    Args:
        img_size: Input resolution; by default the model's own.
        dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.
        compile: Time ``torch.compile(model, dynamic=False)`` instead of the eager model. Shapes are
            static (a student keeps a fixed token count per stage), so one graph serves every call;
            compilation happens in the first warm-up call, which is not timed (``warmup`` must be ≥ 1).
        channels_last: Feed channels-last images and convert the model's 4-D weights (the patch
            embedding convolution) to channels-last, which GPU convolution kernels prefer.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, repeats >= 1, warmup >= 0; got {batch_size}, {repeats}, {warmup}")
    if compile and warmup < 1:
        raise ValueError("compile=True needs warmup >= 1: the first call compiles and must not be timed")
    device = torch.device(device)
    in_chans, *own_size = input_size(model)
    size = own_size if img_size is None else img_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    was_training, old_device = model.training, next(model.parameters()).device
    model.eval().to(device)
    x = torch.randn(batch_size, in_chans, *size, device=device)
    # Only a model that was in the default format is put back into it afterwards.
    restore_format = channels_last and all(p.is_contiguous() for p in model.parameters() if p.ndim == 4)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    run = torch.compile(model, dynamic=False) if compile else model
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype in (torch.float16, torch.bfloat16)
        else contextlib.nullcontext()
    )
    times = []
    try:
        with torch.inference_mode(), autocast:
            for _ in range(warmup):
                run(x)
            _sync(device)
            for _ in range(repeats):
                start = time.perf_counter()
                run(x)
                _sync(device)
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training).to(old_device)
        if restore_format:
            model.to(memory_format=torch.contiguous_format)
    return batch_size / statistics.median(times)


def keep_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """Measuring must not move the caller's random stream (fvcore and timing draw random inputs)."""
    return torch.random.fork_rng([device.index or 0] if device.type == "cuda" else [])
