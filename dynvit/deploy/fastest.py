"""Which way of running a model is fastest on this machine: every deployment path, checked and timed here.

Which path wins depends on the CPU (and the GPU): bf16 is the fastest on a Xeon with AMX and slower
than float32 on an AVX2-only CPU, where torchao's int8 is slower still and fbgemm's int8 is the
fastest (BENCHMARKS.md, "Deploy"). :func:`fastest` therefore measures instead of recommending:

1. it builds every path that applies on the device (:func:`candidate_paths`): on a CPU float32,
   bf16 and int8 (torchao and torch.ao) in eager PyTorch, float32 and int8 in onnxruntime (int8
   with 8- and 7-bit weights on x86 without VNNI or AMX), and,
   when the user allows the compile time, ``torch.compile``; on a GPU float32, fp16 and bf16, each
   with PyTorch's attention kernel and with each SDPA backend forced. A path that cannot be built
   here (an export the exporter refuses, a kernel the device lacks) is *skipped*, with the reason;
2. it checks each path's predictions against float32 eager: top-1 agreement on validation images
   when there are some, else the logits on the example batch. A path outside the
   :class:`Tolerance` is *refused*;
3. it times the float32 eager model and every accepted path in pairs at the example batch's size
   (:func:`dynvit.measure.throughput.time_calls`): each speedup is the median of per-pair ratios to
   float32 eager, with its 95 % interval. A path that takes over :data:`TOO_SLOW` times float32 eager's
   time in each of two single calls first is reported ``too slow`` and not timed in pairs (it could
   not be chosen; on an AVX2-only CPU torchao's int8 alone would take most of the timing);
4. it chooses the accepted path with the highest speedup among those that are surely faster than
   float32 eager (the whole interval above 1; below 6 pairs, the median), else float32 eager. So
   the choice is never a path measured slower than float32 eager.

:meth:`Choice.save` writes the chosen artifact (an ``.onnx`` file, or the prepared module as a
``.pt``) with ``<artifact>.choice.json`` beside it: the choice, every path's timing and check, the
tolerance and the environment. :func:`load_deployed` runs it again.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynvit.deploy.hardware import CpuInfo, SlowPrecisionWarning, detect_cpu
from dynvit.deploy.onnx import INPUT, export_onnx, onnx_session, quantize_onnx, run_onnx
from dynvit.deploy.quantize import TORCH_AO_DEPRECATION, check_inference_ready, quantize
from dynvit.files import staged, write_text
from dynvit.measure.environment import environment
from dynvit.measure.throughput import (
    SpeedSettings,
    Speedup,
    intra_op_threads,
    keep_rng,
    synchronised_clock,
    time_calls,
    warm_up,
)

RUNTIMES: tuple[str, ...] = ("eager", "compiled", "onnxruntime")
# torch.nn.attention.SDPBackend member of each name a GPU path may force.
SDPA_BACKENDS: dict[str, str] = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DeployPath:
    """One way of running a model.

    Attributes:
        precision: ``fp32``, ``bf16``, ``fp16`` (GPU) or ``int8``.
        runtime: ``eager``, ``compiled`` (``torch.compile``) or ``onnxruntime``.
        int8_backend: For int8 in PyTorch, whose kernels: ``torchao`` or ``torch.ao``
            (:func:`dynvit.deploy.quantize`); None otherwise.
        sdpa: On a GPU, the attention kernel forced (a key of :data:`SDPA_BACKENDS`); None leaves
            the choice to PyTorch.
        reduce_range: For int8 in onnxruntime, 7-bit weights (:func:`~dynvit.deploy.onnx.quantize_onnx`).
    """

    precision: str
    runtime: str = "eager"
    int8_backend: str | None = None
    sdpa: str | None = None
    reduce_range: bool = False

    @property
    def name(self) -> str:
        """``int8 eager torch.ao``, ``fp16 eager sdpa=flash``, ``int8 onnxruntime 7-bit``, …: how tables and
        ``paths=`` name it."""
        parts = [self.precision, self.runtime]
        if self.int8_backend:
            parts.append(self.int8_backend)
        if self.sdpa:
            parts.append(f"sdpa={self.sdpa}")
        if self.reduce_range:
            parts.append("7-bit")
        return " ".join(parts)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype its images are cast to: the model's floating dtype (float32 for int8)."""
        return DTYPES.get(self.precision, torch.float32)


REFERENCE = DeployPath("fp32", "eager")
# A path whose one call (after the check's, past its one-off set-up) takes this many times float32 eager's is
# not timed in pairs: the choice must be surely faster than float32, and a path this slow would spend most of
# the timing (torchao's int8 on an AVX2-only CPU: 15× float32's time; bf16 there: 5.5×). Two single calls must
# both say so: one hiccup on a busy machine never drops a path that could win.
TOO_SLOW = 3.0
# What Choice.save writes: the artifact (an onnxruntime file or a torch.save'd module) and its record.
ARTIFACT_SUFFIXES = (".onnx", ".pt")
RECORD_SUFFIX = ".choice.json"


def candidate_paths(
    device: torch.device | str = "cpu", compile: bool = False, cpu: CpuInfo | None = None
) -> list[DeployPath]:
    """The paths :func:`fastest` tries on ``device``, float32 eager (the reference) first.

    Args:
        device: ``cpu`` or a GPU.
        compile: Also ``torch.compile`` paths (minutes of compilation per model on a small CPU).
        cpu: The CPU (:func:`~dynvit.deploy.hardware.detect_cpu` when None). On x86 without VNNI or AMX
            onnxruntime's int8 is tried with 8-bit weights and with 7-bit ones: its u8 × s8 product can
            saturate there (onnxruntime advises 7 bits), and 7 bits cost precision (on a random-weight
            DeiT-S student, logits error 0.08 → 0.15 on a VNNI CPU), so the check and the clock decide.
    """
    device = torch.device(device)
    if device.type == "cpu":
        cpu = cpu or detect_cpu()
        paths = [
            REFERENCE,
            DeployPath("bf16"),
            DeployPath("int8", int8_backend="torchao"),
            DeployPath("int8", int8_backend="torch.ao"),
            DeployPath("fp32", "onnxruntime"),
            DeployPath("int8", "onnxruntime"),
        ]
        if cpu.is_x86 and not cpu.int8_dot_product:
            paths.append(DeployPath("int8", "onnxruntime", reduce_range=True))
        if compile:
            # torchao's fast CPU int8 is its compiled path: inductor fuses the activation's quantization.
            paths += [DeployPath("fp32", "compiled"), DeployPath("bf16", "compiled")]
            paths += [DeployPath("int8", "compiled", int8_backend="torchao")]
        return paths
    paths = [DeployPath(p, "eager", sdpa=s) for p in ("fp32", "fp16", "bf16") for s in (None, *SDPA_BACKENDS)]
    if compile:
        paths += [DeployPath(p, "compiled") for p in ("fp32", "fp16", "bf16")]
    return paths


@dataclass(frozen=True)
class Tolerance:
    """How far a path's predictions may stray from float32 eager's and still be chosen.

    Attributes:
        agreement: Least top-1 agreement with float32 on validation images (when there are some).
        logits: Largest ``‖logits − float32 logits‖ / ‖float32 logits‖`` on the example batch (when
            there are no validation images).
    """

    agreement: float = 0.99
    logits: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.agreement <= 1.0:
            raise ValueError(f"Tolerance.agreement is a fraction in [0, 1], got {self.agreement}")
        if self.logits < 0:
            raise ValueError(f"Tolerance.logits must be >= 0, got {self.logits}")


class Runner:
    """One path made runnable: a prepared module (eager or compiled) or an onnxruntime session.

    Call it with float32 images (B, C, H, W) for float32 logits on the CPU.
    """

    def __init__(
        self,
        path: DeployPath,
        device: torch.device | str,
        module: nn.Module | None = None,
        onnx_file: Path | None = None,
        threads: int | None = None,
    ) -> None:
        self.path, self.device = path, torch.device(device)
        self.module, self.onnx_file = module, onnx_file
        # onnxruntime fixes its threads when the session is made; PyTorch's are set around each timing.
        self.session = onnx_session(onnx_file, threads) if onnx_file is not None else None
        self._run: Callable[[torch.Tensor], Any] | None = None
        if module is not None:
            self._run = _compiled(module, path, self.device) if path.runtime == "compiled" else module

    def _context(self) -> contextlib.AbstractContextManager:
        if self.path.sdpa is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[self.path.sdpa]))

    def call(self, images: torch.Tensor) -> Callable[[], object]:
        """A call that runs ``images`` once (prepared beforehand: cast, moved, converted), for timing."""
        if self.session is not None:
            feed = {INPUT: images.detach().cpu().float().numpy()}
            return functools.partial(self.session.run, None, feed)
        x = images.to(self.device, self.path.input_dtype)
        run, context = self._run, self._context

        def call() -> object:
            with torch.inference_mode(), context():
                return run(x)

        return call

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.session is not None:
            return run_onnx(self.session, images)
        out = self.call(images)()
        return out.float().cpu()


def _compiled(module: nn.Module, path: DeployPath, device: torch.device) -> Callable[[torch.Tensor], Any]:
    """``torch.compile`` of a prepared module; on the CPU with freezing (weights become constants, so
    inductor can pre-pack them for oneDNN), and for torchao's int8 with its product and rescaling fused."""
    options: dict[str, Any] = {}
    if device.type == "cpu":
        options["freezing"] = True
    if path.int8_backend == "torchao":
        options["force_fuse_int_mm_with_mul"] = True
    return torch.compile(module, dynamic=False, options=options or None)


def build_runner(
    model: nn.Module,
    path: DeployPath,
    device: torch.device | str,
    exported: Callable[[], Path] | None = None,
    threads: int | None = None,
) -> Runner:
    """``path`` prepared from the float32 eval-mode ``model`` (which is not changed).

    Args:
        exported: For onnxruntime paths, gives the float32 ONNX file of ``model`` (the int8 file is
            written beside it).
        threads: onnxruntime's intra-op threads (torch's current setting when None).

    Raises whatever the preparation raises (an export refused, a kernel missing, …).
    """
    device = torch.device(device)
    if path.runtime == "onnxruntime":
        if device.type != "cpu" or exported is None:
            raise ValueError(f"dynvit runs onnxruntime on the CPU only, from an exported file (device {device})")
        file = exported()
        if path.precision == "int8":
            suffix = ".int8-7bit.onnx" if path.reduce_range else ".int8.onnx"
            file = quantize_onnx(file, file.with_name(file.stem + suffix), reduce_range=path.reduce_range)
        return Runner(path, device, onnx_file=file, threads=threads)
    if path.precision == "int8":
        if device.type != "cpu":
            raise ValueError(f"int8 paths run on the CPU here, not on {device}")
        module = quantize(copy.deepcopy(model).cpu(), "int8", int8_backend=path.int8_backend or "auto")
    elif path.precision == "bf16" and device.type == "cpu":
        module = quantize(copy.deepcopy(model).cpu(), "bf16")
    else:
        module = copy.deepcopy(model).to(device, DTYPES[path.precision])
    return Runner(path, device, module=module.eval())


@dataclass
class PathResult:
    """What :func:`fastest` found for one path.

    Attributes:
        path: The path.
        status: ``chosen``, ``reference`` (float32 eager, not chosen), ``accepted`` (checked and
            timed, not chosen), ``refused`` (predictions outside the tolerance), ``too slow`` (one call
            took over :data:`TOO_SLOW` times float32 eager's: not timed in pairs) or ``skipped`` (could
            not be built or run here).
        reason: Why it was refused or skipped.
        agreement: Top-1 agreement with float32 eager (validation images, else the example batch).
        logits_error: ``‖logits − float32 logits‖ / ‖float32 logits‖`` on the example batch.
        top1: Top-1 on the validation labels, when there are validation images.
        images_per_s: Median over its timed blocks.
        speedup: Over float32 eager, with its 95 % interval (None for float32 eager itself).
    """

    path: DeployPath
    status: str = "accepted"
    reason: str = ""
    agreement: float | None = None
    logits_error: float | None = None
    top1: float | None = None
    images_per_s: float | None = None
    speedup: Speedup | None = None

    def record(self) -> dict[str, Any]:
        record = {"path": self.path.name, **dataclasses.asdict(self.path)}
        record.update({k: getattr(self, k) for k in ("status", "reason", "agreement", "logits_error", "top1")})
        record["images_per_s"] = self.images_per_s
        record["speedup"] = dataclasses.asdict(self.speedup) if self.speedup is not None else None
        return record


def surely_faster(speedup: Speedup | None) -> bool:
    """Whether a speedup over float32 eager is above 1 with its whole 95 % interval (below 6 pairs, its median)."""
    if speedup is None:
        return False
    return speedup.value > 1 and (speedup.low is None or speedup.low > 1)


@dataclass
class Choice:
    """The outcome of :func:`fastest`: the chosen path, ready to run, and what every path measured.

    Attributes:
        chosen: The chosen path's result.
        results: Every path's result, float32 eager first.
        runner: The chosen path, prepared: ``choice.runner(images)`` gives float32 logits.
        tolerance: The tolerance the predictions were held to.
        checked_on: What predictions were compared on (validation images or the example batch).
        environment: The machine and settings (:func:`dynvit.measure.environment`, with ``cpu_info``).
    """

    chosen: PathResult
    results: list[PathResult]
    runner: Runner = field(repr=False)
    tolerance: Tolerance
    checked_on: str
    environment: dict[str, Any]
    _workdir: Any = field(default=None, repr=False)  # keeps the onnx files of the chosen path alive

    def record(self) -> dict[str, Any]:
        """The choice, the rule, every path's check and timing, the tolerance and the environment, as JSON-ready data."""
        return {
            "chosen": self.chosen.path.name,
            "path": dataclasses.asdict(self.chosen.path),
            "rule": "highest speedup over fp32 eager among paths within the tolerance whose 95 % interval "
            "lies above 1 (median alone below 6 pairs); fp32 eager if none",
            "checked_on": self.checked_on,
            "tolerance": dataclasses.asdict(self.tolerance),
            "results": [r.record() for r in self.results],
            "environment": self.environment,
        }

    def table(self) -> str:
        """A Markdown table of every path: images/s, speedup (95 % CI), agreement, logits error, status."""
        check = "agreement (val)" if self.checked_on.startswith("validation") else "agreement (batch)"
        lines = [
            f"| path | img/s | × fp32 eager (95 % CI) | {check} | logits error | |",
            "| --- | ---: | --- | ---: | ---: | --- |",
        ]
        for r in self.results:
            speed = str(r.speedup) if r.speedup is not None else ("1.00×" if r.path == REFERENCE else "–")
            rate = f"{r.images_per_s:.1f}" if r.images_per_s is not None else "–"
            agree = f"{r.agreement:.3f}" if r.agreement is not None else "–"
            error = f"{r.logits_error:.2g}" if r.logits_error is not None else "–"
            status = f"**{r.status}**" if r.status == "chosen" else r.status
            if r.reason:
                status += f": {r.reason}"
            lines.append(f"| {r.path.name} | {rate} | {speed} | {agree} | {error} | {status} |")
        return "\n".join(lines)

    def save(self, out: str | Path) -> Path:
        """Write the chosen artifact and ``<artifact>.choice.json`` beside it; return the artifact's path.

        The artifact takes ``out``'s name with the suffix of its kind: ``.onnx`` for an onnxruntime
        path (the exported or int8 file), ``.pt`` otherwise (the prepared module, ``torch.save``'d
        whole: load it with :func:`load_deployed`, which also compiles it or forces its attention
        kernel as chosen). That suffix replaces an ``.onnx`` or ``.pt`` one and follows any other
        (``deit_s_0.7`` → ``deit_s_0.7.onnx``).

        That replaces what an earlier save to the same name wrote: its record, and its artifact when that
        was of the other kind (``student.onnx`` when ``student.pt`` is chosen now), which would otherwise be
        left beside a record that no longer describes it.
        """
        stem = _stem(out)
        onnx_file = self.runner.onnx_file
        artifact = stem.with_name(stem.name + (".onnx" if onnx_file is not None else ".pt"))
        record_file = choice_path(artifact)
        earlier = _recorded_artifact(record_file)
        # Each is written through a temporary file: a failed save leaves the earlier artifact and record whole.
        with staged(artifact) as staging:
            if onnx_file is not None:
                shutil.copyfile(onnx_file, staging)
            else:
                torch.save(self.runner.module, staging)
        record = {"artifact": artifact.name, **self.record()}
        write_text(record_file, json.dumps(record, indent=2, default=str) + "\n")
        if (
            earlier is not None
            and earlier != artifact
            and earlier.suffix in ARTIFACT_SUFFIXES
            and _stem(earlier) == stem
        ):
            earlier.unlink(missing_ok=True)
        return artifact


def _stem(out: str | Path) -> Path:
    """The name :meth:`Choice.save` writes ``out``'s files under: ``out`` less an ``.onnx`` or ``.pt`` suffix.

    Only an artifact's own suffix goes, since a name's last dot need not start one (``deit_s_0.7``: a keep
    ratio; ``v1.2``: a version).
    """
    out = Path(out)
    return out.with_suffix("") if out.suffix in ARTIFACT_SUFFIXES else out


def choice_path(artifact: str | Path) -> Path:
    """``<stem>.choice.json``: the record beside an artifact (``.onnx`` or ``.pt``), or of the ``out`` it was
    saved as (:func:`_stem`)."""
    stem = _stem(artifact)
    return stem.with_name(stem.name + RECORD_SUFFIX)


def _recorded_artifact(record_file: Path) -> Path | None:
    """The artifact a record names, beside it; None without a readable record naming one."""
    try:
        name = json.loads(record_file.read_text()).get("artifact")
    except (OSError, ValueError, AttributeError):
        return None
    return record_file.with_name(name) if isinstance(name, str) else None


def _timing_settings(
    settings: SpeedSettings | None, device: torch.device, example_batch: torch.Tensor
) -> SpeedSettings:
    """The timing settings of :func:`fastest` and :func:`speedup_over`: the user's, else 10 pairs on ``device``,
    at the example batch's size."""
    return dataclasses.replace(settings or SpeedSettings(device=device, pairs=10), batch_size=example_batch.shape[0])


def speedup_over(
    baseline: nn.Module, choice: Choice, example_batch: torch.Tensor, settings: SpeedSettings | None = None
) -> Speedup:
    """The chosen path's speedup over another model in float32 eager, timed in pairs as :func:`fastest`
    times its paths: a student's choice over its teacher, the figure deployment targets are set in.

    Args:
        baseline: A float32 model in eval mode on the device the choice was measured on.
        settings: As for :func:`fastest` (the example batch sets the batch size); 10 pairs when None.
    """
    check_inference_ready(baseline, "speedup_over")
    device = choice.runner.device
    settings = _timing_settings(settings, device, example_batch)
    reference = Runner(REFERENCE, device, module=baseline)
    with keep_rng(device):
        timings = time_calls([reference.call(example_batch), choice.runner.call(example_batch)], settings)
    return timings[1].speedup


def load_deployed(artifact: str | Path, device: torch.device | str | None = None, threads: int | None = None) -> Runner:
    """The artifact :meth:`Choice.save` wrote, ready to run as chosen (``runner(images)`` → logits).

    Args:
        artifact: The ``.onnx`` or ``.pt`` file with its ``.choice.json`` beside it, that record itself, or the
            name it was saved as (``Choice.save``'s ``out``, ``cli.py export --auto``'s ``--out``).
        device: Where to run a PyTorch artifact; by default where it was measured.
        threads: onnxruntime's intra-op threads (torch's current setting when None).

    Raises:
        FileNotFoundError: no artifact or no record there.
        ValueError: an artifact other than the one its record names, or a record that names none.
    """
    given = Path(artifact)
    record_file = given if given.name.endswith(RECORD_SUFFIX) else choice_path(given)
    if not record_file.is_file():
        raise FileNotFoundError(
            f"{record_file} not found: load_deployed needs the artifact that Choice.save (or `cli.py export "
            f"--auto`) wrote, with its {RECORD_SUFFIX} beside it"
        )
    record = json.loads(record_file.read_text())
    if "artifact" not in record:
        raise ValueError(
            f"{record_file} records a choice but no artifact (`cli.py benchmark --precision auto` writes such "
            "records, and no model): write the chosen model with `cli.py export --auto --out <file>` (or "
            "Choice.save) and load that"
        )
    artifact = record_file.with_name(record["artifact"])
    # Given an artifact's name, it must be the one the record describes: a record's path run on another file (the
    # .onnx of an earlier save, read as the .pt this one chose) fails far from the cause, or runs the wrong way.
    if given != record_file and given.suffix in ARTIFACT_SUFFIXES and given.name != artifact.name:
        raise ValueError(
            f"{given} is not the artifact {record_file.name} records: the last save to this name chose "
            f"{record['chosen']} and wrote {artifact}; load that (or {record_file})"
        )
    if not artifact.is_file():
        raise FileNotFoundError(f"{artifact} not found: the artifact {record_file.name} records is missing")
    path = DeployPath(**record["path"])
    device = torch.device(device or record["environment"]["device"])
    if path.runtime == "onnxruntime":
        return Runner(path, "cpu", onnx_file=artifact, threads=threads)
    # The whole module was pickled (quantized layers have no state-dict-only form across backends).
    with warnings.catch_warnings():
        # torch.ao's packed int8 weights unpickle through TypedStorage and quantized tensor creation functions,
        # both of which torch warns are deprecated.
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        warnings.filterwarnings("ignore", message=TORCH_AO_DEPRECATION)
        module = torch.load(artifact, map_location=device, weights_only=False)
    return Runner(path, device, module=module.eval())


class _Once:
    """A call made at most once: later calls return its result or raise its error again."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make, self.done, self.value, self.error = make, False, None, None

    def __call__(self) -> Any:
        if not self.done:
            self.done = True
            try:
                self.value = self.make()
            except Exception as e:
                self.error = e
        if self.error is not None:
            raise self.error
        return self.value


def _first_batches(loader: Iterable, limit: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` of the loader's batches, cut at ``limit`` images."""
    seen = 0
    for x, y, *_ in loader:
        if limit is not None and seen >= limit:
            return
        take = x.shape[0] if limit is None else min(x.shape[0], limit - seen)
        seen += take
        yield x[:take], y[:take]


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def _check_predictions(
    runners: dict[DeployPath, Runner],
    results: dict[DeployPath, PathResult],
    example: torch.Tensor,
    loader: Iterable | None,
    check_images: int | None,
) -> str:
    """Fill every result's agreement, logits error and top-1; skip paths that fail to run. Returns
    what predictions were compared on."""
    reference = runners[REFERENCE]
    ref_logits = reference(example)
    for path, runner in runners.items():
        try:
            logits = ref_logits if path == REFERENCE else runner(example)
        except Exception as e:  # a kernel this device lacks, an SDPA backend that cannot take these inputs, …
            results[path].status, results[path].reason = "skipped", _one_line(e)
            continue
        results[path].logits_error = ((logits - ref_logits).norm() / ref_logits.norm().clamp_min(1e-12)).item()
        results[path].agreement = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    if loader is None:
        return f"example batch ({example.shape[0]} images)"
    live = [p for p in runners if results[p].status != "skipped"]
    agree = dict.fromkeys(live, 0)
    correct = dict.fromkeys(live, 0)
    seen = 0
    for x, y in _first_batches(loader, check_images):
        ref_pred = reference(x).argmax(-1)
        for path in live:
            pred = ref_pred if path == REFERENCE else runners[path](x).argmax(-1)
            agree[path] += (pred == ref_pred).sum().item()
            correct[path] += (pred == y.cpu()).sum().item()
        seen += y.numel()
    if seen == 0:
        raise ValueError("the validation loader yielded no images to check predictions on")
    for path in live:
        results[path].agreement, results[path].top1 = agree[path] / seen, correct[path] / seen
    return f"validation ({seen} images)"


def _too_slow(calls: dict[DeployPath, Callable[[], object]], settings: SpeedSettings) -> dict[DeployPath, float]:
    """The paths among ``calls`` that took over :data:`TOO_SLOW` times float32 eager's time in each of two
    rounds (one call each, against a fresh float32 eager call), with the smaller multiple. A path within
    the factor in its first round costs that one call."""
    if REFERENCE not in calls:
        return {}
    clock = synchronised_clock()
    reference = calls[REFERENCE]
    slow = {}
    with intra_op_threads(settings.num_threads):
        for path, call in calls.items():
            if path == REFERENCE:
                continue
            multiples = []
            for _ in range(2):
                multiple = warm_up(call, 0.0, clock) / warm_up(reference, 0.0, clock)
                if multiple <= TOO_SLOW:
                    break
                multiples.append(multiple)
            else:
                slow[path] = min(multiples)
    return slow


def fastest(
    model: nn.Module,
    example_batch: torch.Tensor,
    loader: Iterable | None = None,
    tolerance: Tolerance | None = None,
    settings: SpeedSettings | None = None,
    compile: bool = False,
    paths: Sequence[str] | None = None,
    check_images: int | None = None,
) -> Choice:
    """The fastest way to run ``model`` on this machine whose predictions stay within ``tolerance``.

    See the module's description for the steps and the rule. ``model`` itself is not changed; every
    path runs a prepared copy.

    Args:
        model: A float32 model in eval mode (a teacher, a student, a reducer).
        example_batch: Images (B, C, H, W) at the batch size the model will serve: every path is
            timed on this batch, and without a ``loader`` its logits are compared on it.
        loader: Validation batches ``(x, y, …)``: top-1 agreement with float32 is measured on them.
        tolerance: How far predictions may stray (:class:`Tolerance`'s defaults when None).
        settings: Device, pairs, block and warm-up times, threads of the timing; its ``batch_size``
            is replaced by the example batch's. By default 10 pairs on the model's device.
        compile: Also try ``torch.compile`` paths (their compilation, untimed, can take minutes).
        paths: Names of the paths to try (:attr:`DeployPath.name`, e.g. ``["bf16 eager", "int8
            onnxruntime"]``); by default all of :func:`candidate_paths`. Float32 eager is always tried.
        check_images: Compare at most this many validation images (all the loader gives when None).

    Raises:
        QuantizationError: a model in training mode.
        ValueError: an unknown path name, an empty loader, or an example batch that is not 4-D.
        TypeError: a ``tolerance`` or ``settings`` of another type (a number for ``tolerance``, say).
    """
    check_inference_ready(model, "fastest")
    if example_batch.ndim != 4:
        raise ValueError(f"example_batch must be images (B, C, H, W), got shape {tuple(example_batch.shape)}")
    if tolerance is None:
        tolerance = Tolerance()
    elif not isinstance(tolerance, Tolerance):
        raise TypeError(
            f"tolerance must be a dynvit.deploy.Tolerance, e.g. Tolerance(agreement=0.99, logits=0.1), got {tolerance!r}"
        )
    if settings is not None and not isinstance(settings, SpeedSettings):
        raise TypeError(
            f"settings must be a dynvit.measure.SpeedSettings, e.g. SpeedSettings(pairs=10), got {settings!r}"
        )
    device = torch.device(settings.device if settings is not None else next(model.parameters()).device)
    settings = _timing_settings(settings, device, example_batch)
    candidates = candidate_paths(device, compile)
    if paths is not None:
        known = {p.name: p for p in candidates}
        unknown = [name for name in paths if name not in known]
        if unknown:
            raise ValueError(f"unknown paths {unknown} on {device} (compile={compile}): choose from {list(known)}")
        candidates = [REFERENCE, *(known[n] for n in paths if known[n] != REFERENCE)]

    results = {p: PathResult(p) for p in candidates}
    runners: dict[DeployPath, Runner] = {}
    workdir = tempfile.TemporaryDirectory(prefix="dynvit-fastest-")
    # One export serves both onnxruntime paths (exported from a CPU copy: the file is the same
    # wherever the model lives); a refused export is refused once.
    exported = _Once(
        lambda: export_onnx(copy.deepcopy(model).cpu(), Path(workdir.name) / "model.onnx", example_batch[:8].cpu())
    )
    with keep_rng(device), warnings.catch_warnings():
        # Whether a precision has its instructions here is what the timings answer; the cpu record says why.
        warnings.simplefilter("ignore", SlowPrecisionWarning)
        for path in candidates:
            try:
                runners[path] = build_runner(model, path, device, exported, settings.num_threads)
            except Exception as e:  # each path that cannot be prepared here is reported, not fatal
                if path == REFERENCE:
                    raise
                results[path].status, results[path].reason = "skipped", _one_line(e)
        checked_on = _check_predictions(runners, results, example_batch, loader, check_images)
        for result in results.values():
            if result.status == "skipped":
                continue
            if loader is not None and result.agreement < tolerance.agreement:
                result.status = "refused"
                result.reason = f"top-1 agreement {result.agreement:.3f} < {tolerance.agreement:g}"
            elif loader is None and result.logits_error > tolerance.logits:
                result.status = "refused"
                result.reason = f"logits error {result.logits_error:.3g} > {tolerance.logits:g}"
        accepted = {p: runners[p].call(example_batch) for p in candidates if results[p].status == "accepted"}
        for path, times in _too_slow(accepted, settings).items():
            results[path].status = "too slow"
            results[path].reason = f"one call took {times:.1f}× float32 eager's; not timed in pairs"
        timed = [p for p in accepted if results[p].status == "accepted"]
        # With nothing else left, float32 eager is timed alone (for its images/s): pairs need a partner.
        calls = [accepted[p] for p in timed]
        timings = time_calls(calls, settings) if len(calls) > 1 else time_calls(calls, settings, reference=False)
    for path, timing in zip(timed, timings, strict=True):
        results[path].images_per_s, results[path].speedup = timing.images_per_s, timing.speedup
    faster = [p for p in timed if surely_faster(results[p].speedup)]
    chosen = max(faster, key=lambda p: results[p].speedup.value) if faster else REFERENCE
    results[REFERENCE].status = "reference"
    results[chosen].status = "chosen"
    precisions = sorted({p.precision for p in candidates})
    env = environment(device, settings.batch_size, precisions, settings.num_threads)
    env.update(pairs=settings.pairs, cpu_info=detect_cpu().record())
    return Choice(
        chosen=results[chosen],
        results=list(results.values()),
        runner=runners[chosen],
        tolerance=tolerance,
        checked_on=checked_on,
        environment=env,
        _workdir=workdir,
    )
