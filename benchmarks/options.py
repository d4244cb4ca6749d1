"""What every benchmark script checks of its options before it builds or times anything.

A script's first model takes seconds to build and its timings minutes, so a --json path that cannot be
written, --threads 0 or a GPU that is not here must stop it at once, as a usage error naming the fix
rather than a traceback (or, for --json, a traceback after the whole run, its results lost).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from dynvit.files import check_output_file
from dynvit.measure.throughput import check_device, check_speed_settings


@contextlib.contextmanager
def usage_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """A ValueError raised inside the ``with`` (dynvit's checks raise them, naming the fix) exits through
    ``parser.error``: the usage line and the message, exit status 2, no traceback."""
    try:
        yield
    except ValueError as error:
        parser.error(str(error))


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` once its --json, --threads and --device (those the script has) pass dynvit's checks."""
    with usage_errors(parser):
        if getattr(args, "json", None):
            check_output_file(args.json, "--json", writable=True)
        if getattr(args, "threads", None) is not None:
            check_speed_settings("--", threads=args.threads)
        if getattr(args, "device", None) is not None:
            check_device(args.device, "--device")
    return args
