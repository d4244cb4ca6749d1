"""What a speed figure was measured on: processor, threads, library versions, precision, batch, device.

A speed figure means nothing without the machine and settings behind it, so every results file and
report header carries :func:`environment`.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from dynvit.measure.allocator import allocator

# CPU features that decide which reduced-precision kernels a CPU can run fast.
_CPU_FEATURES = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def read_cpuinfo() -> tuple[str | None, list[str]]:
    """The CPU model name and its reduced-precision features, from ``/proc/cpuinfo`` (Linux)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return None, []
    name, flags = None, set()
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name is None:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return name, [f for f in _CPU_FEATURES if f in flags]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    precisions: Sequence[str] = ("fp32",),
    threads: int | None = None,
) -> dict[str, Any]:
    """The machine and settings of a measurement, as a flat record of strings and numbers.

    Args:
        device: Where the models ran.
        batch_size: Images per timed call.
        precisions: The precisions measured (``fp32``, ``bf16``, ``int8``, …).
        threads: CPU threads the timing used; by default torch's current setting.
    """
    device = torch.device(device)
    cpu, features = read_cpuinfo()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "device": str(device),
        "cpu": cpu or platform.processor() or platform.machine(),
        "cpu_features": " ".join(features),
        # The instruction level ATen's kernels run at (ATEN_CPU_CAPABILITY can lower it), and oneDNN's
        # cap where one is set: both decide which reduced-precision kernels run, beside what the CPU has.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "batch_size": batch_size,
        "precision": ",".join(precisions),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "torchao": _version("torchao"),
        "onnxruntime": _version("onnxruntime"),
        "python": platform.python_version(),
        "allocator": allocator(),
        # The machine's load when measuring began: on a shared machine, the first thing to check.
        "load_average_1min": round(load, 2) if load is not None else None,
    }


def describe(env: dict[str, Any]) -> str:
    """One line for a report header: ``cpu (features; capability …) · N threads · batch B · fp32 · torch … · timm …``.

    On a CPU the header names ATen's capability (and oneDNN's cap where one is set) beside the CPU's
    features: which kernels ran, and so which table a figure belongs to, depends on them.
    """
    where = env.get("gpu") or env.get("cpu")
    features = ""
    if not env.get("gpu"):
        notes = [env["cpu_features"]] if env.get("cpu_features") else []
        if env.get("cpu_capability"):
            notes.append(f"capability {env['cpu_capability']}")
        if env.get("onednn_max_cpu_isa"):
            notes.append(f"oneDNN capped at {env['onednn_max_cpu_isa']}")
        features = f" ({'; '.join(notes)})" if notes else ""
    parts = [
        f"{where}{features} on {env.get('device')}",
        f"{env.get('threads')} threads",
        f"batch {env.get('batch_size')}",
        str(env.get("precision")),
        f"torch {env.get('torch')}",
        f"timm {env.get('timm')}",
    ]
    if env.get("allocator"):
        parts.append(f"malloc {env['allocator']}")
    if env.get("load_average_1min") is not None:
        parts.append(f"load {env['load_average_1min']}")
    return " · ".join(parts)
