"""Benchmark one set of weights at several keep ratios: cost, speed and accuracy per operating point.

The method is pluggable: :func:`benchmark` takes a function that returns the model configured for
one keep ratio. :func:`dynamicvit_at` gives it for a DynamicViT student (the same weights, with
``keep_ratio`` set); another token-reduction method passes its own builder.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dynvit.measure.flops import count_flops, count_params
from dynvit.measure.recall import stage_recall
from dynvit.measure.throughput import keep_rng, measure_throughput
from dynvit.run.report import ResultRow

DEFAULT_RATIOS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)

# Builds the model to measure at one keep ratio (it may reconfigure and return the same object).
ModelAt = Callable[[float], nn.Module]


@dataclass
class SpeedSettings:
    """How throughput (and accuracy) are measured.

    Args:
        batch_size: Images per timed forward pass.
        dtype: ``torch.float32``, or a half type run under autocast (accuracy too).
        device: Where every model runs.
        warmup: Untimed passes before timing.
        repeats: Timed passes per round; the median is reported.
        rounds: Rounds over all the models of one table, in turn; each model's images/s is the
            median over rounds. Alternating spreads a slow spell of a shared machine over every
            row instead of letting it land on one, which would skew that row's speedup.
    """

    batch_size: int = 64
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    warmup: int = 3
    repeats: int = 10
    rounds: int = 3


def check_ratios(ratios: Sequence[float]) -> list[float]:
    """The keep ratios as floats; ``ValueError`` unless there is at least one and each is in (0, 1]."""
    ratios = [float(r) for r in ratios]
    if not ratios:
        raise ValueError("no keep ratios given: pass e.g. ratios [0.5, 0.7, 0.9]")
    bad = [r for r in ratios if not 0.0 < r <= 1.0]
    if bad:
        raise ValueError(f"keep ratios must be in (0, 1], got {bad}")
    return ratios


def dynamicvit_at(student: nn.Module) -> ModelAt:
    """A :data:`ModelAt` for a DynamicViT-style student: sets ``student.keep_ratio`` and returns it."""
    if not hasattr(student, "keep_ratio"):
        raise TypeError(
            f"{type(student).__name__} has no keep_ratio to vary: the benchmark needs a pruned student "
            "(e.g. DynamicViTModule's net)"
        )

    def at(keep_ratio: float) -> nn.Module:
        student.keep_ratio = keep_ratio
        return student

    return at


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader: Iterable, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[float, list[float]]:
    """Top-1 (fraction) of ``model`` in eval mode over ``loader``, and the per-stage kept-token recall.

    Batches are ``(x, y)`` or ``(x, y, patch_mask)``. Recall is computed when batches carry a patch
    mask and the model gives keep masks (``predict_with_masks``); otherwise the list is empty.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = seen = 0
    recall_sum: torch.Tensor | None = None  # per stage, over images that show the object
    recall_count = 0
    try:
        for batch in loader:
            x, y, *rest = batch
            x, y = x.to(device), y.to(device)
            with _autocast(device, dtype):
                if hasattr(model, "predict_with_masks"):
                    logits, masks = model.predict_with_masks(x)
                else:
                    logits, masks = model(x), []
            correct += (logits.argmax(dim=-1) == y).sum().item()
            seen += y.numel()
            if rest and masks:
                per_stage = stage_recall([m.cpu() for m in masks], rest[0].cpu())
                sums = torch.stack([r.sum() for r in per_stage]).double()
                recall_sum = sums if recall_sum is None else recall_sum + sums
                recall_count += per_stage[0].numel()
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("the validation loader yielded no images")
    recall = (recall_sum / recall_count).tolist() if recall_count else []
    return correct / seen, recall


def images_per_s(model: nn.Module, settings: SpeedSettings) -> float:
    """One throughput measurement of ``model`` as ``settings`` say, leaving the random stream as it was."""
    device = torch.device(settings.device)
    with keep_rng(device):
        return measure_throughput(
            model,
            batch_size=settings.batch_size,
            device=device,
            dtype=settings.dtype,
            warmup=settings.warmup,
            repeats=settings.repeats,
        )


def measure_point(
    model: nn.Module,
    method: str,
    keep_ratio: float,
    settings: SpeedSettings,
    loader: Iterable | None = None,
) -> ResultRow:
    """GFLOPs, parameters, images/s and, with a ``loader``, top-1 and kept-token recall of one
    model at one operating point (the speedup is left to :func:`time_in_rounds`)."""
    device = torch.device(settings.device)
    model.to(device)
    with keep_rng(device):
        gflops = count_flops(model)
    ips = images_per_s(model, settings)
    top1, recall = evaluate(model, loader, device, settings.dtype) if loader is not None else (None, [])
    return ResultRow(
        method=method,
        keep_ratio=float(keep_ratio),
        gflops=gflops,
        params_m=count_params(model),
        images_per_s=ips,
        top1=top1,
        recall=recall,
    )


def time_in_rounds(
    rows: Sequence[ResultRow], models: Sequence[Callable[[], nn.Module]], settings: SpeedSettings
) -> None:
    """Re-time ``rows`` (already timed once each, by :func:`measure_point`) in alternating rounds.

    ``models[i]`` returns the model of ``rows[i]`` set up as it was measured. After
    ``settings.rounds - 1`` more rounds over every model in turn, each row's images/s is its median
    over all rounds, and speedups are taken against the row named ``teacher`` (when there is one).
    """
    if settings.rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {settings.rounds}")
    samples = [[row.images_per_s] for row in rows]
    for _ in range(settings.rounds - 1):
        for times, model_of in zip(samples, models, strict=True):
            times.append(images_per_s(model_of(), settings))
    for row, times in zip(rows, samples, strict=True):
        row.images_per_s = statistics.median(times)
    teacher = next((row.images_per_s for row in rows if row.method == "teacher"), None)
    if teacher:
        for row in rows:
            row.speedup = row.images_per_s / teacher


def benchmark(
    model_at: ModelAt,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    teacher: nn.Module | None = None,
    loader: Iterable | None = None,
    settings: SpeedSettings | None = None,
    method: str = "dynamicvit",
) -> list[ResultRow]:
    """The teacher row (if any) and one row per keep ratio, from highest cost to lowest.

    Args:
        model_at: Returns the model at a keep ratio, e.g. ``dynamicvit_at(student)``.
        ratios: Keep ratios in (0, 1].
        teacher: The unpruned model; speedups are relative to it.
        loader: Validation batches for top-1 (and recall); None measures cost and speed only.
        settings: Device, dtype, batch size and repeats of the measurement.
        method: The name the rows carry.
    """
    ratios = check_ratios(ratios)
    settings = settings or SpeedSettings()
    rows: list[ResultRow] = []
    models: list[Callable[[], nn.Module]] = []
    if teacher is not None:
        rows.append(measure_point(teacher, "teacher", 1.0, settings, loader))
        models.append(lambda: teacher)
    for ratio in sorted(ratios, reverse=True):
        rows.append(measure_point(model_at(ratio), method, ratio, settings, loader))
        models.append(functools.partial(model_at, ratio))
    time_in_rounds(rows, models, settings)
    return rows
