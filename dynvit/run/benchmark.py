"""Operating points: one set of weights at several keep ratios, other token reducers matched to them,
in every precision and backend asked for; the cost, speed and accuracy of each, in one table.

For every DynamicViT keep ratio ρ the student is measured as it is, and every other method runs on
the *teacher's* weights (the ViT DynamicViT was distilled from), set to cost what DynamicViT costs
at ρ (fvcore GFLOPs, predictors included):

============  ====================================================================================
``tome``      the merges per block ``r`` with the nearest GFLOPs (:func:`~dynvit.reducers.matching.match_tome_r`)
``evit``      the keep rate with the nearest GFLOPs, reducing in DynamicViT's stage blocks. EViT is
              fine-tuned in its paper; here it is evaluated training-free, and its rows say so
``topk``      as ``evit``, without the fused token
``ats``       the K whose *mean* GFLOPs over calibration images is nearest: ATS keeps a different
              number of tokens per image, so its rows report the mean GFLOPs and tokens it actually
              used on the validation images; samplers in every block from DynamicViT's first stage on
``random``    DynamicViT's own token counts at ρ, in the same blocks, tokens drawn at random
============  ====================================================================================

All of them are training-free: the teacher's weights are used as they are.

Each of those points, and the teacher, can also run in reduced precision (``bf16``, ``int8``:
:func:`dynvit.quantize`) and in onnxruntime (the ONNX file :func:`dynvit.export_onnx` writes;
int8 there is onnxruntime's own dynamic quantization of that file). Speed is timed in pairs with
the float32 eager teacher (:mod:`dynvit.measure.throughput`): every speedup is the median of
per-pair ratios with its 95 % interval, at the benchmark batch and, optionally, at batch 1.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import tempfile
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dynvit.deploy import ExportError, check_precision, export_onnx, onnx_session, quantize, quantize_onnx, run_onnx
from dynvit.deploy.onnx import INPUT
from dynvit.measure.environment import describe, environment
from dynvit.measure.flops import count_flops, count_params
from dynvit.measure.recall import stage_recall
from dynvit.measure.throughput import (
    SpeedSettings,
    Timing,
    inference_call,
    keep_rng,
    model_dtype,
    random_images,
    time_calls,
)
from dynvit.models.factory import family_of
from dynvit.reducers import REDUCERS, ReducedViT, TokenCost, apply_reducer
from dynvit.reducers.base import check_reducible
from dynvit.reducers.matching import Match, match_keep_rate, match_tome_r, nearest
from dynvit.run.report import ResultRow, format_table, write_report

DEFAULT_RATIOS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
METHODS: tuple[str, ...] = ("dynamicvit", *REDUCERS)
BACKENDS: tuple[str, ...] = ("eager", "onnxruntime")
# How a method's rows are labelled where that differs from its name.
LABELS: dict[str, str] = {"evit": "evit (training-free)"}
# The parameter each reducer is matched on.
PARAMETERS: dict[str, str] = {
    "dynamicvit": "keep_ratio",
    "tome": "r",
    "evit": "keep_rate",
    "topk": "keep_rate",
    "ats": "max_tokens",
    "random": "keep_ratio",
}


def check_ratios(ratios: Sequence[float]) -> list[float]:
    """The keep ratios as floats; ``ValueError`` unless there is at least one and each is in (0, 1]."""
    ratios = [float(r) for r in ratios]
    if not ratios:
        raise ValueError("no keep ratios given: pass e.g. ratios [0.5, 0.7, 0.9]")
    bad = [r for r in ratios if not 0.0 < r <= 1.0]
    if bad:
        raise ValueError(f"keep ratios must be in (0, 1], got {bad}")
    return ratios


def check_precisions(precisions: Sequence[str] | str) -> list[str]:
    """The precisions as a list, ``fp32`` first; ``ValueError`` for none, an unknown one or a repeat.

    ``"fp32,int8"`` (one comma-separated string, as the command line gives it) is accepted too.
    """
    if isinstance(precisions, str):
        precisions = [p.strip() for p in precisions.split(",") if p.strip()]
    precisions = [check_precision(p) for p in precisions]
    if not precisions:
        raise ValueError("no precisions given: pass e.g. --precision fp32,bf16,int8")
    if len(set(precisions)) < len(precisions):
        raise ValueError(f"precisions {precisions} list one more than once")
    # The float32 rows are the reference the others' accuracy and speed are read against.
    return ["fp32", *[p for p in precisions if p != "fp32"]]


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose from {list(BACKENDS)}")
    return backend


def dynamicvit_at(student: nn.Module) -> Callable[[float], nn.Module]:
    """Sets a DynamicViT-style student's ``keep_ratio`` and returns the student."""
    if not hasattr(student, "keep_ratio"):
        raise TypeError(
            f"{type(student).__name__} has no keep_ratio to vary: the benchmark needs a pruned student "
            "(e.g. DynamicViTModule's net)"
        )

    def at(keep_ratio: float) -> nn.Module:
        student.keep_ratio = keep_ratio
        return student

    return at


def check_methods(methods: Sequence[str]) -> list[str]:
    """The method names as a list; ``ValueError`` for none, an unknown one (with a suggestion) or a repeat."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    if not methods:
        raise ValueError(f"no methods given: pass e.g. --methods [dynamicvit,tome]; choose from {list(METHODS)}")
    for method in methods:
        if method not in METHODS:
            close = difflib.get_close_matches(str(method), METHODS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown method {method!r}: choose from {list(METHODS)}{hint}")
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise ValueError(f"methods {repeated} are listed more than once")
    return methods


def check_comparable(student: nn.Module, teacher: nn.Module | None, methods: Sequence[str]) -> None:
    """Raise unless ``methods`` can be compared on this student and teacher, before anything is measured.

    Raises:
        TypeError: the student has no keep ratio and stage blocks, or a reducer cannot take the teacher over.
        ValueError: a method other than DynamicViT is asked for and there is no teacher.
    """
    dynamicvit_at(student)  # raises TypeError for a model without a keep ratio
    if not hasattr(student, "pruning_loc"):
        raise TypeError(f"{type(student).__name__} has no pruning_loc: the comparison reduces in its stage blocks")
    reducers = [m for m in methods if m != "dynamicvit"]
    if not reducers:
        return
    if teacher is None:
        raise ValueError(
            f"{reducers} run on the teacher's weights, and this model has no teacher: use a DynamicViTModule "
            "config with model.init_args.teacher_checkpoint set"
        )
    for method in reducers:
        try:
            check_reducible(teacher, REDUCERS[method])
        except TypeError as e:
            raise TypeError(f"{[method]} cannot run on this teacher: {e}") from None


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> tuple[float, list[float]]:
    """Top-1 (fraction) of ``model`` in eval mode over ``loader``, and the per-stage kept-token recall.

    Images are cast to the model's dtype (bf16 for a bf16 copy). Batches are ``(x, y)`` or
    ``(x, y, patch_mask)``. Recall is computed when batches carry a patch mask and the model gives
    keep masks (``predict_with_masks``); otherwise the list is empty.
    """
    device = torch.device(device)
    dtype = model_dtype(model)
    was_training = model.training
    model.eval()
    correct = seen = 0
    recall_sum: torch.Tensor | None = None  # per stage, over images that show the object
    recall_count = 0
    try:
        for batch in loader:
            x, y, *rest = batch
            x, y = x.to(device, dtype), y.to(device)
            if hasattr(model, "predict_with_masks"):
                logits, masks = model.predict_with_masks(x)
            else:
                logits, masks = model(x), []
            correct += (logits.float().argmax(dim=-1) == y).sum().item()
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


@dataclass
class Matched:
    """One method set up to cost what DynamicViT costs at one keep ratio.

    Attributes:
        method: A key of :data:`METHODS`.
        keep_ratio: The DynamicViT keep ratio ρ it is matched to.
        target: DynamicViT's GFLOPs at ρ.
        gflops: The method's GFLOPs as matched (for ATS the mean over the calibration images).
        params: What :func:`~dynvit.reducers.apply_reducer` gets (empty for DynamicViT).
    """

    method: str
    keep_ratio: float
    target: float
    gflops: float
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float:
        """The matched parameter's value (ρ itself for DynamicViT)."""
        return self.params.get(PARAMETERS[self.method], self.keep_ratio)

    @property
    def label(self) -> str:
        """``r=3``, ``keep_rate=0.62``, ``K=20``, …: the setting as the table shows it."""
        name = "K" if self.method == "ats" else PARAMETERS[self.method]
        return f"{name}={self.value:g}"


@torch.no_grad()
def mean_cost(model: ReducedViT, images: Iterable[torch.Tensor], cost: TokenCost) -> tuple[float, float]:
    """Mean GFLOPs and mean patch tokens in the last block (prefix tokens excluded) per image.

    Each image is costed at its own token counts (``predict_with_counts``), as if run alone.
    """
    device = next(model.parameters()).device
    gflops = tokens = 0.0
    seen = 0
    for x in images:
        _, counts = model.predict_with_counts(x.to(device))
        gflops += cost(counts).sum().item()
        tokens += (counts[:, -1, 1] - model.num_prefix_tokens).sum().item()
        seen += counts.shape[0]
    if seen == 0:
        raise ValueError("no images to measure ATS's mean cost on")
    return gflops / seen, tokens / seen


def ats_loc(student: nn.Module, depth: int) -> tuple[int, ...]:
    """ATS's sampler blocks: every block from DynamicViT's first stage block on (as in the ATS paper)."""
    return tuple(range(student.pruning_loc[0], depth))


def match_ats(
    model: VisionTransformer,
    target: float,
    images: Sequence[torch.Tensor],
    pruning_loc: Sequence[int],
    cost: TokenCost | None = None,
) -> Match:
    """The ATS K (1 to N) whose mean GFLOPs over ``images`` is nearest ``target``; ``model`` is reduced in place.

    A bisection over K (mean cost grows with K), one pass over the images per K tried.

    Args:
        cost: ``TokenCost.from_model`` of this backbone, if already fitted.
    """
    loc = tuple(pruning_loc)
    model = apply_reducer(model, "ats", max_tokens=model.patch_embed.num_patches, pruning_loc=loc)
    cost = TokenCost.from_model(model) if cost is None else cost
    means: dict[int, float] = {}

    def gflops_of(k: float) -> float:
        if k not in means:
            apply_reducer(model, "ats", max_tokens=int(k), pruning_loc=loc)
            means[int(k)] = mean_cost(model, images, cost)[0]
        return means[int(k)]

    value, gflops = nearest(list(range(model.num_patches, 0, -1)), gflops_of, target)
    return Match(int(value), gflops)


def match_methods(
    student: nn.Module,
    teacher: VisionTransformer,
    ratios: Sequence[float],
    methods: Sequence[str],
    images: Sequence[torch.Tensor] | None = None,
    steps: int = 100,
    cost: TokenCost | None = None,
) -> list[Matched]:
    """Every method set to each DynamicViT keep ratio's GFLOPs, ratio by ratio in the order given.

    Args:
        student: The DynamicViT student (its ``keep_ratio`` is restored afterwards).
        teacher: The plain ViT the reducers run on; it is copied, never changed.
        ratios: DynamicViT keep ratios in (0, 1].
        methods: Keys of :data:`METHODS`.
        images: Calibration images for ATS (batches of images on the teacher's device).
        steps: Resolution of the EViT / top-k keep-rate grid (100: two decimals).
        cost: ``TokenCost.from_model(teacher)``, if already fitted (ATS costs images with it).
    """
    ratios, methods = check_ratios(ratios), check_methods(methods)
    check_comparable(student, teacher, methods)
    if "ats" in methods and not images:
        raise ValueError("matching ATS's mean GFLOPs needs calibration images (a validation loader)")
    loc, at = tuple(student.pruning_loc), dynamicvit_at(student)
    original = student.keep_ratio
    if "ats" in methods and cost is None:
        cost = TokenCost.from_model(teacher)

    def factory() -> VisionTransformer:
        return copy.deepcopy(teacher)

    matched = []
    try:
        for ratio in ratios:
            target = count_flops(at(ratio))
            for method in methods:
                params: dict[str, Any] = {}
                if method == "dynamicvit":
                    match = Match(ratio, target)
                elif method == "tome":
                    match = match_tome_r(factory, target)
                elif method in ("evit", "topk"):
                    params = {"pruning_loc": loc}
                    match = match_keep_rate(factory, target, method, steps, **params)
                elif method == "ats":
                    params = {"pruning_loc": ats_loc(student, len(teacher.blocks))}
                    match = match_ats(factory(), target, images, params["pruning_loc"], cost)
                else:  # random: DynamicViT's counts, so its cost is DynamicViT's less the predictors
                    params = {"pruning_loc": loc}
                    match = Match(ratio, count_flops(apply_reducer(factory(), method, keep_ratio=ratio, **params)))
                if method != "dynamicvit":
                    params[PARAMETERS[method]] = match.value
                matched.append(Matched(method, ratio, target, match.gflops, params))
    finally:
        at(original)
    return matched


def first_images(loader: Iterable, count: int) -> list[torch.Tensor]:
    """The first ``count`` images of a loader of ``(x, y, ...)`` batches, as batches (the last one cut)."""
    batches, seen = [], 0
    for x, *_ in loader:
        if seen >= count:
            break
        batches.append(x[: count - seen])
        seen += batches[-1].shape[0]
    return batches


def student_label(student: nn.Module) -> str:
    """The name a student's rows carry: ``dynamicvit`` for :class:`~dynvit.models.DynamicViT`."""
    return getattr(student, "method", type(student).__name__.lower())


def final_tokens(model: nn.Module) -> float | None:
    """Patch tokens in the last block's MLP (prefix tokens excluded) where that does not depend on the image."""
    if isinstance(model, ReducedViT):
        schedule = model.token_schedule()
        return None if schedule is None else float(schedule[-1][1] - model.num_prefix_tokens)
    if hasattr(model, "stage_keep_counts"):
        return float(model.stage_keep_counts[-1])
    # A CNN teacher has no patch tokens; a hierarchical one (Swin) has patches, but not of the pruned map.
    return float(model.patch_embed.num_patches) if hasattr(model, "patch_embed") and family_of(model) is None else None


@dataclass
class Point:
    """One row to measure and how to run it.

    Attributes:
        row: The row its numbers go into.
        net: The model object (shared by the points of one method and precision).
        configure: Sets ``net`` up at this point (keep ratio, reducer setting) and returns it.
        session: For the onnxruntime backend, the session of the exported file (``net`` is then
            the eager model it was exported from).
    """

    row: ResultRow
    net: nn.Module
    configure: Callable[[nn.Module], nn.Module]
    session: Any = None

    def model(self) -> nn.Module:
        return self.configure(self.net)


@dataclass
class BenchmarkResult:
    """What :func:`benchmark` measured.

    Attributes:
        rows: The table's rows, the float32 eager teacher first.
        matched: The setting each method was matched to at each keep ratio.
        environment: The machine and settings (:func:`dynvit.measure.environment`).
        skipped: Rows that could not be measured, each with the reason (e.g. a model ONNX cannot export).
    """

    rows: list[ResultRow]
    matched: list[Matched]
    environment: dict[str, Any]
    skipped: list[str] = field(default_factory=list)


def _as_is(net: nn.Module) -> nn.Module:
    return net


def _at_ratio(net: nn.Module, keep_ratio: float) -> nn.Module:
    return dynamicvit_at(net)(keep_ratio)


def _ratio_of(m: Matched) -> Callable[[nn.Module], nn.Module]:
    return functools.partial(_at_ratio, keep_ratio=m.keep_ratio)


def _reduced(net: nn.Module, method: str, params: dict[str, Any]) -> nn.Module:
    return apply_reducer(net, method, **params)


def timing_images(loader: Iterable | None, model: nn.Module, batch_size: int) -> torch.Tensor:
    """The first ``batch_size`` validation images (repeated if the set is smaller), else random images.

    Real images matter where the work depends on the image (ATS keeps a different number of tokens
    per image); for the others any input times the same.
    """
    if loader is None:
        return random_images(model, batch_size)
    x = torch.cat(first_images(loader, batch_size))
    return x.repeat(-(-batch_size // x.shape[0]), 1, 1, 1)[:batch_size]


def _onnx_points(
    points: Sequence[Point], precisions: Sequence[str], folder: Path, images: torch.Tensor, threads: int
) -> tuple[list[list[Point]], list[str]]:
    """For each float32 eager point, its onnxruntime points (float32, and int8 when asked), and what was skipped."""
    out, skipped = [], []
    for i, point in enumerate(points):
        mine: list[Point] = []
        name = f"{i:02d}_{point.row.method.split()[0]}_{point.row.keep_ratio:g}"
        try:
            path = export_onnx(point.model(), folder / f"{name}.onnx", images=images)
        except ExportError as e:
            skipped.append(f"{point.row.label} ρ={point.row.keep_ratio:g} on onnxruntime: {e}")
            out.append(mine)
            continue
        files = {"fp32": path}
        if "int8" in precisions:
            files["int8"] = quantize_onnx(path)
        for precision, file in files.items():
            row = copy.copy(point.row)
            row.precision, row.backend = precision, "onnxruntime"
            mine.append(Point(row, point.net, point.configure, onnx_session(file, threads)))
        out.append(mine)
    if "bf16" in precisions:
        skipped.append("bf16 on onnxruntime: not measured (onnxruntime's CPU kernels compute in float32)")
    return out, skipped


class _OnnxRuntimeModel(nn.Module):
    """An onnxruntime session behind a module's call, so :func:`evaluate` scores it like any model."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_onnx(self.session, x)


def time_points(
    points: Sequence[Point], images: torch.Tensor, settings: SpeedSettings, reference: bool
) -> list[Timing]:
    """Every point timed on ``images`` in the paired design, ``points[0]`` the reference when ``reference``."""
    device = torch.device(settings.device)
    with ExitStack() as stack:
        calls, setups = [], []
        for point in points:
            if point.session is not None:
                feed = {INPUT: images.float().numpy()}
                calls.append(functools.partial(point.session.run, None, feed))
                setups.append(None)
            else:
                calls.append(stack.enter_context(inference_call(point.model(), images, device)))
                # Students and reducers of one method share a model: set it up before each of its blocks.
                setups.append(functools.partial(point.configure, point.net))
        return time_calls(calls, settings, reference, setups)


def _float32_points(
    student: nn.Module,
    teacher: nn.Module | None,
    matched: Sequence[Matched],
    loader: Iterable | None,
    images: Sequence[torch.Tensor] | None,
    cost: TokenCost | None,
) -> list[Point]:
    """The teacher's point and one per matched setting, float32 eager, with their GFLOPs, parameters and tokens."""
    points: list[Point] = []
    if teacher is not None:
        row = ResultRow("teacher", 1.0, count_flops(teacher), count_params(teacher))
        row.tokens = final_tokens(teacher)
        points.append(Point(row, teacher, _as_is))
    reduced: dict[str, ReducedViT] = {}  # one copy of the teacher per method, reconfigured per ratio
    for m in matched:
        if m.method == "dynamicvit":
            point = Point(ResultRow(student_label(student), m.keep_ratio, 0.0, 0.0), student, _ratio_of(m))
        else:
            if m.method not in reduced:
                reduced[m.method] = copy.deepcopy(teacher)
            label = LABELS.get(m.method, m.method)
            configure = functools.partial(_reduced, method=m.method, params=m.params)
            point = Point(ResultRow(label, m.keep_ratio, 0.0, 0.0, param=m.label), reduced[m.method], configure)
        model = point.model()
        point.row.gflops, point.row.params_m = count_flops(model), count_params(model)
        point.row.tokens = final_tokens(model)
        if m.method == "ats":
            # fvcore counted one random image; ATS's cost is what the real images made it keep.
            on = (batch[0] for batch in loader) if loader is not None else images
            point.row.gflops, point.row.tokens = mean_cost(model, on, cost)
        points.append(point)
    return points


def _precision_points(points: Sequence[Point], precisions: Sequence[str]) -> list[list[Point]]:
    """For each float32 point, its points in ``precisions``: quantized copies, one per shared model object.

    GFLOPs, parameters and tokens are the float32 graph's (the work is the same, in other number formats).
    """
    variants: list[list[Point]] = [[] for _ in points]
    for precision in precisions:
        copies: dict[int, nn.Module] = {}
        for point, mine in zip(points, variants, strict=True):
            if id(point.net) not in copies:
                copies[id(point.net)] = quantize(point.model(), precision)
            row = copy.copy(point.row)
            row.precision = precision
            mine.append(Point(row, copies[id(point.net)], point.configure))
    return variants


def _set_speedup(row: ResultRow, timing: Timing, name: str) -> None:
    """``row.<name>`` and its interval from a timing; the reference (no ratios) is 1 by definition."""
    speedup = timing.speedup
    if speedup is None:
        if row.method == "teacher" and not row.variant:
            setattr(row, name, 1.0)
        return
    setattr(row, name, speedup.value)
    setattr(row, f"{name}_low", speedup.low)
    setattr(row, f"{name}_high", speedup.high)


def benchmark(
    student: nn.Module,
    teacher: VisionTransformer | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    methods: Sequence[str] = ("dynamicvit",),
    loader: Iterable | None = None,
    settings: SpeedSettings | None = None,
    calibration: Sequence[torch.Tensor] | None = None,
    steps: int = 100,
    precisions: Sequence[str] = ("fp32",),
    backend: str = "eager",
    latency: bool = False,
    onnx_dir: str | Path | None = None,
) -> BenchmarkResult:
    """The teacher, then for each keep ratio (highest first) one row per method, each followed by its
    other precisions and backend.

    Each row carries the method's setting (``param``), its GFLOPs (ATS: the mean it used on the
    validation images, or on the calibration images without a loader), parameters, tokens left in
    the last block, images/s, the speedup over the float32 eager teacher with its 95 % interval, with
    ``latency`` the same at batch 1, and with a loader top-1 and kept-token recall per stage (methods
    that keep a subset of the patches; ToMe merges them, so it has none).

    Args:
        student: The DynamicViT student; its weights are measured as they are.
        teacher: The unpruned ViT; the other methods run on copies of it, speedups are relative to it.
        ratios: DynamicViT keep ratios in (0, 1].
        methods: Keys of :data:`METHODS`, in the order the rows take.
        loader: Validation batches ``(x, y[, patch_mask])`` for top-1, recall and the timing images.
        settings: Device, batch size, pairs, block and warm-up times, threads of the timing.
        calibration: Image batches ATS's K is matched on; needed when ``ats`` is compared.
        steps: Resolution of the EViT / top-k keep-rate grid.
        precisions: Any of ``fp32``, ``bf16``, ``int8`` (:func:`dynvit.quantize`); float32 is always measured.
        backend: ``eager``, or ``onnxruntime`` to also run every point's exported ONNX file
            (float32, and onnxruntime's int8 when ``int8`` is asked for). Points the exporter
            refuses are skipped and listed in the result.
        latency: Also time every row at batch 1 (milliseconds per image and the speedup).
        onnx_dir: Where the ONNX files go (a temporary folder by default).
    """
    ratios, methods = sorted(check_ratios(ratios), reverse=True), check_methods(methods)
    precisions, backend = check_precisions(precisions), check_backend(backend)
    check_comparable(student, teacher, methods)
    if "ats" in methods and not calibration:
        raise ValueError("matching ATS's mean GFLOPs needs calibration images (a validation loader)")
    settings = settings or SpeedSettings()
    device = torch.device(settings.device)
    nets = [net for net in (student, teacher) if net is not None]
    modes = [net.training for net in nets]
    for net in nets:
        net.to(device).eval()
    at, original = dynamicvit_at(student), student.keep_ratio
    try:
        with keep_rng(device), ExitStack() as stack:
            images = [x.to(device) for x in calibration] if calibration is not None else None
            # One fit of the per-block cost polynomials serves ATS's matching and its rows.
            cost = TokenCost.from_model(teacher) if "ats" in methods else None
            matched = match_methods(student, teacher, ratios, methods, images, steps, cost)

            points = _float32_points(student, teacher, matched, loader, images, cost)
            skipped: list[str] = []
            variants = _precision_points(points, precisions[1:])
            if backend == "onnxruntime":
                folder = Path(onnx_dir) if onnx_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
                check = timing_images(loader, student, 8)  # the export is checked on real images where there are
                onnx, skipped = _onnx_points(points, precisions, folder, check, settings.num_threads)
                variants = [mine + extra for mine, extra in zip(variants, onnx, strict=True)]
            ordered = [p for point, mine in zip(points, variants, strict=True) for p in (point, *mine)]

            if loader is not None:
                for point in ordered:
                    model = point.model() if point.session is None else _OnnxRuntimeModel(point.session)
                    point.row.top1, point.row.recall = evaluate(model, loader, device)

            reference = teacher is not None
            timed = timing_images(loader, teacher if reference else student, settings.batch_size)
            for point, timing in zip(ordered, time_points(ordered, timed, settings, reference), strict=True):
                point.row.images_per_s = timing.images_per_s
                _set_speedup(point.row, timing, "speedup")
            if latency:
                one = dataclasses.replace(settings, batch_size=1)
                for point, timing in zip(ordered, time_points(ordered, timed[:1], one, reference), strict=True):
                    point.row.latency_ms = 1000 * timing.seconds_per_call
                    _set_speedup(point.row, timing, "latency_speedup")
    finally:
        at(original)
        for net, mode in zip(nets, modes, strict=True):
            net.train(mode)
    env = environment(device, settings.batch_size, precisions, settings.num_threads)
    env.update(backend=backend, pairs=settings.pairs, latency=latency)
    return BenchmarkResult([p.row for p in ordered], matched, env, skipped)


def report(result: BenchmarkResult, out_dir: str | Path, title: str | None = None) -> dict[str, Path]:
    """Print the environment, the table and what was skipped; write ``results.csv``/``.json`` and ``tradeoff.png``."""
    paths = write_report(result.rows, out_dir, title=title, environment=result.environment)
    print(f"Measured on {describe(result.environment)}; {result.environment['pairs']} pairs per speedup")
    print(format_table(result.rows))
    for reason in result.skipped:
        print(f"skipped: {reason}")
    print("\n".join(f"wrote {p}" for p in paths.values()))
    return paths


def matched_records(matched: Sequence[Matched]) -> list[dict[str, Any]]:
    """One record per keep ratio: DynamicViT's GFLOPs, then each method's setting and GFLOPs
    (``tome_r``, ``tome_gflops``, ``evit_keep_rate``, …), as :func:`~dynvit.reducers.matching.match_dynamicvit` lists them."""
    by_ratio: dict[float, dict[str, Any]] = {}
    for m in matched:
        record = by_ratio.setdefault(m.keep_ratio, {"keep_ratio": m.keep_ratio, "dynamicvit_gflops": m.target})
        if m.method != "dynamicvit":
            record[f"{m.method}_{PARAMETERS[m.method]}"] = m.value
            record[f"{m.method}_gflops"] = m.gflops
    return list(by_ratio.values())


def sweep_matches(
    student: nn.Module, teacher: nn.Module | None, ratios: Sequence[float], methods: Sequence[str] = ("tome", "evit")
) -> list[dict[str, Any]] | None:
    """For a sweep's keep ratios, :func:`matched_records` of those ``methods`` that can run on the teacher
    (EViT needs a class token); None where none can (no teacher, or not a plain timm ViT). Matching needs
    only the architecture, not trained weights."""
    runnable = []
    for method in methods:
        try:
            check_comparable(student, teacher, [method])
            runnable.append(method)
        except (TypeError, ValueError):
            continue
    if not runnable:
        return None
    methods = runnable
    ratios = sorted(set(check_ratios(ratios)), reverse=True)
    return matched_records(match_methods(student, teacher, ratios, ["dynamicvit", *methods]))


__all__ = [
    "BACKENDS",
    "DEFAULT_RATIOS",
    "LABELS",
    "METHODS",
    "BenchmarkResult",
    "Matched",
    "benchmark",
    "check_comparable",
    "check_methods",
    "check_precisions",
    "check_ratios",
    "dynamicvit_at",
    "evaluate",
    "first_images",
    "match_ats",
    "match_methods",
    "matched_records",
    "mean_cost",
    "report",
    "sweep_matches",
]
