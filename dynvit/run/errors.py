"""Command-line errors that end with their own message.

dynvit checks its inputs and raises errors whose message says what to fix. Raised while LightningCLI
builds the model or data, such an error reaches the user wrapped by jsonargparse ("Does not validate
against any of the Union subtypes … Given value: Namespace(...)") under two chained tracebacks.
:func:`run_reporting_errors` prints dynvit's message alone instead, and exits with status 1.
``DYNVIT_TRACEBACK=1`` in the environment shows the full traceback instead.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

TRACEBACK_ENV = "DYNVIT_TRACEBACK"
_PACKAGE = Path(__file__).resolve().parents[1]
# What jsonargparse raises when a class given by `class_path` fails to build; the real error is its cause.
_UNION_WRAPPER = "Does not validate against any of the Union subtypes"

T = TypeVar("T")


def _raised_by_dynvit(error: BaseException) -> bool:
    """Whether a ``raise`` statement of dynvit's own code raised ``error`` (a message meant for the user),
    rather than the interpreter or a dependency (an ``assert`` or an ``IndexError`` keeps its traceback)."""
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    if not frames:
        return False
    last = frames[-1]
    return Path(last.filename).resolve().is_relative_to(_PACKAGE) and (last.line or "").lstrip().startswith("raise")


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def user_error(error: BaseException) -> BaseException | None:
    """The outermost exception in ``error``'s chain that dynvit raised for the user, if any."""
    return next((e for e in _chain(error) if isinstance(e, Exception) and _raised_by_dynvit(e)), None)


def unwrapped(error: BaseException) -> BaseException:
    """``error`` without jsonargparse's wrapper around a class that failed to build."""
    if str(error).startswith(_UNION_WRAPPER) and error.__cause__ is not None:
        return error.__cause__
    return error


def run_reporting_errors(fn: Callable[..., T], *args, **kwargs) -> T:
    """Call ``fn``; if dynvit raised an error for the user, print its message alone and exit with status 1.

    Other errors (a bug, a dependency's failure) keep their traceback, less jsonargparse's wrapper around
    a class that failed to build.
    With ``DYNVIT_TRACEBACK=1`` every error propagates unchanged.
    """
    if os.environ.get(TRACEBACK_ENV, "").lower() in ("1", "true", "yes"):
        return fn(*args, **kwargs)
    try:
        return fn(*args, **kwargs)
    except Exception as error:
        ours = user_error(error)
        inner = unwrapped(error)
        if ours is None and inner is error:
            raise
        sys.stdout.flush()
        if ours is not None:
            print(f"error: {ours}", file=sys.stderr)
        else:
            traceback.print_exception(inner)
        sys.exit(1)
