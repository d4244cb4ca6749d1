"""DVT against DynamicViT on the embedded digits, at equal GFLOPs: top-1, measured speed, where each wins.

For each keep ratio ρ, DynamicViT's student runs at ρ (same weights) and DVT's cascade gets thresholds
chosen on the validation images (the official rule, :meth:`~dynvit.models.dvt.DVT.choose_thresholds`) for
the student's GFLOPs at that ρ. Both are scored on the test images, and timed in pairs with the float32
teacher on one batch of real test images (early exit depends on the images: random ones would all run to
the last exit). DVT's *share* is its speedup divided by the FLOP ratio its mean GFLOPs on that batch
predict (issue 28's target: at least 0.8 at batch 64).

A picture groups test images by the exit they left at (``exits.png``). Then, at each budget, which is
faster at equal top-1: DVT's speed against the fastest at which DynamicViT's curve over ρ reaches DVT's
top-1 (interpolated between its points); and the trade-off figure with DVT's curve over budgets beside
DynamicViT's over ρ.

    python cli.py fit --config experiments/digits_dvt.yaml          # after `make demo`
    python benchmarks/dvt_digits.py --dvt runs/digits_dvt/checkpoints/last.ckpt \\
        --student runs/demo/prune/keep_ratio_0.7/checkpoints/last.ckpt --out runs/dvt_digits
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dynvit import count_flops, count_params
from dynvit.data import ClutteredDigitsDataModule
from dynvit.lightning import DVTModule, DynamicViTModule
from dynvit.measure.environment import describe, environment
from dynvit.measure.evaluate import evaluate
from dynvit.measure.throughput import SpeedSettings, inference_call, time_calls
from dynvit.models.dvt import save_exit_gallery
from dynvit.run.report import ResultRow, format_table, write_report

RATIOS = (0.5, 0.6, 0.7, 0.8, 0.9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dvt", required=True, help="a DVTModule checkpoint (experiments/digits_dvt.yaml)")
    p.add_argument("--student", required=True, help="a DynamicViTModule checkpoint with its teacher")
    p.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS), help="DynamicViT keep ratios")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pairs", type=int, default=20, help="timing rounds per model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="runs/dvt_digits", help="folder for the table, rows and figure")
    args = p.parse_args(argv)
    for path in (args.dvt, args.student):
        if not Path(path).is_file():
            p.error(f"no checkpoint at {path}: train it first (see this script's docstring)")
    if not all(0.0 < r <= 1.0 for r in args.ratios):
        p.error(f"keep ratios are in (0, 1], got {args.ratios}")
    return args


def fastest_reaching(top1: float, curve: list[ResultRow]) -> float | None:
    """The fastest speedup at which ``curve`` (one method's points) reaches at least ``top1``: walking its points
    from the fastest, the first that reaches it, interpolated linearly from the faster point before it that
    does not; None if no point reaches it."""
    points = sorted(curve, key=lambda r: r.speedup, reverse=True)
    for faster, point in zip([None, *points], points, strict=False):
        if point.top1 < top1:
            continue
        if faster is None or faster.top1 == point.top1:
            return point.speedup
        share = (top1 - faster.top1) / (point.top1 - faster.top1)
        return faster.speedup + share * (point.speedup - faster.speedup)
    return None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    pair = DynamicViTModule.load_from_checkpoint(args.student, map_location="cpu")
    student, teacher = pair.net.eval(), pair.teacher.eval()
    dvt = DVTModule.load_from_checkpoint(args.dvt, map_location="cpu").net.eval()
    data = ClutteredDigitsDataModule(batch_size=args.batch_size)
    data.setup("fit")
    data.setup("test")
    val, test = data.val_dataloader(), data.test_dataloader()
    images = next(iter(test))[0][: args.batch_size]

    teacher_gflops = count_flops(teacher)
    rows = [
        ResultRow("teacher", 1.0, teacher_gflops, count_params(teacher), speedup=1.0, top1=evaluate(teacher, test).top1)
    ]
    dynamicvit, cascade, batch_gflops = [], [], []
    for ratio in args.ratios:
        student.keep_ratio = ratio
        gflops = count_flops(student)
        top1 = evaluate(student, test).top1
        dynamicvit.append(ResultRow("dynamicvit", ratio, gflops, count_params(student), top1=top1))
        choice = dvt.choose_thresholds(val, gflops=gflops)
        mean_gflops, tokens = dvt.mean_exit_cost(batch[0] for batch in test)
        row = ResultRow("dvt", ratio, mean_gflops, count_params(dvt), top1=evaluate(dvt, test).top1, tokens=tokens)
        row.param = "T=" + "/".join(f"{t:.3f}" for t in choice.thresholds.tolist())
        row.exit_shares = dvt.leaving_shares(batch[0] for batch in test)
        cascade.append((row, choice.thresholds.clone()))
        batch_gflops.append(dvt.mean_exit_cost([images])[0])

    # One paired run: the teacher, DynamicViT at every ρ, DVT at every budget, each set up before its blocks.
    settings = SpeedSettings(batch_size=images.shape[0], pairs=args.pairs, threads=args.threads)
    calls, setups = [], []
    with inference_call(teacher, images) as call:
        calls.append(call)
        setups.append(None)
        with inference_call(student, images) as student_call, inference_call(dvt, images) as dvt_call:
            for ratio in args.ratios:
                calls.append(student_call)
                setups.append(lambda ratio=ratio: setattr(student, "keep_ratio", ratio))
            for _, thresholds in cascade:
                calls.append(dvt_call)
                setups.append(lambda t=thresholds: setattr(dvt, "thresholds", t))
            timings = time_calls(calls, settings, reference=True, setups=setups)
    rows[0].images_per_s = timings[0].images_per_s
    for row, timing in zip(dynamicvit + [r for r, _ in cascade], timings[1:], strict=True):
        speedup = timing.speedup
        row.images_per_s, row.speedup, row.speedup_low, row.speedup_high = (
            timing.images_per_s,
            speedup.value,
            speedup.low,
            speedup.high,
        )
    rows += dynamicvit + [r for r, _ in cascade]

    env = environment("cpu", settings.batch_size, ["fp32"], threads=args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Which test images are "easy": grouped by the exit they left at, at the budget nearest DynamicViT ρ 0.7's.
    _, thresholds = min(cascade, key=lambda c: abs(c[0].keep_ratio - 0.7))
    gallery = save_exit_gallery(images, dvt.predict_early_exit(images, thresholds).exit_index, out / "exits.png")
    write_report(rows, out, stem="dvt_vs_dynamicvit", title="DVT vs DynamicViT on the digits", environment=env)
    print(f"{describe(env)}; {args.pairs} pairs per speedup, test top-1 on {len(test.dataset)} images")
    print(f"test images by the exit they left at: {gallery}\n")
    print(format_table(rows))
    print(
        "\n| ρ budget | GFLOPs | DynamicViT top-1 / speedup | DVT top-1 / speedup | DVT share of its FLOP ratio "
        "(this batch) | DynamicViT's fastest speedup reaching DVT's top-1 | faster at equal top-1 |"
    )
    print("| ---: | ---: | --- | --- | ---: | --- | --- |")
    comparison = []
    for (row, _), plain, on_batch in zip(cascade, dynamicvit, batch_gflops, strict=True):
        share = row.speedup / (teacher_gflops / on_batch)
        rival = fastest_reaching(row.top1, dynamicvit)
        winner = (
            "DVT (DynamicViT never reaches it)" if rival is None else ("DVT" if row.speedup > rival else "DynamicViT")
        )
        comparison.append(
            {"keep_ratio": plain.keep_ratio, "dvt_share": share, "dynamicvit_at_dvt_top1": rival, "faster": winner}
        )
        print(
            f"| {plain.keep_ratio:g} | {plain.gflops:.4f} | {100 * plain.top1:.1f} % / {plain.speedup:.2f}× | "
            f"{100 * row.top1:.1f} % / {row.speedup:.2f}× | {share:.2f} | "
            f"{'never' if rival is None else f'{rival:.2f}×'} | {winner} |"
        )
    result = {"environment": env, "rows": [r.flat() for r in rows], "comparison": comparison}
    (out / "dvt_vs_dynamicvit_comparison.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
