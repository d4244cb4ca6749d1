"""Does a speedup repeat? The same ``benchmarks/throughput.py`` command in several fresh processes.

Issue 14's target: three back-to-back calls on the same weights give speedups within ±7 % of their
mean. Each call here is a new process, because what a process did before (its allocator's state
above all, see ``dynvit.measure.allocator``) is what pairing inside one call cannot cancel. With
``--allocator both`` the calls alternate between freed memory kept (dynvit's default) and glibc's
default, so the two spreads come from the same minutes of the machine.

    python benchmarks/repeat.py --calls 3 -- --ratios 0.9 0.7 0.5 --pairs 15           # DeiT-S
    python benchmarks/repeat.py --calls 6 --allocator both -- --model vit_digits --ratios 0.7 \\
        --batch-size 64 --pairs 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from options import check_options

THROUGHPUT = Path(__file__).with_name("throughput.py")
ALLOCATORS = {"kept": [], "default": ["--no-keep-freed-memory"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], usage="%(prog)s [--calls N] [--allocator …] -- THROUGHPUT_ARGS"
    )
    p.add_argument("--calls", type=int, default=3, help="fresh processes per allocator setting")
    p.add_argument("--allocator", choices=["kept", "default", "both"], default="kept")
    p.add_argument("--json", metavar="PATH", help="also write every call's results as JSON")
    p.add_argument("throughput_args", nargs=argparse.REMAINDER, help="after --: arguments of throughput.py")
    args = p.parse_args(argv)
    args.throughput_args = [a for a in args.throughput_args if a != "--"]
    if args.calls < 1:
        p.error(f"--calls must be at least 1, got {args.calls}")
    if any(a == "--json" or a.startswith("--json=") for a in args.throughput_args):
        p.error("--json belongs before --: each call's JSON is written by this script")
    return check_options(p, args)


def run_call(throughput_args: Sequence[str], allocator: str) -> dict:
    """One ``throughput.py`` call in a fresh interpreter: its environment and rows."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "call.json"
        command = [sys.executable, str(THROUGHPUT), *throughput_args, *ALLOCATORS[allocator], "--json", str(out)]
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no message"]
            raise SystemExit(f"throughput.py {' '.join(throughput_args)} failed: {last[0]}")
        return json.loads(out.read_text())


def row_key(row: dict) -> str:
    return f"{row['method']} ρ {row['keep_ratio']:g} {row['precision']} {row['backend']}"


def spread(values: Sequence[float]) -> tuple[float, float]:
    """The mean of ``values`` and their largest deviation from it, as a fraction of the mean."""
    mean = statistics.fmean(values)
    return mean, max(abs(v - mean) for v in values) / mean


def summarise(calls: Sequence[dict]) -> list[dict]:
    """Per allocator and row: the speedups of the calls, their mean and largest deviation from it.

    ``rows[0]`` of every call is the float32 teacher, the reference of every speedup.
    """
    summary = []
    for allocator in dict.fromkeys(call["allocator"] for call in calls):
        mine = [call for call in calls if call["allocator"] == allocator]
        teacher = [call["rows"][0]["images_per_s"] for call in mine]
        for key in [row_key(row) for row in mine[0]["rows"][1:]]:
            speedups = [row["speedup"] for call in mine for row in call["rows"] if row_key(row) == key]
            mean, deviation = spread(speedups)
            summary.append(
                dict(
                    allocator=allocator,
                    row=key,
                    speedups=speedups,
                    mean=mean,
                    deviation=deviation,
                    teacher_images_per_s=teacher,
                )
            )
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    allocators = ["kept", "default"] if args.allocator == "both" else [args.allocator]
    calls = []
    for i in range(args.calls):
        for allocator in allocators:
            result = run_call(args.throughput_args, allocator)
            result["allocator"] = allocator
            calls.append(result)
            rates = ", ".join(f"{row_key(r)} {r['speedup']:.2f}×" for r in result["rows"][1:])
            print(
                f"call {i + 1}, freed memory {allocator}: teacher {result['rows'][0]['images_per_s']:.1f} img/s; {rates}"
            )
    print()
    summary = summarise(calls)
    for s in summary:
        values = ", ".join(f"{v:.2f}×" for v in s["speedups"])
        teacher = f"{min(s['teacher_images_per_s']):.0f}–{max(s['teacher_images_per_s']):.0f}"
        print(
            f"freed memory {s['allocator']}, {s['row']}: {values}; mean {s['mean']:.2f}×, largest deviation "
            f"{100 * s['deviation']:.1f} % (teacher {teacher} img/s)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"calls": calls, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
