"""Default loggers: a CSV file always, W&B offline unless the user asks to go online; W&B never blocks."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_warn


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
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None and self._wandb_init.get("mode") == "online":
            import wandb

            try:
                return WandbLogger.experiment.fget(self)
            except (wandb.errors.Error, TimeoutError) as error:
                self._wandb_init["mode"] = "offline"
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


def default_loggers(run_dir: str | Path, wandb: WandbOptions) -> list[Logger]:
    """CSV metrics in ``run_dir/csv`` plus, if enabled, W&B in ``run_dir/wandb``; never blocks on a network."""
    run_dir = Path(run_dir)
    loggers: list[Logger] = [CSVLogger(run_dir, name="csv")]
    if wandb.enabled:
        if wandb.online and not has_wandb_credentials():
            raise RuntimeError(
                "W&B online logging was asked for but wandb finds no credentials: run `wandb login` or set "
                "WANDB_API_KEY, or drop --wandb.online to log offline"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        # Offline is the default, so the SDK must not prompt for a login or probe the network.
        settings = {"init_timeout": wandb.init_timeout} if wandb.online else {"silent": True, "console": "off"}
        loggers.append(
            DynViTWandbLogger(
                save_dir=str(run_dir),
                project=wandb.project,
                name=wandb.name or run_dir.name,
                group=wandb.group,
                tags=wandb.tags or None,
                mode="online" if wandb.online else "offline",
                settings=settings,
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
