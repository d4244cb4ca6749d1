"""Default loggers: a CSV file always, W&B offline unless the user asks to go online."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger


@dataclass
class WandbOptions:
    """How runs reach Weights & Biases.

    Args:
        enabled: Log to W&B at all (the CSV log is always written).
        online: Sync to the W&B server (needs ``wandb login``). Off by default: runs are written to
            ``<run folder>/wandb/offline-run-*`` and can be uploaded later with ``wandb sync``.
        project, name, group, tags: The usual W&B run metadata.
    """

    enabled: bool = True
    online: bool = False
    project: str = "dynvit"
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


def default_loggers(run_dir: str | Path, wandb: WandbOptions) -> list[Logger]:
    """CSV metrics in ``run_dir/csv`` plus, if enabled, W&B in ``run_dir/wandb``; never blocks on a network."""
    run_dir = Path(run_dir)
    loggers: list[Logger] = [CSVLogger(run_dir, name="csv")]
    if wandb.enabled:
        if wandb.online and not _has_wandb_credentials():
            raise RuntimeError(
                "W&B online logging was asked for but no API key is set: run `wandb login` or set WANDB_API_KEY, "
                "or drop --wandb.online to log offline"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        loggers.append(
            WandbLogger(
                save_dir=str(run_dir),
                project=wandb.project,
                name=wandb.name or run_dir.name,
                group=wandb.group,
                tags=wandb.tags or None,
                offline=not wandb.online,
                # Offline is the default, so the SDK must not prompt for a login or probe the network.
                settings={"silent": True, "console": "off"} if not wandb.online else None,
            )
        )
    return loggers


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
