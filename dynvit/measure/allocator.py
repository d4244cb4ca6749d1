"""Host memory that stays put while timing.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a large request with a fresh
``mmap`` and returns it to the kernel on ``free``, so such a tensor page-faults on every call. Whether a
request counts as large is decided by a threshold that glibc moves as the process frees memory, so it
depends on what the process did before. Two processes that time the same model on the same weights
then differ, and not alike: a model with larger activations (the teacher) faults more than its
pruned student, so the speedup itself moves from process to process (BENCHMARKS.md, "Repeatability").

:func:`keep_freed_memory` makes glibc keep what is freed in the heap for reuse, which is what
jemalloc and tcmalloc (the allocators PyTorch's CPU tuning guide recommends) do anyway.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# The largest int mallopt accepts: the heap's free top is never handed back.
_NEVER_TRIM = 2**31 - 1

_kept = False


def _preloaded() -> str | None:
    """A replacement allocator put in front of glibc with ``LD_PRELOAD``, if any."""
    preload = os.environ.get("LD_PRELOAD", "")
    return next((name for name in ("jemalloc", "tcmalloc", "mimalloc") if name in preload), None)


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory in the heap, for the rest of the process.

    After this call no allocation is served by ``mmap`` and the heap is never trimmed, so a tensor
    freed after one call is reused by the next without page faults; the process keeps its peak
    memory until it exits. Idempotent. Returns whether it applied: True with glibc, False elsewhere
    (other C libraries, or an allocator preloaded in front of glibc, which already reuses memory).
    """
    global _kept
    if _kept:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or _preloaded():
        return False
    libc = ctypes.CDLL(None)
    # Trimming first: with mmap off, every large tensor lands on the heap's top, which trimming would
    # hand back to the kernel on free.
    _kept = bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)) and bool(libc.mallopt(_M_MMAP_MAX, 0))
    return _kept


def allocator() -> str:
    """The host allocator of this process, for a results file: ``glibc (freed memory kept)``, ``glibc``, …"""
    preloaded = _preloaded()
    if preloaded:
        return preloaded
    libc = platform.libc_ver()[0] or platform.system().lower()
    return f"{libc} (freed memory kept)" if _kept else libc
