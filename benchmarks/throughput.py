"""Throughput of a ViT teacher and its DynamicViT students, side by side in one run.

Models are measured in turns over several rounds (teacher, ρ=0.9, ρ=0.7, …, teacher, …) so slow drift
of a shared machine (other jobs, clocks, heat) hits every model alike; each model's figure is the
median over rounds. Weights are random (timm init): speed does not depend on their values.

    python benchmarks/throughput.py                        # DeiT-S, batch 32, 224, fp32, CPU
    python benchmarks/throughput.py --device cuda --dtype bf16 --batch-size 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys

import torch

from dynvit import count_flops, create_student, create_teacher, measure_throughput

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224", help="timm ViT name (teacher and backbone)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.7, 0.5], help="student keep ratios ρ")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's own)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="bf16/fp16 run under autocast")
    p.add_argument("--rounds", type=positive_int, default=5, help="turns over all models; the figure is their median")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed forward passes per model per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes before each model's turn")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    common = dict(img_size=args.img_size)
    models = {"teacher": create_teacher(args.model, **common)}
    for ratio in args.ratios:
        models[f"ρ={ratio:g}"] = create_student(args.model, keep_ratio=ratio, **common)
    return models


def run(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    models = build_models(args)
    args.img_size = args.img_size or models["teacher"].patch_embed.img_size[0]  # the model's own, for the table
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds):
        # Alternate the order every round so no model always follows the same one.
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            speeds[name].append(
                measure_throughput(
                    models[name],
                    batch_size=args.batch_size,
                    img_size=args.img_size,
                    device=args.device,
                    dtype=DTYPES[args.dtype],
                    warmup=args.warmup,
                    repeats=args.repeats,
                )
            )
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {speeds[n][-1]:.1f}" for n in models), file=sys.stderr)
    teacher = statistics.median(speeds["teacher"])
    rows = []
    for name, model in models.items():
        median = statistics.median(speeds[name])
        rows.append(
            dict(
                model=name,
                keep_ratio=getattr(model, "keep_ratio", 1.0),
                gflops=count_flops(model, img_size=args.img_size),
                img_per_s=median,
                img_per_s_min=min(speeds[name]),
                img_per_s_max=max(speeds[name]),
                speedup=median / teacher,
                rounds=speeds[name],
            )
        )
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"{args.model}, batch {args.batch_size}, {args.img_size}×{args.img_size}, {args.dtype}, {args.device} "
        f"({torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}); "
        f"median of {args.rounds} rounds × {args.repeats} passes",
        "",
        "| model | GFLOPs | img/s (median) | min–max over rounds | speedup vs teacher |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['gflops']:.2f} | {row['img_per_s']:.1f} | "
            f"{row['img_per_s_min']:.1f}–{row['img_per_s_max']:.1f} | {row['speedup']:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args)
    print(markdown(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "threads": torch.get_num_threads(), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
