"""A run folder holds one run: ``last.ckpt`` at the end of every epoch, and fit refuses to mix two runs.

Lightning 2.6's ``ModelCheckpoint(save_last=True)`` beside a monitored top-k rewrites ``last.ckpt`` only in
the epochs where it saved a top-k file, i.e. when the monitored metric improved: with a metric that stalls,
``last.ckpt`` stays at the last improvement (``ModelCheckpoint.on_validation_end`` /
``on_train_epoch_end`` save "last" only when ``_last_global_step_saved == trainer.global_step``). So the
CLI keeps Lightning's callback for ``best-*.ckpt`` only (``save_last`` off) and writes ``last.ckpt`` with
:class:`LastCheckpoint`, at the end of every training epoch, whatever any metric did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from dynvit.models.checkpoint import is_lightning_checkpoint, read_checkpoint_file

LAST = "last.ckpt"


class RunFolderError(ValueError):
    """A ``fit`` that would mix two runs in one folder, or a ``--ckpt_path last`` with nothing to load."""


class LastCheckpoint(Checkpoint):
    """Write ``<dirpath>/last.ckpt`` at the end of every training epoch (and so at the end of fit).

    Lightning calls this hook after the epoch's validation and after the module's own
    ``on_train_epoch_end``, and saves through a temporary file and a rename, so ``last.ckpt`` is always
    a whole checkpoint of the most recent finished epoch. It subclasses ``Checkpoint`` so that Lightning
    runs it among the checkpoint callbacks, after the ones that update metrics.

    Args:
        dirpath: The run's checkpoint folder.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        trainer.save_checkpoint(self.path, weights_only=False)


@dataclass(frozen=True)
class Progress:
    """How far the run saved in a checkpoint got: finished epochs and optimiser steps."""

    epochs: int
    steps: int

    def reached(self, max_epochs: int | None, max_steps: int) -> bool:
        """Whether a fit with these limits (Lightning's: -1 or None for none) would train no further."""
        return (max_steps is not None and max_steps != -1 and self.steps >= max_steps) or (
            max_epochs is not None and max_epochs != -1 and self.epochs >= max_epochs
        )

    def __str__(self) -> str:
        return f"{self.epochs} epoch(s), step {self.steps}"


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """A checkpoint's contents, memory-mapped (tensors are read only when touched); a missing, unreadable or
    damaged file is an error naming it as ``what`` (see :func:`~dynvit.models.checkpoint.read_checkpoint_file`)."""
    return read_checkpoint_file(path, mmap=True, what=what)


def read_ckpt_path(path: str | Path, run: bool, weights_option: str | None = None) -> Any:
    """The contents of a ``--ckpt_path``, checked before Lightning loads it: an error naming the fix for a
    missing, unreadable or damaged file and, where a run is restored, for a file that is no Lightning
    checkpoint.

    Args:
        path: The file.
        run: Whether the subcommand restores a run from it (``fit``, ``validate``, ``test``, ``predict``:
            Lightning reads the run's state, which plain model weights do not have), or loads weights
            only (``export``, ``benchmark``: any checkpoint :func:`~dynvit.load_checkpoint` reads).
        weights_option: The model's option that loads plain weights (``--model.init_args.checkpoint``),
            suggested for them; None if the model has none.
    """
    contents = read_checkpoint(path, what="--ckpt_path")
    if run and not is_lightning_checkpoint(contents):
        holds = "plain model weights" if isinstance(contents, dict) else f"a {type(contents).__name__}"
        instead = (
            f"start from its weights with {weights_option} {path} instead (and no --ckpt_path)"
            if weights_option
            else "load its weights into the model instead"
        )
        raise RunFolderError(
            f"--ckpt_path {path} holds {holds}, not a Lightning checkpoint of a dynvit run: --ckpt_path restores "
            f"a run that cli.py fit wrote (its .ckpt files); {instead}"
        )
    return contents


def read_progress(path: str | Path) -> Progress:
    """Finished epochs and global step recorded in a Lightning checkpoint."""
    ckpt = read_checkpoint(path)
    try:
        epochs = int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        epochs = int(ckpt.get("epoch", -1)) + 1
    return Progress(epochs=epochs, steps=int(ckpt.get("global_step", 0)))


def held_checkpoints(folder: Path) -> list[Path]:
    """The checkpoint files a run folder's checkpoint directory holds."""
    return sorted(folder.glob("*.ckpt")) if folder.is_dir() else []


def resolve_last(folder: Path) -> Path:
    """``--ckpt_path last``: the folder's ``last.ckpt``, or a :class:`RunFolderError` saying there is none."""
    path = folder / LAST
    if not path.is_file():
        held = held_checkpoints(folder)
        also = f" (it holds {', '.join(p.name for p in held)})" if held else ""
        raise RunFolderError(
            f"--ckpt_path last: there is no {path}{also}, so there is no run to continue. Drop --ckpt_path to "
            "start a new run, or point --trainer.default_root_dir at the run to continue"
        )
    return path


def check_fit_folder(folder: Path, run_dir: Path, ckpt_path: str | None) -> None:
    """Refuse a ``fit`` into a run folder that already holds a run, unless it continues from its ``last.ckpt``.

    Args:
        folder: The run's checkpoint folder.
        run_dir: The run folder (``trainer.default_root_dir``), named in the message.
        ckpt_path: The fit's ``--ckpt_path``, already resolved (``last`` → a path).
    """
    held = held_checkpoints(folder)
    if not held:
        return
    last = folder / LAST
    if ckpt_path is not None and Path(ckpt_path).resolve() == last.resolve():
        return
    state = f"{LAST} after {read_progress(last)}" if last.is_file() else ", ".join(p.name for p in held)
    raise RunFolderError(
        f"{run_dir} already holds a run ({folder}: {state}); a run folder holds one run. Either continue it "
        f"with --ckpt_path last, or start a new run in another folder (--trainer.default_root_dir), or delete "
        f"{run_dir} first"
    )


def describe_teachers(ckpt_path: str | Path | None, current: dict[str, Any] | None) -> list[str]:
    """Lines saying which teacher the student in ``ckpt_path`` was distilled from (its record, see
    :class:`~dynvit.lightning.DynamicViTModule`) and which teacher this run compares against (``current``)."""
    lines = []
    recorded = None
    if ckpt_path is not None and Path(ckpt_path).suffix != ".safetensors":
        meta = read_checkpoint(ckpt_path)
        recorded = meta.get("dynvit", {}).get("teacher") if isinstance(meta, dict) else None
        lines.append(
            f"student {ckpt_path}: distilled from {_teacher(recorded) if recorded else 'an unrecorded teacher'}"
        )
    if current is not None:
        same = ""
        if recorded and recorded.get("sha256") and current.get("sha256"):
            same = " (the same file)" if recorded["sha256"] == current["sha256"] else " (NOT the student's teacher)"
        lines.append(f"teacher here: {_teacher(current)}{same}")
    return lines


def _teacher(record: dict[str, Any]) -> str:
    if record.get("pretrained"):
        return str(record["pretrained"])
    if record.get("path") is None:
        return "a randomly initialised teacher"
    return f"{record['path']} (sha256 {record['sha256']})"
