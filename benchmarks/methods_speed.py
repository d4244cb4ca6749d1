"""Speed of every registered method at its released DeiT-S settings, against the plain DeiT-S, on the CPU.

For every ``released`` setting of every registered method (``dynvit.methods``: ToMe r = 13 and 16,
DiffRate's 2.9 and 2.3 schedules, MCTF r = 16 and MCTF-Fast, PiToMe 0.9, ToFu and DTEM r = 13, ATC's DeiT
set-up, TokenReduction's five, EViT, top-k, random keep and DynamicViT at keep 0.7, ATS), one row: fvcore
GFLOPs at batch 1 (a method whose tokens depend on the image: the mean over the timed images), the FLOP
ratio (plain GFLOPs ÷ the method's), the speedup over the plain model with its 95 % interval
(``dynvit.measure.throughput``'s paired estimator: every model timed in pairs with the plain one, the
median of per-pair ratios), and speedup ÷ FLOP ratio, flagged when below 0.8: the method runs slower than
its FLOPs promise (many small ops, or work fvcore does not see, such as ATC's scikit-learn clustering per
image). Weights are random (timm init; learned modules at their init): speed does not depend on them.

    python benchmarks/methods_speed.py --json methods_speed.json   # DeiT-S, batch 32, fp32, 2 threads, 30 pairs
    python benchmarks/methods_speed.py --gflops-only              # the GFLOPs alone (deterministic, no timing)
    python benchmarks/methods_speed.py --quick                    # tiny width, 2 images, 2 pairs: does it run?
"""

from __future__ import annotations

import argparse
import copy
import json
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

import torch
from options import check_options, usage_errors
from torch import nn

from dynvit import count_flops, create_teacher, methods
from dynvit.measure.environment import describe, environment
from dynvit.measure.throughput import SpeedSettings, inference_call, keep_rng, random_images, time_calls
from dynvit.reducers.cost import TokenCost
from dynvit.reducers.matching import mean_cost

# Below this share of its FLOP ratio, a method's speedup is flagged.
FLAG_BELOW = 0.8
# --quick: DeiT-S's geometry (12 blocks, 196 patches, which the released settings are sized for) at a tiny width.
QUICK_MODEL = dict(embed_dim=24, num_heads=2)


@dataclass
class Row:
    """One method at one released setting.

    Attributes:
        method: Registry name.
        setting: The released setting's name (``r=13``).
        params: What the method was built with (its defaults and the setting).
        gflops: fvcore GFLOPs per image.
        flop_ratio: The plain model's GFLOPs ÷ ``gflops``.
        speedup, low, high: Median per-pair speedup over the plain model and its 95 % interval (None untimed,
            or below 6 pairs for the interval).
        images_per_s: Images per second at the timed batch.
        ratio: ``speedup / flop_ratio``.
        flagged: ``ratio`` below :data:`FLAG_BELOW`.
    """

    method: str
    setting: str
    params: dict[str, Any]
    gflops: float
    flop_ratio: float
    speedup: float | None = None
    low: float | None = None
    high: float | None = None
    images_per_s: float | None = None
    ratio: float | None = None
    flagged: bool | None = None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224", help="timm ViT the released settings are for")
    p.add_argument("--methods", nargs="+", default=None, help="registered methods (default: every one)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--pairs", type=positive_int, default=30, help="timing rounds (one ratio per row each)")
    p.add_argument("--block-time", type=float, default=0.1, help="seconds each timed block lasts at least")
    p.add_argument("--warmup-time", type=float, default=0.3, help="seconds of untimed calls per model first")
    p.add_argument("--gflops-only", action="store_true", help="count GFLOPs, time nothing")
    p.add_argument("--quick", action="store_true", help="tiny width, batch 2, 2 pairs, no warm-up: a smoke run")
    p.add_argument("--json", metavar="PATH", help="also write the environment and rows as JSON")
    args = p.parse_args(argv)
    with usage_errors(p):
        for name in args.methods or []:
            methods.get(name)  # an unknown name lists the registered ones
    if args.quick:
        args.batch_size, args.pairs, args.block_time, args.warmup_time = 2, 2, 0.0, 0.0
    return check_options(p, args)


def released_models(plain: nn.Module, names: list[str]) -> list[tuple[str, str, dict[str, Any], nn.Module]]:
    """(method, setting, params, model) for every released setting of ``names``, each on a copy of ``plain``;
    new modules at their init, drawn at a fixed seed so that reruns build the same models."""
    built = []
    for name in names:
        method = methods.get(name)
        for setting, released in method.released.items():
            params = {**method.default_params(plain), **released}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = method.build(copy.deepcopy(plain), **params).eval()
            built.append((name, setting, params, model))
    return built


def measure(args: argparse.Namespace) -> tuple[dict[str, Any], float, list[Row]]:
    """The environment, the plain model's GFLOPs and one :class:`Row` per released setting."""
    plain = create_teacher(args.model, **(QUICK_MODEL if args.quick else {})).eval()
    names = args.methods or list(methods.registered())
    built = released_models(plain, names)
    images = random_images(plain, args.batch_size)
    plain_gflops = count_flops(plain)
    cost = None
    rows = []
    for name, setting, params, model in built:
        if methods.get(name).cost == "images":
            cost = cost or TokenCost.from_model(plain)
            gflops = mean_cost(model, [images], cost)[0]
        else:
            gflops = count_flops(model)
        rows.append(Row(name, setting, params, gflops, plain_gflops / gflops))
    settings = SpeedSettings(
        batch_size=args.batch_size,
        pairs=args.pairs,
        block_time=args.block_time,
        warmup_time=args.warmup_time,
        threads=args.threads,
    )
    env = environment("cpu", args.batch_size, ("fp32",), args.threads)
    env.update(model=args.model, pairs=args.pairs, quick=args.quick)
    if args.gflops_only:
        return env, plain_gflops, rows
    with keep_rng("cpu"), ExitStack() as stack:
        calls = [stack.enter_context(inference_call(m, images)) for m in (plain, *(b[3] for b in built))]
        timings = time_calls(calls, settings, reference=True)
    for row, timing in zip(rows, timings[1:], strict=True):
        speedup = timing.speedup
        row.speedup, row.low, row.high = speedup.value, speedup.low, speedup.high
        row.images_per_s = timing.images_per_s
        row.ratio = row.speedup / row.flop_ratio
        row.flagged = row.ratio < FLAG_BELOW
    env["plain_images_per_s"] = timings[0].images_per_s
    return env, plain_gflops, rows


def table(plain_gflops: float, rows: list[Row]) -> str:
    """The rows as a Markdown table, the plain model first."""
    lines = [
        "| method | setting | GFLOPs | FLOP ratio | speedup (95 % CI) | images/s | speedup ÷ FLOP ratio |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: |",
        f"| plain | – | {plain_gflops:.3f} | 1.00 | 1.00× | – | – |",
    ]
    for r in rows:
        if r.speedup is None:
            timed = "– | – | –"
        else:
            interval = f" ({r.low:.2f}–{r.high:.2f})" if r.low is not None else ""
            flag = f" **< {FLAG_BELOW}**" if r.flagged else ""
            timed = f"{r.speedup:.2f}×{interval} | {r.images_per_s:.1f} | {r.ratio:.2f}{flag}"
        lines.append(f"| {r.method} | {r.setting} | {r.gflops:.3f} | {r.flop_ratio:.2f} | {timed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    env, plain_gflops, rows = measure(args)
    timed = "GFLOPs only, nothing timed" if args.gflops_only else f"{args.pairs} pairs per speedup"
    print(f"{args.model}{' (quick: tiny width)' if args.quick else ''}, {describe(env)}; {timed}\n")
    print(table(plain_gflops, rows))
    flagged = [f"{r.method} {r.setting}" for r in rows if r.flagged]
    if flagged:
        print(f"\nbelow {FLAG_BELOW} of their FLOP ratio: {', '.join(flagged)}")
    if args.json:
        with open(args.json, "w") as f:
            record = {"environment": env, "args": vars(args), "plain_gflops": plain_gflops}
            json.dump({**record, "rows": [asdict(r) for r in rows]}, f, indent=2, default=str)
    return rows


if __name__ == "__main__":
    main()
