"""Writing output files: through a temporary file beside them, and checking an output path before any work.

Every file dynvit writes whole (a checkpoint, predictions, an ONNX export, a sweep's markers) goes through
:func:`staged`, so a crash or a failed check never leaves half a file. ``cli.py export`` and
``cli.py benchmark`` check their ``--out`` with :func:`check_output_file` or :func:`check_output_folder`
before they load or measure anything, so a path they cannot write fails in a second, not after minutes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def _option(path: Path, option: str | None) -> str:
    """How an error names the path: with the option it came from (``--out x``), else the path alone."""
    return f"{option} {path}" if option else str(path)


def _check_writable(path: Path, folder: Path, option: str | None) -> None:
    """Raise unless a file can be created in ``folder``'s nearest existing folder (``folder`` itself included),
    naming the output ``path`` (and its ``option``) in the error.

    Nothing is created on the way: a missing folder is made only when the output is written, so a run
    that fails before then leaves no empty folder. The probe makes and removes a file rather than asking
    ``os.access``, which says yes to root everywhere, also in ``/proc`` or on a read-only mount.
    """
    folder = next(p for p in (folder, *folder.parents) if p.exists())
    if not folder.is_dir():
        raise ValueError(f"cannot write {_option(path, option)}: {folder} is a file, not a folder; choose another path")
    probe = folder / f".dynvit-write-test-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as e:
        raise ValueError(
            f"cannot write {_option(path, option)}: no file can be created in {folder} ({e.strerror}); "
            "choose a folder you can write to"
        ) from None
    probe.unlink()


def check_output_file(path: str | Path, option: str | None = None, writable: bool = False) -> Path:
    """``path`` as a file to write, or a ValueError naming the fix: a folder, or a parent that is a file.

    Args:
        option: The command-line option the path came from (``--out``), named in the error.
        writable: Also check that the file can be created there (:func:`_check_writable`).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{_option(path, option)} is a folder: give the file to write in it, e.g. {path / 'model.onnx'}"
        )
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(
            f"cannot write {_option(path, option)}: {blocking} is a file, not a folder; choose another path"
        )
    if writable:
        _check_writable(path, path.parent, option)
    return path


def check_output_folder(path: str | Path, option: str | None = None) -> Path:
    """``path`` as a folder to write files into (it may not exist yet), or a ValueError naming the fix: a
    file there or above it, or a folder where no file can be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{_option(path, option)} is a file: give a folder to write the results into")
    _check_writable(path, path, option)
    return path


@contextlib.contextmanager
def staged(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write ``path`` through: it replaces ``path`` when the block ends
    and is removed when the block raises, so a failed write leaves whatever was at ``path`` as it was.

    The temporary file is created as a plain ``open()`` would create ``path`` (0o666 less the umask), not
    0o600 as ``tempfile.mkstemp`` does: the mode survives the rename, and a server running as another user
    must be able to read an exported model. ``os.open`` lets the kernel apply the umask, which reading it
    (``os.umask`` sets it to read it) could not do safely in a threaded process.
    """
    path = Path(path)
    check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        staging = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(staging, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:  # another writer's temporary file of the same name: draw another
            continue
    try:
        yield staging
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`staged`: the file is whole, or as it was."""
    path = Path(path)
    with staged(path) as staging:
        staging.write_text(text)
    return path
