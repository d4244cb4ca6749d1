"""Speed of a teacher and its DynamicViT students (ViTs, DynamicCNN, DynamicSwin), in every precision and backend, in one run.

Every row is timed in pairs with the float32 teacher (``dynvit.measure.throughput``): the speedup is
the median of per-pair time ratios with a 95 % interval, so a slow spell of a shared machine moves
the images/s but hardly the speedups. Weights are random (timm init): speed does not depend on their
values. The keep predictors' last layer gets a wide init so that their scores are spread as a trained
predictor's are: with the default init every token scores within ~1e-6 of the others, and the
onnxruntime check would compare two different (near-tied) token selections.

    python benchmarks/throughput.py                                  # DeiT-S, batch 32, fp32, CPU
    python benchmarks/throughput.py --precision fp32,bf16,int8 --backend onnxruntime --latency --json deit_s.json
    python benchmarks/repeat.py --calls 3 -- --ratios 0.7         # does it repeat? three fresh processes
    python benchmarks/throughput.py --model swin_tiny_patch4_window7_224 --ratios 0.9 0.7   # DynamicSwin-T
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from options import check_options

from dynvit import create_student, create_teacher
from dynvit.measure.environment import describe
from dynvit.measure.throughput import SpeedSettings
from dynvit.models import data_config
from dynvit.run.benchmark import benchmark, check_precisions
from dynvit.run.report import format_table, records


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="deit_small_patch16_224",
        help="timm model name (teacher and backbone): a ViT, ConvNeXt or Swin",
    )
    p.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.7, 0.5], help="student keep ratios ρ")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's own)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32,bf16,int8")
    p.add_argument("--backend", choices=["eager", "onnxruntime"], default="eager")
    p.add_argument("--latency", action="store_true", help="also time every row at batch 1")
    p.add_argument("--pairs", type=positive_int, default=30, help="timing rounds (one ratio per row each)")
    p.add_argument("--block-time", type=float, default=0.1, help="seconds each timed block lasts at least")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="make glibc keep freed memory before timing (dynvit.measure.allocator); --no-… times with its default",
    )
    p.add_argument("--json", metavar="PATH", help="also write the environment and rows as JSON")
    args = p.parse_args(argv)
    check_precisions(args.precision)
    return check_options(p, args)


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    kwargs = dict(img_size=args.img_size)
    teacher = create_teacher(args.model, **kwargs)
    student = create_student(args.model, keep_ratio=max(args.ratios), **kwargs)
    student.load_state_dict(teacher.state_dict(), strict=False)
    with torch.no_grad():
        # A hierarchical student keeps its predictors in the pruned stage.
        for predictor in getattr(student, "pruned_stage", student).score_predictor:
            torch.nn.init.normal_(predictor.out_conv[-2].weight, std=1.0)  # spread-out keep scores
    return student.eval(), teacher.eval()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    student, teacher = build(args)
    settings = SpeedSettings(
        batch_size=args.batch_size,
        device=args.device,
        pairs=args.pairs,
        block_time=args.block_time,
        threads=args.threads,
        keep_freed_memory=args.keep_freed_memory,
    )
    with tempfile.TemporaryDirectory() as onnx_dir:
        result = benchmark(
            student,
            teacher,
            args.ratios,
            settings=settings,
            precisions=check_precisions(args.precision),
            backend=args.backend,
            latency=args.latency,
            onnx_dir=onnx_dir,
        )
    size = data_config(student).img_size[0]
    print(f"{args.model}, {size}², {describe(result.environment)}; {args.pairs} pairs per speedup\n")
    print(format_table(result.rows))
    for reason in result.skipped:
        print(f"skipped: {reason}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"environment": result.environment, "args": vars(args), "rows": records(result.rows)}, f, indent=2
            )


if __name__ == "__main__":
    main()
