"""Keep-ratio sweeps: a W&B grid sweep file run locally, one training run per point, then a summary.

The same file drives ``wandb sweep``/``wandb agent`` (online, W&B schedules the runs) and
``python cli.py sweep`` (here, no server): every point is the ``fit`` W&B's agent would start,
``fit --config <config> --<key>=<value> …``. Runs happen one after another in this process, so the
config is parsed, checked and built once, and no interpreter start-up is paid per point. A point that
fails (a method whose loss turns NaN) has its traceback printed and kept in its ``failed.txt``, and the
grid goes on: the summary holds the other points, and the sweep then stops with an error naming the failed
ones, which a rerun tries again. An interrupted point (Ctrl-C) stops the sweep at once.

Layout of a sweep folder::

    config.yaml            the fit config every point starts from (rerunning with another is an error)
    teacher.json           the teacher row, measured once
    keep_ratio_0.7/        one run: checkpoints/, csv/, wandb/, and done.json when it has finished
                           (failed.txt, its traceback, when its last try failed)
    summary.csv/.json, tradeoff.png
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import re
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentParser, Namespace

from dynvit import methods as registry
from dynvit.files import write_text
from dynvit.measure.allocator import keep_freed_memory
from dynvit.measure.callbacks import ThroughputCallback, networks, precision_dtype
from dynvit.measure.environment import environment
from dynvit.measure.evaluate import LimitedLoader, count_images, evaluate
from dynvit.measure.flops import count_flops, count_params
from dynvit.measure.throughput import keep_rng, time_model
from dynvit.reducers.matching import student_at
from dynvit.run.benchmark import check_ratios
from dynvit.run.grid_report import point_variant, write_grid_report
from dynvit.run.report import ResultRow, format_table, write_report

DONE = "done.json"
FAILED = "failed.txt"
TEACHER = "teacher.json"
CONFIG = "config.yaml"


@dataclass
class SweepSpec:
    """The parts of a W&B sweep file a local grid run uses.

    Attributes:
        path: The file.
        parameters: Config key → the values to try, in file order.
        name: The sweep's ``name`` (used as the W&B group), if the file gives one.
    """

    path: Path
    parameters: dict[str, list[Any]]
    name: str | None = None


class SweepError(ValueError):
    """A sweep file or a sweep folder that cannot be run as asked, or points of it that failed."""


class SweepInterrupted(RuntimeError):
    """A point's training was interrupted (Ctrl-C): the sweep stops rather than go on to the next point."""


@runtime_checkable
class DescribesPoint(Protocol):
    """A module that says what its row in a grid is (:class:`~dynvit.lightning.MethodFineTuning`): the method,
    the budget ρ, the method's setting and the track, where its network alone cannot say."""

    def point_fields(self) -> dict[str, Any]: ...


@runtime_checkable
class ChecksPoint(Protocol):
    """A module that can check a grid point's method and keep ratio before anything trains."""

    def check_point(self, keep_ratio: float | None, method: str | None) -> None: ...


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a W&B sweep file for a local grid run.

    It must be a mapping with ``method: grid`` and ``parameters`` whose entries each give
    ``values: [...]`` (or a single ``value:``), as ``wandb sweep`` expects.
    """
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise SweepError(f"{path} is not a W&B sweep file: expected a mapping with method, parameters, command")
    method = data.get("method")
    if method != "grid":
        raise SweepError(
            f"{path}: method is {method!r}; a local sweep runs every point, so it needs `method: grid` "
            "(random/bayes sweeps need W&B's server: `wandb sweep` + `wandb agent`)"
        )
    params = data.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{path}: `parameters` must map config keys to {{values: [...]}}, got {params!r}")
    parameters: dict[str, list[Any]] = {}
    for key, entry in params.items():
        if isinstance(entry, dict) and isinstance(entry.get("values"), list) and entry["values"]:
            parameters[str(key)] = list(entry["values"])
        elif isinstance(entry, dict) and "value" in entry:
            parameters[str(key)] = [entry["value"]]
        else:
            raise SweepError(
                f"{path}: parameter {key!r} must give `values: [...]` (a non-empty list) or `value: x` for a "
                f"grid sweep, got {entry!r}"
            )
    command = data.get("command")
    if command is not None and not (isinstance(command, list) and all(isinstance(c, str) for c in command)):
        raise SweepError(f"{path}: `command` must be a list of strings (W&B's format), got {command!r}")
    spec = SweepSpec(path=path, parameters=parameters, name=data.get("name"))
    check_distinct_points(spec)
    return spec


def check_distinct_points(spec: SweepSpec) -> None:
    """Raise :class:`SweepError` if two points would share a folder: the second would be skipped as done and
    its row be the first's, counted twice (as two seeds of one result in the grid report)."""
    first: dict[str, dict[str, Any]] = {}
    for point in grid(spec):
        name = point_name(point)
        if name in first:
            raise SweepError(
                f"{spec.path}: sweep points {first[name]} and {point} would share the folder {name!r}: list each "
                "value once, and give parameters values (and last key parts) that differ in letters, digits or _.+-"
            )
        first[name] = point


def grid(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the parameters' values, the first parameter varying slowest."""
    keys = list(spec.parameters)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*spec.parameters.values())]


def point_args(point: dict[str, Any]) -> list[str]:
    """``--key=value`` for each parameter: what W&B's ``${args}`` expands to."""
    return [f"--{key}={value}" for key, value in point.items()]


def point_name(point: dict[str, Any]) -> str:
    """A folder and run name: ``keep_ratio_0.7`` (last part of each key), ``__`` between parameters."""
    parts = [f"{key.rsplit('.', 1)[-1]}_{value}" for key, value in point.items()]
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", "__".join(parts))


def check_parameters(spec: SweepSpec, config: Namespace, student: torch.nn.Module | None = None) -> None:
    """Raise :class:`SweepError` unless every parameter is a key of ``config`` and every keep ratio
    is in (0, 1] (and, given the ``student``, fits it: at least one token left at every stage)."""
    keys = [str(k) for k in config.keys()]  # noqa: SIM118 (dotted leaf keys, not top-level ones)
    for key, values in spec.parameters.items():
        if key not in config:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise SweepError(f"{spec.path}: parameter {key!r} is not a key of the config{hint}")
        if key.rsplit(".", 1)[-1] == "method":
            for value in values:
                if not isinstance(value, str):  # a list or mapping would fail the registry's lookup with a traceback
                    raise SweepError(
                        f"{spec.path}: parameter {key!r}: method names are strings, got {value!r}: list one name per "
                        "value, e.g. values: [tome, evit]"
                    )
                try:
                    registry.get(value)
                except ValueError as e:
                    raise SweepError(f"{spec.path}: parameter {key!r}: {e}") from e
        if key.rsplit(".", 1)[-1] != "keep_ratio":
            continue
        try:
            ratios = check_ratios(values)
        except (TypeError, ValueError) as e:
            raise SweepError(f"{spec.path}: parameter {key!r}: {e}") from e
        try:
            set_ratio = None if student is None else student_at(student)
        except TypeError:  # no student whose keep ratio the sweep could check
            set_ratio = None
        if set_ratio is not None:
            original = student.keep_ratio
            try:
                for ratio in ratios:
                    set_ratio(ratio)
            except ValueError as e:
                raise SweepError(f"{spec.path}: parameter {key!r}: {e}") from e
            finally:
                set_ratio(original)


def check_points(spec: SweepSpec, module: Any) -> None:
    """Check every point's method and keep ratio on ``module`` (a :class:`ChecksPoint`; others are not checked
    here), so a method that does not exist or a ratio that keeps no token fails before the first point trains."""
    if not isinstance(module, ChecksPoint):
        return
    for point in grid(spec):
        by_leaf = {key.rsplit(".", 1)[-1]: value for key, value in point.items() if key.startswith("model.")}
        try:
            module.check_point(by_leaf.get("keep_ratio"), by_leaf.get("method"))
        except ValueError as e:
            raise SweepError(f"{spec.path}: sweep point {point}: {e}") from e


def check_points_parse(parser: ArgumentParser, config_path: Path, points: Sequence[dict[str, Any]]) -> None:
    """Parse every point's ``fit`` arguments now, so a value of the wrong type fails before training."""
    exit_on_error, parser.exit_on_error = parser.exit_on_error, False
    try:
        for point in points:
            try:
                parser.parse_args([f"--config={config_path}", *point_args(point)])
            except Exception as e:  # jsonargparse raises ArgumentError with the offending key
                raise SweepError(f"sweep point {point} does not parse: {e}") from e
    finally:
        parser.exit_on_error = exit_on_error


def fit_config_text(parser: ArgumentParser, config: Namespace, drop: Sequence[str]) -> str:
    """The parsed config as ``fit`` YAML: ``config`` dumped by its subcommand ``parser``, less the keys in
    ``drop`` (the sweep subcommand's own arguments)."""
    data = yaml.safe_load(parser.dump(config, skip_none=False))
    for key in drop:
        data.pop(key, None)
    return yaml.safe_dump(data, sort_keys=False)


def prepare_folder(out: Path, config_text: str) -> Path:
    """Create the sweep folder with ``config.yaml``; refuse one that holds a sweep of another config."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG
    if path.is_file() and path.read_text() != config_text:
        raise SweepError(
            f"{out} holds a sweep of another config ({path} differs from this one): pass another --out, or "
            "delete the folder to start over"
        )
    # Staged: a config.yaml cut short would read as "another config" and turn the next run of this sweep away.
    return write_text(path, config_text)


def teacher_row(
    module: L.LightningModule, datamodule: L.LightningDataModule | None, trainer: L.Trainer
) -> ResultRow | None:
    """The teacher measured once, as the ``fit`` runs' throughput callbacks time it (their settings and device).

    Each point's speedup comes from its own fit, where the callback timed the student in pairs with
    this teacher; the teacher's images/s here is for the table only. Its top-1 is on the validation
    batches the points' fits validate on (``trainer.limit_val_batches``).
    """
    _, teacher = networks(module)
    if teacher is None:
        return None
    speed = next((cb for cb in trainer.callbacks if isinstance(cb, ThroughputCallback)), ThroughputCallback())
    device = trainer.strategy.root_device
    settings = dataclasses.replace(speed.settings, device=device)
    loader = None
    if datamodule is not None:
        datamodule.prepare_data()
        datamodule.setup("validate")
        loader = LimitedLoader(datamodule.val_dataloader(), trainer.limit_val_batches)
    teacher.to(device)
    with keep_rng(device):
        row = ResultRow("teacher", 1.0, count_flops(teacher), count_params(teacher), speedup=1.0)
    row.images_per_s = time_model(teacher, settings, speed.dtype or precision_dtype(trainer.precision)).images_per_s
    if loader is not None:
        scored = evaluate(teacher, loader, device)
        row.top1, row.recall, row.purity, row.images = scored.top1, scored.recall, scored.purity, scored.images
    return row


def sweep_environment(trainer: L.Trainer) -> dict[str, Any]:
    """The machine and the throughput callback's settings the points are timed with."""
    speed = next((cb for cb in trainer.callbacks if isinstance(cb, ThroughputCallback)), ThroughputCallback())
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(speed.dtype or precision_dtype(trainer.precision))
    if speed.settings.keep_freed_memory:
        # The points' timing will keep freed memory; from now on, so that the record is true of all of them.
        keep_freed_memory()
    return environment(trainer.strategy.root_device, speed.settings.batch_size, [precision or "fp32"])


def point_row(trainer: L.Trainer, module: L.LightningModule, run: str) -> ResultRow:
    """A finished run's row: cost of its network, its throughput callback's numbers, its last validation."""
    net, _ = networks(module)
    speed = next((cb.metrics for cb in trainer.callbacks if isinstance(cb, ThroughputCallback)), {})
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    stages = itertools.takewhile(lambda s: f"val/recall_s{s}" in metrics, itertools.count(1))
    recall = [metrics[f"val/recall_s{s}"] for s in stages]
    loader = trainer.val_dataloaders
    loader = loader[0] if isinstance(loader, (list, tuple)) else loader
    row = ResultRow(
        method=getattr(net, "method", type(net).__name__.lower()),
        keep_ratio=float(getattr(net, "keep_ratio", 1.0)),
        gflops=count_flops(net),
        params_m=count_params(net),
        images_per_s=speed.get("throughput/images_per_s"),
        speedup=speed.get("throughput/speedup"),
        speedup_low=speed.get("throughput/speedup_low"),
        speedup_high=speed.get("throughput/speedup_high"),
        latency_ms=speed.get("throughput/latency_ms"),
        latency_speedup=speed.get("throughput/latency_speedup"),
        latency_speedup_low=speed.get("throughput/latency_speedup_low"),
        latency_speedup_high=speed.get("throughput/latency_speedup_high"),
        top1=metrics.get("val/top1"),
        recall=recall,
        purity=metrics.get("val/purity"),
        run=run,
        images=None if loader is None else count_images(LimitedLoader(loader, trainer.limit_val_batches)),
    )
    if isinstance(module, DescribesPoint):
        row = dataclasses.replace(row, **module.point_fields())
    return row


def fit_point(
    cli_class: Callable[..., Any], config_path: Path, point: dict[str, Any], run_dir: Path, group: str
) -> ResultRow:
    """Train one point in this process (continuing from its ``last.ckpt`` if there is one) and return its row."""
    args = [
        "fit",
        f"--config={config_path}",
        *point_args(point),
        f"--trainer.default_root_dir={run_dir}",
        f"--checkpoint.dirpath={run_dir / 'checkpoints'}",
        f"--wandb.group={group}",
        f"--wandb.name={run_dir.name}",
    ]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        args.append("--ckpt_path=last")
    finished = False
    try:
        # Inside the try: building the CLI runs the fit, and a fit that fails must close its W&B run too.
        with warnings.catch_warnings():
            # The sweep's own command line is in sys.argv; the point's arguments are passed explicitly on purpose.
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
            cli = cli_class(args=args)
        if cli.trainer.interrupted:
            raise SweepInterrupted(f"training of {run_dir.name} was interrupted; rerun the sweep to resume it")
        if cli.finished is not None or "val/top1" not in cli.trainer.callback_metrics:
            # The point had already trained to the end (it stopped before writing done.json): fit trained
            # nothing and did no validation, so validate its last checkpoint.
            cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=cli.finished, verbose=False)
        if cli.finished is not None:
            # Nor did fit end, where the throughput callback times the point: time it now, or its row would
            # have no images/s, speedup or latency where the uninterrupted point's has them.
            for callback in cli.trainer.callbacks:
                if isinstance(callback, ThroughputCallback):
                    callback.on_fit_end(cli.trainer, cli.model)
        row = point_row(cli.trainer, cli.model, run_dir.name)
        finished = True
        return row
    finally:
        import wandb

        # One W&B run per point: close this one (marked failed if the point failed) before the next point opens
        # its own, which would otherwise log into it.
        if wandb.run is not None:
            wandb.finish(exit_code=0 if finished else 1)


class SweepResult(NamedTuple):
    """What :func:`run_sweep` did: the summary rows, the points it trained now, the files it wrote."""

    rows: list[ResultRow]
    trained: list[str]
    paths: dict[str, Path]


def run_sweep(
    spec: SweepSpec,
    out: Path,
    config_path: Path,
    fit: Callable[[Path, dict[str, Any], Path, str], ResultRow],
    teacher: Callable[[], ResultRow | None],
    environment: dict[str, Any] | None = None,
) -> SweepResult:
    """Run the grid's unfinished points one by one, then write the summary.

    Args:
        spec: The checked sweep.
        out: The sweep folder (see :func:`prepare_folder`).
        config_path: The fit config every point starts from.
        fit: Trains one point: ``fit(config_path, point, run_dir, group) -> row``.
        teacher: Measures the teacher row (called once; cached in ``teacher.json``).
        environment: The machine and timing settings, written into the summary files.
    """
    group = spec.name or out.name
    teacher_file = out / TEACHER
    if teacher_file.is_file():
        cached = json.loads(teacher_file.read_text())
        top = ResultRow.from_flat(cached) if cached else None
    else:
        top = teacher()
        write_text(teacher_file, json.dumps(top.flat() if top else None, indent=2))
    rows = [top] if top else []
    trained, failed = [], []
    for point in grid(spec):
        run_dir = out / point_name(point)
        done = run_dir / DONE
        if not done.is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                row = fit(config_path, point, run_dir, group)
            except SweepInterrupted:
                raise
            except Exception:
                # One point's failure (a diverging method, a machine's hiccup) must not cost the rest of the
                # grid: keep its traceback beside its run and go on; the sweep ends in an error naming it.
                traceback.print_exc()
                write_text(run_dir / FAILED, traceback.format_exc())
                failed.append(run_dir.name)
                continue
            (run_dir / FAILED).unlink(missing_ok=True)
            write_text(done, json.dumps(row.flat(), indent=2))
            trained.append(run_dir.name)
        rows.append(ResultRow.from_flat(json.loads(done.read_text())))
    if not any(row.method != "teacher" for row in rows):
        raise SweepError(f"every point of {spec.path} failed: {_failures(out, failed)}")
    paths = write_report(rows, out, stem="summary", title=f"sweep {group}", environment=environment)
    print(format_table(rows))
    if any(row.track for row in rows):
        # A fine-tuning grid: both tracks side by side per method and budget, with the budgets they trained on.
        variants = {point_name(point): point_variant(point) for point in grid(spec)}
        paths.update(
            write_grid_report(
                rows, out, config_path, swept=list(spec.parameters), environment=environment, variants=variants
            )
        )
        print(paths["grid"].read_text())
    print("\n".join(f"wrote {p}" for p in paths.values()))
    if failed:
        raise SweepError(
            f"{len(failed)} of {len(grid(spec))} points failed, the summary leaves them out: {_failures(out, failed)}"
        )
    return SweepResult(rows, trained, paths)


def _failures(out: Path, failed: Sequence[str]) -> str:
    """The failed points, each with its error's last line, and what to do."""
    lines = [f"{name} ({(out / name / FAILED).read_text().strip().splitlines()[-1]})" for name in failed]
    return (
        f"{'; '.join(lines)}. Their tracebacks are in <point>/{FAILED}; fix the cause and rerun the sweep to retry them"
    )
