"""Small models at their FLOP limit: how much of its FLOP ratio each reduced model turns into speed.

A DynamicViT student (random weights, spread-out keep scores: speed does not depend on the weights'
values) and training-free reducers set to the student's GFLOPs, each timed in pairs with the float32
teacher (``dynvit.measure.throughput``) at every batch size. A row's *share* is its speedup divided
by its FLOP ratio (teacher GFLOPs ÷ its GFLOPs): 1.0 means no time lost to overhead. By default the
digits student (``vit_digits``, 64 px, ρ 0.7, stages 1, 3, 5) and ToMe at batch 1 and 64.

    python benchmarks/small_models.py                                   # digits: student and ToMe, batch 1 and 64
    python benchmarks/small_models.py --model deit_small_patch16_224 --batch-sizes 32 --methods merging
    python benchmarks/small_models.py --attention-kernel sdpa          # timm's fused attention everywhere
    python benchmarks/small_models.py --compile                        # every model, teacher too, torch.compiled
    python benchmarks/small_models.py --quick                          # seconds: one pair per row (tests)
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from options import check_options, usage_errors

from dynvit import count_flops, create_student, create_teacher, methods
from dynvit.measure.environment import describe, environment
from dynvit.measure.throughput import SpeedSettings, measure_speedup
from dynvit.models.attention_kernel import KERNELS, chosen_kernels, set_attention_kernel
from dynvit.models.factory import default_stage_blocks
from dynvit.reducers.matching import match_gflops

# The digits student's stages (experiments/digits_prune.yaml); other models take DynamicViT's defaults.
DIGITS_STAGES = (1, 3, 5)


def merging_methods() -> list[str]:
    """Every registered method that merges tokens (reports merge sources)."""
    return [m.name for m in methods.registered().values() if "sources" in m.reports]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_digits", help="timm model name of the teacher (a ViT)")
    p.add_argument("--keep-ratio", type=float, default=0.7, help="the student's keep ratio ρ")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument(
        "--methods",
        default="dynamicvit,tome",
        help="comma-separated registered methods, matched to the student's GFLOPs; 'merging' adds every merging one",
    )
    p.add_argument("--attention-kernel", choices=KERNELS, default="auto", help="dynvit.models.attention_kernel")
    p.add_argument("--pairs", type=int, default=30, help="timing rounds (one ratio per row each)")
    p.add_argument("--block-time", type=float, default=0.1, help="seconds each timed block lasts at least")
    p.add_argument("--warmup-time", type=float, default=0.3, help="seconds of untimed calls per model first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="time every model, teacher included, through torch.compile (compiled in the warm-up, untimed: a "
        "minute or more per model)",
    )
    p.add_argument("--quick", action="store_true", help="one pair, no warm-up, batch 1 and 2: a check that it runs")
    p.add_argument("--json", metavar="PATH", help="also write the environment and rows as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.block_time, args.warmup_time, args.batch_sizes = 1, 0.0, 0.0, [1, 2]
    names = [n for part in args.methods.split(",") for n in (merging_methods() if part == "merging" else [part])]
    args.methods = list(dict.fromkeys(names))
    with usage_errors(p):
        for name in args.methods:
            methods.get(name)  # an unknown name exits with the registered ones listed
    if any(b < 1 for b in args.batch_sizes) or args.pairs < 1:
        p.error("batch sizes and --pairs must be positive")
    return check_options(p, args)


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """The teacher and, by method name, the models compared with it (the student at ρ, the rest at its GFLOPs)."""
    torch.manual_seed(0)
    teacher = create_teacher(args.model).eval()
    stages = DIGITS_STAGES if args.model == "vit_digits" else default_stage_blocks(teacher)
    student = create_student(args.model, keep_ratio=args.keep_ratio, pruning_loc=stages)
    student.load_state_dict(teacher.state_dict(), strict=False)
    with torch.no_grad():
        for predictor in student.score_predictor:
            torch.nn.init.normal_(predictor.out_conv[-2].weight, std=1.0)  # spread-out keep scores
    target = count_flops(student.eval())
    models = {}
    for name in args.methods:
        method = methods.get(name)
        if name == "dynamicvit":
            models[name] = student
            continue
        params = method.stage_params(stages, len(teacher.blocks))
        model = copy.deepcopy(teacher)
        match_gflops(method, model, target, images=[torch.randn(8, *student.pretrained_cfg["input_size"])], **params)
        models[name] = model.eval()
    return teacher, models


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    set_attention_kernel(args.attention_kernel)
    teacher, models = build(args)
    teacher_gflops = count_flops(teacher)
    gflops = {name: count_flops(model) for name, model in models.items()}
    rows = []
    for batch in args.batch_sizes:
        settings = SpeedSettings(
            batch_size=batch,
            pairs=args.pairs,
            block_time=args.block_time,
            warmup_time=args.warmup_time,
            threads=args.threads,
        )
        for name, model in models.items():
            # Compiled, a forward makes far fewer dispatches: what a small model at batch 1 loses its FLOP
            # savings to in eager mode.
            timing, reference = measure_speedup(model, teacher, settings, compile=args.compile)
            speedup = timing.speedup
            flop_ratio = teacher_gflops / gflops[name]
            rows.append(
                {
                    "method": name,
                    "batch_size": batch,
                    "gflops": gflops[name],
                    "flop_ratio": flop_ratio,
                    "speedup": speedup.value,
                    "low": speedup.low,
                    "high": speedup.high,
                    "share": speedup.value / flop_ratio,
                    "teacher_ms": 1e3 * reference.seconds_per_call,
                }
            )
    env = environment("cpu", threads=args.threads)
    env["batch_size"] = ", ".join(map(str, args.batch_sizes))  # several; each row names its own
    print(f"{args.model}, teacher {teacher_gflops:.4f} GFLOPs, {describe(env)}; {args.pairs} pairs per speedup")
    print(f"attention kernel {args.attention_kernel}: {sorted(chosen_kernels().values())}")
    print(f"runtime: {'torch.compile' if args.compile else 'eager'}\n")
    print("| method | batch | GFLOPs | FLOP ratio | speedup (95 % CI) | share of FLOP ratio | teacher ms/batch |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for r in rows:
        interval = f" ({r['low']:.2f}–{r['high']:.2f})" if r["low"] is not None else ""
        print(
            f"| {r['method']} | {r['batch_size']} | {r['gflops']:.4f} | {r['flop_ratio']:.2f} | "
            f"{r['speedup']:.2f}×{interval} | {r['share']:.2f} | {r['teacher_ms']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
