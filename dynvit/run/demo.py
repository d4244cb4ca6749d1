"""``make demo``: the whole idea on the embedded data, in minutes on a laptop CPU.

1. train the cluttered-digits ViT teacher (``experiments/digits_teacher.yaml``);
2. prune it with DynamicViT through the sweep machinery users use (``experiments/sweep_demo.yaml``);
3. evaluate the pruned weights across keep ratios 0.5–0.9 against the teacher (``cli.py benchmark``):
   top-1, GFLOPs, images/s, speedup with its 95 % interval, batch-1 latency and kept-token recall
   on the digit.

Each step is the CLI command a user would type; a finished step is not redone when the demo is
run again. Everything lands in one folder, named on the last line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

from dynvit.run.cli import DynViTCLI
from dynvit.run.errors import run_reporting_errors

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
KEEP_RATIO = 0.7
# A budget small enough for a test: the same pipeline, a few batches per step.
QUICK_TRAINING = [
    "--trainer.max_epochs=1",
    "--data.init_args.train_samples_per_epoch=128",
    "--data.init_args.num_val=64",
    "--data.init_args.batch_size=32",
    "--wandb.enabled=false",
    "--trainer.enable_progress_bar=false",
]
QUICK_BENCHMARK = ["--batch_size=8", "--pairs=2", "--block_time=0", "--warmup_time=0", "--latency=false"]
# The benchmark's defaults: 30 timing pairs with the teacher per row, at batch 64 and at batch 1.
FULL_BENCHMARK: list[str] = []


def run(args: list[str]) -> DynViTCLI:
    print("\n$ python cli.py " + " ".join(args), flush=True)
    # LightningCLI warns when sys.argv also holds arguments; these are the demo's own, not the CLI's.
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        return DynViTCLI(args=args)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for every result")
    parser.add_argument("--sweep", type=Path, default=EXPERIMENTS / "sweep_demo.yaml", help="keep ratios to prune at")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one small epoch per step (minutes)")
    opts = parser.parse_args(argv)
    training = QUICK_TRAINING if opts.quick else []
    out: Path = opts.out
    start = time.perf_counter()

    teacher_dir = out / "teacher"
    teacher_ckpt = teacher_dir / "checkpoints" / "last.ckpt"
    # An interrupted teacher continues; a finished one is not trained again (the CLI says so).
    resume = ["--ckpt_path=last"] if teacher_ckpt.is_file() else []
    run(
        ["fit", "--config", str(EXPERIMENTS / "digits_teacher.yaml"), f"--trainer.default_root_dir={teacher_dir}"]
        + training
        + resume
    )
    prune = [f"--model.init_args.teacher_checkpoint={teacher_ckpt}", *training]
    config = ["--config", str(EXPERIMENTS / "digits_prune.yaml")]
    run(["sweep", *config, f"--sweep={opts.sweep}", f"--out={out / 'prune'}", *prune])
    student_ckpt = out / "prune" / f"keep_ratio_{KEEP_RATIO}" / "checkpoints" / "last.ckpt"
    run(
        [
            "benchmark",
            *config,
            *prune,
            f"--ckpt_path={student_ckpt}",
            f"--out={out / 'benchmark'}",
            *(QUICK_BENCHMARK if opts.quick else FULL_BENCHMARK),
        ]
    )

    minutes = (time.perf_counter() - start) / 60
    pictures = sorted((out / "prune" / f"keep_ratio_{KEEP_RATIO}" / "kept_tokens").glob("*.png"))
    print(f"\nDemo finished in {minutes:.1f} min.")
    print(f"  trade-off table: {out / 'benchmark' / 'results.csv'} (and results.json)")
    print(f"  trade-off figure: {out / 'benchmark' / 'tradeoff.png'}")
    print(f"  sweep summary: {out / 'prune'}")
    if pictures:
        print(f"  kept-token pictures: {pictures[-1]}")
    print(f"Results are in {out.resolve()}")
    return out


if __name__ == "__main__":
    run_reporting_errors(main)
