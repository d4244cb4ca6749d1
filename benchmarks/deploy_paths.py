"""Every deployment path of one model on this machine, timed and checked (dynvit.deploy.fastest), as a table.

Which path is fastest depends on the CPU (and the GPU): run this on each machine a model will serve
on. Every speedup in the table is over the same model in float32 eager PyTorch, the median of per-pair
time ratios with its 95 % interval (6 pairs or more); a student's chosen path is then also timed in
pairs against the float32 eager teacher (the figure issue 25's targets are set in). Predictions are
checked on the example batch (logits within 0.2 of float32's, relative). Weights are random (timm
init): speed does not depend on them; the keep predictors' last layer gets a wide init, as in
benchmarks/throughput.py, so that token selection does not hinge on rounding.

    python benchmarks/deploy_paths.py                                   # DeiT-S ρ 0.7, batch 8, CPU
    python benchmarks/deploy_paths.py --batch-size 32 --pairs 10 --json deit_s_paths.json
    python benchmarks/deploy_paths.py --teacher                         # the unpruned DeiT-S
    python benchmarks/deploy_paths.py --compile                         # also torch.compile (minutes)
    # An AVX2-only CPU, emulated on a newer one (ATen and oneDNN, MKL and fbgemm capped; not onnxruntime):
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/deploy_paths.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch
from options import check_options
from throughput import build, positive_int

from dynvit.deploy import Tolerance, detect_cpu, fastest, speedup_over
from dynvit.measure.environment import describe
from dynvit.measure.throughput import SpeedSettings, random_images

# The variables that cap which instructions the kernel libraries use (an older CPU, emulated).
CAPS = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "FBGEMM_ENABLE_INSTRUCTIONS",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224", help="timm model name: a ViT, ConvNeXt or Swin")
    p.add_argument("--keep-ratio", type=float, default=0.7, help="the student's keep ratio ρ")
    p.add_argument("--teacher", action="store_true", help="measure the unpruned model instead of the student")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's own)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--pairs", type=positive_int, default=6, help="timing rounds (one ratio per path each)")
    p.add_argument("--block-time", type=float, default=0.0, help="seconds each timed block lasts at least")
    p.add_argument("--warmup-time", type=float, default=1.0, help="seconds of untimed calls per path")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="also the torch.compile paths")
    p.add_argument("--paths", nargs="+", default=None, help="only these paths, e.g. 'bf16 eager' 'int8 onnxruntime'")
    # Random weights leave the logits close together, so int8's rounding is a larger share of them than
    # in a trained model: a wider tolerance than the library's 0.1 keeps this a table of speeds.
    p.add_argument("--logits-tolerance", type=float, default=0.2, help="largest relative logits error accepted")
    p.add_argument("--json", metavar="PATH", help="also write the choice, every path and the environment as JSON")
    return check_options(p, p.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)  # the same random weights in every run, on every machine
    student, teacher = build(argparse.Namespace(model=args.model, img_size=args.img_size, ratios=[args.keep_ratio]))
    model = teacher if args.teacher else student
    settings = SpeedSettings(
        device=args.device,
        pairs=args.pairs,
        block_time=args.block_time,
        warmup_time=args.warmup_time,
        threads=args.threads,
    )
    images = random_images(model, args.batch_size, args.img_size)
    caps = {k: os.environ[k] for k in CAPS if os.environ.get(k)}
    print(f"CPU: {detect_cpu().describe()}" + (f"; caps set: {caps} (an emulated older CPU)" if caps else ""))
    start = time.perf_counter()
    choice = fastest(
        model,
        images,
        tolerance=Tolerance(logits=args.logits_tolerance),
        settings=settings,
        compile=args.compile,
        paths=args.paths,
    )
    what = args.model if args.teacher else f"{args.model} ρ {args.keep_ratio:g}"
    print(f"{what}, {describe(choice.environment)}; {args.pairs} pairs; {time.perf_counter() - start:.0f} s\n")
    print(choice.table())
    print(f"\nchosen: {choice.chosen.path.name}")
    record = {"args": vars(args), "caps": caps, **choice.record()}
    if not args.teacher:
        # The targets are set against the unpruned model in float32 eager: time the choice against it too.
        over = speedup_over(teacher.eval(), choice, images, settings)
        print(f"{choice.chosen.path.name} over the float32 eager teacher: {over}")
        record["over_teacher"] = dataclasses.asdict(over)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2, default=str)


if __name__ == "__main__":
    main()
