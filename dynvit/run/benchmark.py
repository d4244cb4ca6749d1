"""Operating points: one set of weights at several keep ratios, other registered methods matched to them,
in every precision and backend asked for; the cost, speed and accuracy of each, in one table.

For every keep ratio ρ the trained student is measured as it is, and every other method of the registry
(:mod:`dynvit.methods`; ``--methods all`` names them all) runs on the *teacher's* weights (the ViT the
student was distilled from): a training-free one as it is, a learned one with its new modules at init
(rows ``patchmerger (at init)``: untrained, which the fine-tuned track changes), at the student's stage
blocks where it has locations, set to cost what the student costs at ρ
(fvcore GFLOPs, predictors included) as its registry entry says (:mod:`dynvit.reducers.matching`): the
knob value with the nearest GFLOPs, the nearest *mean* GFLOPs over calibration images for a method
whose token count depends on the image (its rows then report the mean GFLOPs and tokens it used on the
validation images), or the student's own ρ for random keep (the floor at the student's token counts).
Methods whose papers fine-tune them are evaluated training-free here, and their rows say so.

Each of those points, and the teacher, can also run in reduced precision (``bf16``, ``int8``:
:func:`dynvit.quantize`) and in onnxruntime (the ONNX file :func:`dynvit.export_onnx` writes;
int8 there is onnxruntime's own dynamic quantization of that file). Speed is timed in pairs with
the float32 eager teacher (:mod:`dynvit.measure.throughput`): every speedup is the median of
per-pair ratios with its 95 % interval, at the benchmark batch and, optionally, at batch 1. Accuracy,
recall and purity of every row come from :func:`dynvit.measure.evaluate.evaluate`, on the same images.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import tempfile
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dynvit import methods as registry
from dynvit.deploy import ExportError, check_precision, export_onnx, onnx_session, quantize, quantize_onnx
from dynvit.deploy.onnx import INPUT, OnnxRuntimeModel
from dynvit.measure.environment import describe, environment
from dynvit.measure.evaluate import evaluate
from dynvit.measure.flops import count_flops, count_params
from dynvit.measure.throughput import (
    SpeedSettings,
    Timing,
    inference_call,
    keep_rng,
    random_images,
    time_calls,
)
from dynvit.models.contract import EarlyExiting, TokenReducingModel
from dynvit.models.factory import family_of
from dynvit.models.spatial_pruning import SpatialPruningStudent
from dynvit.reducers.base import check_reducible
from dynvit.reducers.cost import TokenCost
from dynvit.reducers.matching import (
    ALL,
    Matched,
    check_comparable,
    check_methods,
    match_to_student,
    matched_records,
    mean_cost,
    on_teacher,
    student_at,
    student_method,
)
from dynvit.run.report import ResultRow, format_table, write_report

DEFAULT_RATIOS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
BACKENDS: tuple[str, ...] = ("eager", "onnxruntime")


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


class Plan(NamedTuple):
    """A benchmark's arguments, checked: the keep ratios (highest first), methods, precisions and backend."""

    ratios: list[float]
    methods: list[str]
    precisions: list[str]
    backend: str
    skipped: tuple[str, ...] = ()  # methods of `--methods all` that cannot take this teacher over, with why


def check_benchmark(
    student: nn.Module,
    teacher: nn.Module | None,
    ratios: Sequence[float],
    names: Sequence[str],
    precisions: Sequence[str] | str = ("fp32",),
    backend: str = "eager",
    calibration: bool = True,
) -> Plan:
    """Every argument of :func:`benchmark` checked against this student and teacher, before anything is measured.

    Args:
        calibration: Whether calibration images will be there (a method costed on images needs them).
    Raises:
        ValueError: bad ratios (or one that keeps no token of this student), methods, precisions or backend;
            a training-free method without a teacher, or one costed on images without calibration images.
        TypeError: the student has no keep ratio and stage blocks, or a method cannot take the teacher over.
    """
    every = names == ALL or (not isinstance(names, str) and list(names) == [ALL])
    ratios, names = sorted(check_ratios(ratios), reverse=True), check_methods(names)
    skipped = []
    if every and teacher is not None:
        # `--methods all` is every method that can take this teacher over; the others are listed, not refused.
        for name in on_teacher(student, names):
            try:
                check_reducible(teacher, name)
            except TypeError as e:
                names.remove(name)
                skipped.append(f"{name}: {e}")
    plan = Plan(ratios, names, check_precisions(precisions), check_backend(backend), tuple(skipped))
    check_comparable(student, teacher, names)
    imaged = [n for n in on_teacher(student, names) if registry.get(n).cost == "images"]
    if imaged and not calibration:
        raise ValueError(f"matching {imaged}'s mean GFLOPs needs calibration images (a validation loader)")
    # Every ratio must fit this student (e.g. keep at least one token per stage).
    at, knob = student_at(student), student_method(student).knob.name
    original = getattr(student, knob)
    try:
        for ratio in ratios:
            at(ratio)
    finally:
        at(original)
    return plan


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
    """The name a student's rows carry: its method (``dynamicvit``), or the class of a hierarchical student
    (``dynamiccnn``), which has no registry record of its own."""
    return getattr(student, "method", type(student).__name__.lower())


def final_tokens(model: nn.Module) -> float | None:
    """Patch tokens in the last block's MLP (prefix tokens excluded) where that does not depend on the image."""
    if isinstance(model, TokenReducingModel):
        schedule = model.token_schedule()
        return None if schedule is None else float(schedule[-1][1] - model.num_prefix_tokens)
    if isinstance(model, SpatialPruningStudent):
        return float(model.stage_keep_counts[-1])
    # A CNN teacher has no patch tokens; a hierarchical one (Swin) has patches, but not of the pruned map.
    embed = getattr(model, "patch_embed", None)
    return float(embed.num_patches) if embed is not None and family_of(model) is None else None


@dataclass
class Point:
    """One row to measure and how to run it.

    Attributes:
        row: The row its numbers go into.
        net: The model object (shared by the points of one method and precision).
        configure: Sets ``net`` up at this point (keep ratio, method setting) and returns it.
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
        environment: The machine and settings (:func:`dynvit.measure.environment`), and ``val_images``, the
            validation images every row was scored on.
        skipped: Rows that could not be measured, each with the reason (e.g. a model ONNX cannot export).
    """

    rows: list[ResultRow]
    matched: list[Matched]
    environment: dict[str, Any]
    skipped: list[str] = field(default_factory=list)


def _as_is(net: nn.Module) -> nn.Module:
    return net


def _configured(net: nn.Module, method: str, params: dict[str, Any]) -> nn.Module:
    return registry.get(method).apply(net, **params)


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
                # Students and methods of one kind share a model: set it up before each of its blocks.
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
    knob = student_method(student).knob.name
    reduced: dict[str, nn.Module] = {}  # one copy of the teacher per training-free method, reconfigured per ratio
    for m in matched:
        method = registry.get(m.method)
        if m.student:
            configure = functools.partial(_configured, method=student_method(student).name, params={knob: m.value})
            point = Point(ResultRow(student_label(student), m.keep_ratio, 0.0, 0.0), student, configure)
        elif method.learned:
            # New modules depend on the setting (PatchMerger's K_s queries): one model per point, built once,
            # at a fixed seed so the table repeats.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                net = method.apply(copy.deepcopy(teacher), **m.params)
            point = Point(ResultRow(m.row_label, m.keep_ratio, 0.0, 0.0, param=m.label), net, _as_is)
        else:
            if m.method not in reduced:
                reduced[m.method] = copy.deepcopy(teacher)
            configure = functools.partial(_configured, method=m.method, params=m.params)
            row = ResultRow(m.row_label, m.keep_ratio, 0.0, 0.0, param=m.label)
            point = Point(row, reduced[m.method], configure)
        model = point.model()
        point.row.gflops, point.row.params_m = count_flops(model), count_params(model)
        point.row.tokens = final_tokens(model)
        if method.cost == "images" and not m.student:
            # fvcore counted one random image; the method's cost is what the real images made it keep.
            on = (batch[0] for batch in loader) if loader is not None else images
            point.row.gflops, point.row.tokens = mean_cost(model, on, cost)
            if isinstance(model, EarlyExiting):  # where its images left the cascade
                on = (batch[0] for batch in loader) if loader is not None else images
                point.row.exit_shares = model.leaving_shares(on)
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

    Each row carries the method's setting (``param``), its GFLOPs (a method costed on images: the mean it
    used on the validation images, or on the calibration images without a loader), parameters, tokens left
    in the last block, images/s, the speedup over the float32 eager teacher with its 95 % interval, with
    ``latency`` the same at batch 1, and with a loader top-1, kept-token recall per stage and, for methods
    whose tokens stand for sets of patches, purity, all on the loader's images (their count is
    ``environment["val_images"]`` and each row's ``images``).

    Args:
        student: The trained student; its weights are measured as they are.
        teacher: The unpruned ViT; the training-free methods run on copies of it, speedups are relative to it.
        ratios: The student's keep ratios in (0, 1].
        methods: Registered method names, in the order the rows take.
        loader: Validation batches ``(x, y[, patch_mask])`` for top-1, recall and the timing images (wrap it
            in :class:`~dynvit.measure.evaluate.LimitedLoader` to score fewer).
        settings: Device, batch size, pairs, block and warm-up times, threads of the timing.
        calibration: Image batches a method costed on images (ATS) is matched on; needed when one is compared.
        steps: Resolution of fractional knobs (keep rates).
        precisions: Any of ``fp32``, ``bf16``, ``int8`` (:func:`dynvit.quantize`); float32 is always measured.
        backend: ``eager``, or ``onnxruntime`` to also run every point's exported ONNX file
            (float32, and onnxruntime's int8 when ``int8`` is asked for). Points the exporter
            refuses are skipped and listed in the result.
        latency: Also time every row at batch 1 (milliseconds per image and the speedup).
        onnx_dir: Where the ONNX files go (a temporary folder by default).
    """
    plan = check_benchmark(student, teacher, ratios, methods, precisions, backend, calibration=bool(calibration))
    return benchmark_plan(student, teacher, plan, loader, settings, calibration, steps, latency, onnx_dir)


def benchmark_plan(
    student: nn.Module,
    teacher: VisionTransformer | None,
    plan: Plan,
    loader: Iterable | None = None,
    settings: SpeedSettings | None = None,
    calibration: Sequence[torch.Tensor] | None = None,
    steps: int = 100,
    latency: bool = False,
    onnx_dir: str | Path | None = None,
) -> BenchmarkResult:
    """:func:`benchmark` of arguments :func:`check_benchmark` has checked already (``cli.py benchmark`` checks
    them before it loads a checkpoint or data, and would otherwise check them twice)."""
    settings = settings or SpeedSettings()
    device = torch.device(settings.device)
    nets = [net for net in (student, teacher) if net is not None]
    modes = [net.training for net in nets]
    for net in nets:
        net.to(device).eval()
    at, knob = student_at(student), student_method(student).knob.name
    original = getattr(student, knob)
    imaged = any(registry.get(m).cost == "images" for m in on_teacher(student, plan.methods))
    try:
        with keep_rng(device), ExitStack() as stack:
            images = [x.to(device) for x in calibration] if calibration is not None else None
            # One fit of the per-block cost polynomials serves the matching on images and those rows.
            cost = TokenCost.from_model(teacher) if imaged else None
            matched = match_to_student(student, teacher, plan.ratios, plan.methods, images, steps, cost)

            points = _float32_points(student, teacher, matched, loader, images, cost)
            skipped = list(plan.skipped)
            variants = _precision_points(points, plan.precisions[1:])
            if plan.backend == "onnxruntime":
                folder = Path(onnx_dir) if onnx_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
                check = timing_images(loader, student, 8)  # the export is checked on real images where there are
                onnx, refused = _onnx_points(points, plan.precisions, folder, check, settings.num_threads)
                skipped += refused
                variants = [mine + extra for mine, extra in zip(variants, onnx, strict=True)]
            ordered = [p for point, mine in zip(points, variants, strict=True) for p in (point, *mine)]

            if loader is not None:
                for point in ordered:
                    model = point.model() if point.session is None else OnnxRuntimeModel(point.session)
                    scored = evaluate(model, loader, device)
                    point.row.top1, point.row.recall, point.row.purity = scored.top1, scored.recall, scored.purity
                    point.row.images = scored.images

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
    env = environment(device, settings.batch_size, plan.precisions, settings.num_threads)
    env.update(backend=plan.backend, pairs=settings.pairs, latency=latency)
    if loader is not None:
        env["val_images"] = ordered[0].row.images
    return BenchmarkResult([p.row for p in ordered], matched, env, skipped)


def report(result: BenchmarkResult, out_dir: str | Path, title: str | None = None) -> dict[str, Path]:
    """Print the environment, the table and what was skipped; write ``results.csv``/``.json`` and ``tradeoff.png``."""
    paths = write_report(result.rows, out_dir, title=title, environment=result.environment)
    print(f"Measured on {describe(result.environment)}; {result.environment['pairs']} pairs per speedup")
    if result.environment.get("val_images"):
        print(f"Every row scored on the same {result.environment['val_images']} validation images")
    print(format_table(result.rows))
    for reason in result.skipped:
        print(f"skipped: {reason}")
    print("\n".join(f"wrote {p}" for p in paths.values()))
    return paths


def sweep_matches(
    student: nn.Module, teacher: nn.Module | None, ratios: Sequence[float], methods: Sequence[str] = ("tome", "evit")
) -> list[dict[str, Any]] | None:
    """For a sweep's keep ratios, :func:`~dynvit.reducers.matching.matched_records` of those methods that can run
    on the teacher (EViT needs a class token); None where none can (no teacher, or not a plain timm ViT).
    Matching needs only the architecture, not trained weights."""
    runnable = []
    for name in methods:
        try:
            check_comparable(student, teacher, [name])
            runnable.append(name)
        except (TypeError, ValueError):
            continue
    if not runnable:
        return None
    ratios = sorted(set(check_ratios(ratios)), reverse=True)
    learned = student_method(student).name
    return matched_records(match_to_student(student, teacher, ratios, [learned, *runnable]))


__all__ = [
    "BACKENDS",
    "DEFAULT_RATIOS",
    "BenchmarkResult",
    "Plan",
    "benchmark",
    "benchmark_plan",
    "check_backend",
    "check_benchmark",
    "check_precisions",
    "check_ratios",
    "first_images",
    "report",
    "sweep_matches",
]
