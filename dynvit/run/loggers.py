"""Default loggers: a CSV file always, W&B offline unless the user asks to go online; W&B never blocks.

A run folder's logs are one run's: ``fit`` logs into ``<run folder>/csv/version_N`` and
``<run folder>/wandb``, and a resumed fit continues both (the same ``metrics.csv``, the same W&B run id);
``validate``, ``test``, ``predict`` and the other subcommands log into ``<run folder>/<subcommand>/``.
"""

from __future__ import annotations

import csv
import logging
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

# Where a fit keeps its W&B run id, so that a resumed fit continues the same W&B run.
RUN_ID_FILE = Path("wandb") / "run-id"


@dataclass
class WandbOptions:
    """How runs reach Weights & Biases.

    Args:
        enabled: Log to W&B at all (the CSV log is always written).
        online: Sync to the W&B server (needs ``wandb login`` or ``WANDB_API_KEY``). Off by default: runs
            are written to ``<run folder>/wandb/offline-run-*`` and can be uploaded later with ``wandb sync``.
            If the server cannot be reached within ``init_timeout`` seconds, the run logs offline instead,
            with a warning.
        init_timeout: Seconds to wait for the W&B server when starting an online run (wandb's ``init_timeout``).
        project, name, group, tags: The usual W&B run metadata.
    """

    enabled: bool = True
    online: bool = False
    init_timeout: float = 30.0
    project: str = "dynvit"
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


class DynViTWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` that never blocks a run and passes W&B only what it uses.

    - An online run that cannot start (no network within ``init_timeout``, a key the server refuses)
      logs offline instead, with a warning saying how to upload it later.
    - Lightning always passes ``anonymous`` to ``wandb.init``, which current wandb answers with
      "The anonymous setting has no effect": it is dropped.
    - Offline is chosen with ``wandb.init(mode="offline")`` rather than Lightning's ``offline=True``,
      which sets ``WANDB_MODE`` for the whole process.
    - Its folder is made when the run starts, not before.
    - An offline run that replaces an online one gets its own id (wandb holds on to the online one's).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None and self.save_dir is not None:
            # Made when the run starts, so that a command that logs nothing leaves no folder.
            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
        if self._experiment is None and self._wandb_init.get("mode") == "online":
            import wandb

            try:
                return WandbLogger.experiment.fget(self)
            except (wandb.errors.Error, TimeoutError) as error:
                self._wandb_init["mode"] = "offline"
                # wandb keeps the failed run's id taken in this process ("run ID … is in use"): the
                # offline run gets its own.
                self._wandb_init.pop("id", None)
                self._wandb_init.pop("resume", None)
                self._id = None
                rank_zero_warn(
                    f"W&B could not start an online run ({type(error).__name__}: {str(error).splitlines()[0]}); "
                    f"logging offline to {self.save_dir}/wandb/offline-run-* instead. Upload it later with "
                    "`wandb sync <that folder>`"
                )
        return WandbLogger.experiment.fget(self)


def has_wandb_credentials() -> bool:
    """Whether wandb finds credentials for its server (``WANDB_API_KEY``, ``wandb login``'s file, its settings),
    asked of wandb itself, without a prompt, without the network and without starting wandb's service.

    The login is made silent for the check: a login that prints asks the server whose key it is, which
    starts ``wandb-core`` for this process, and without a network that request can leave the process
    waiting forever at exit (docs/reference.md, "W&B at exit").
    """
    import wandb
    from wandb.sdk import wandb_setup

    settings = wandb_setup.singleton().settings
    silent = settings.silent
    settings.silent = True
    try:
        return bool(wandb.login(prompt=False, verify=False))
    finally:
        settings.silent = silent


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing the ``metrics.csv`` already in its folder rather than deleting it
    (which Lightning's ``_check_log_dir_exists`` does, with a warning): new rows are appended under the
    file's header, and new columns rewrite the file with the old rows kept."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class ContinuedCSVLogger(CSVLogger):
    """A ``CSVLogger`` whose ``version`` folder may already hold metrics: a resumed run appends to them."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


def latest_version(root: Path) -> int | None:
    """The highest N of the ``version_N`` folders in ``root`` (a CSV logger's), or None if there is none."""
    numbers = [p.name.removeprefix("version_") for p in root.glob("version_*") if p.is_dir()]
    return max((int(n) for n in numbers if n.isdigit()), default=None)


def wandb_run_id(folder: Path, resume: bool) -> str:
    """The W&B run id of the fit in ``folder``: the one it recorded in ``folder/wandb/run-id`` when resuming,
    else a new one, recorded there (by the process of rank 0)."""
    path = folder / RUN_ID_FILE
    if resume and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B's ids are 8 lower-case letters and digits
    if rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id)
    return run_id


def default_loggers(
    run_dir: str | Path, wandb: WandbOptions, job: str = "fit", resume: bool = False, wandb_id: bool = True
) -> list[Logger]:
    """CSV metrics plus, if enabled, W&B (never blocking on a network) for one job of a run folder.

    Args:
        run_dir: The run folder.
        wandb: How runs reach W&B.
        job: The subcommand. ``fit`` logs into ``run_dir/csv/version_N`` and ``run_dir/wandb``; any other
            (``validate``, ``test``, ``predict``, …) into ``run_dir/<job>/``, as a W&B run of that job type,
            so that evaluating a run adds nothing to its training logs.
        resume: A fit that continues the run in ``run_dir``: its metrics go on in the latest
            ``csv/version_N`` and its W&B run keeps the id the run started with.
        wandb_id: Give the W&B run dynvit's id; off where something else names the run (``wandb agent``).
    """
    run_dir = Path(run_dir)
    folder = run_dir if job == "fit" else run_dir / job
    version = latest_version(folder / "csv") if resume else None
    loggers: list[Logger] = [
        CSVLogger(folder, name="csv") if version is None else ContinuedCSVLogger(folder, name="csv", version=version)
    ]
    if wandb.enabled:
        if wandb.online and not has_wandb_credentials():
            raise RuntimeError(
                "W&B online logging was asked for but wandb finds no credentials: run `wandb login` or set "
                "WANDB_API_KEY, or drop --wandb.online to log offline"
            )
        # Offline is the default, so the SDK must not prompt for a login or probe the network.
        settings = {"init_timeout": wandb.init_timeout} if wandb.online else {"silent": True, "console": "off"}
        name = wandb.name or run_dir.name
        run = {"id": wandb_run_id(folder, resume), "resume": "allow"} if job == "fit" and wandb_id else {}
        loggers.append(
            DynViTWandbLogger(
                save_dir=str(folder),
                project=wandb.project,
                name=name if job == "fit" else f"{name}-{job}",
                group=wandb.group,
                tags=wandb.tags or None,
                mode="online" if wandb.online else "offline",
                settings=settings,
                job_type=job,
                **run,
            )
        )
    return loggers


def quiet_known_noise() -> None:
    """Silence what a normal run prints that tells the user nothing; every other warning stays.

    - torch's ``isinstance(treespec, LeafSpec)`` FutureWarning, raised by Lightning's own code;
    - Lightning's "💡 Tip" advertising its cloud logger.
    (The frozen teacher's "modules in eval mode" warning is silenced by the module that froze it.)
    """
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTip) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLightningTip())


class _DropLightningTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")
