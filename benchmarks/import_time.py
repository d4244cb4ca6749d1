"""How much longer ``import dynvit`` takes than ``import timm``, in fresh interpreters.

Issue 23's target: at most 2 s more. dynvit needs torch and timm; Lightning, wandb's service,
matplotlib, torchao, ONNX and fvcore load where they are used (``tests/test_imports.py`` pins which
modules ``import dynvit`` loads). Each round starts one interpreter per command, in an order that
reverses every other round, so a slow spell of a shared machine hits every command alike; the
difference is taken round by round. One unmeasured round first fills the file cache.

    python benchmarks/import_time.py --runs 9
    python benchmarks/import_time.py --runs 5 --cli                   # also `python cli.py --help`
    python benchmarks/import_time.py --pycache-prefix /tmp/pycache    # with bytecode caches

Where ``PYTHONDONTWRITEBYTECODE`` is set and the installed packages carry no ``.pyc`` files (uv does
not compile them unless asked), every import compiles its sources again; ``--pycache-prefix`` lets the
interpreters cache bytecode in a folder of their own (the first, unmeasured round fills it), as an
ordinary ``pip install`` would have. The printout says which case was measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7, help="timed rounds (each starts every command once)")
    p.add_argument("--cli", action="store_true", help="also time `python cli.py --help`")
    p.add_argument("--pycache-prefix", type=Path, help="let the interpreters cache bytecode in this folder")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs must be at least 1, got {args.runs}")
    return args


def commands(cli: bool) -> dict[str, list[str]]:
    found = {
        "import timm": [sys.executable, "-c", "import timm"],
        "import dynvit": [sys.executable, "-c", "import dynvit"],
    }
    if cli:
        found["cli.py --help"] = [sys.executable, str(ROOT / "cli.py"), "--help"]
    return found


def child_env(pycache_prefix: Path | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if pycache_prefix is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache_prefix.resolve())
    return env


def seconds(command: list[str], env: dict[str, str]) -> float:
    """Wall-clock seconds of one fresh interpreter running ``command``."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[1:])} failed:\n{done.stderr[-2000:]}")
    return elapsed


def bytecode_case(env: dict[str, str]) -> str:
    if "PYTHONPYCACHEPREFIX" in env:
        return f"cached in {env['PYTHONPYCACHEPREFIX']}"
    if env.get("PYTHONDONTWRITEBYTECODE"):
        return "PYTHONDONTWRITEBYTECODE set: sources without a .pyc are compiled on every import"
    return "written beside the sources (Python's default)"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    import torch

    return f"{model}, {os.cpu_count()} CPUs, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = child_env(args.pycache_prefix)
    named = commands(args.cli)
    load_before = os.getloadavg()[0]
    for command in named.values():  # unmeasured: file cache (and bytecode cache, if asked)
        seconds(command, env)
    times: dict[str, list[float]] = {name: [] for name in named}
    for round_ in range(args.runs):
        order = list(named) if round_ % 2 == 0 else list(reversed(named))
        for name in order:
            times[name].append(seconds(named[name], env))
    load_after = os.getloadavg()[0]

    print(f"{'command':<16} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, values in times.items():
        print(f"{name:<16} {statistics.median(values):>9.2f} {min(values):>7.2f} {max(values):>7.2f}")
    extra = [d - t for d, t in zip(times["import dynvit"], times["import timm"], strict=True)]
    print(
        f"import dynvit − import timm, round by round: median {statistics.median(extra):+.2f} s "
        f"(from {min(extra):+.2f} to {max(extra):+.2f}; target: at most +2 s)"
    )
    print(f"{args.runs} rounds; {machine()}; Python {platform.python_version()}")
    print(f"bytecode: {bytecode_case(env)}")
    print(f"1-minute load average: {load_before:.1f} before, {load_after:.1f} after")


if __name__ == "__main__":
    main()
