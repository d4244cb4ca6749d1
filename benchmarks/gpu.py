"""Does pruning pay on a GPU? Teacher vs DynamicViT students, eager vs compiled, plain vs recomputing attention.

For every model (default DeiT-S and DeiT-B) the unpruned teacher and one student per keep ratio
(default ρ = 0.9, 0.7, 0.5) are measured, in each mode (eager, compiled):

* inference images/s at ``--batch-size`` (eval, ``torch.inference_mode``, autocast to ``--dtype``);
* batch-1 latency: median milliseconds of one synchronised forward;
* for students, images/s of one training step of the DynamicViT objective — student forward, frozen
  teacher forward, ``CE + 2·ratio MSE + 0.5·KL + 0.5·token MSE`` (docs/reference.md), backward, AdamW —
  with the recomputing masked-attention Function and with the plain float32 formula, and on CUDA
  the peak memory of each.

Prints one Markdown table (ratios to the teacher of the same model and mode, and Function / plain)
and writes every number to ``--json``. Models are randomly initialised: speed does not depend on the
weights, since every stage keeps a fixed number of tokens.

GPU run (about 20–30 min with compilation; split it with --models/--modes to fit shorter slots)::

    python benchmarks/gpu.py --json gpu.json

CPU smoke check::

    python benchmarks/gpu.py --device cpu --batch-size 2 --models deit_tiny_patch16_224 \\
        --keep-ratios 0.7 --modes eager --warmup 1 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from options import check_options
from torch import nn

from dynvit import create_student, create_teacher, environment, forward_with_tokens, measure_throughput
from dynvit.models.dynamic_vit import StudentOutput
from dynvit.models.masked_attention import set_recompute

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dynamicvit_loss(
    out: StudentOutput,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_tokens: torch.Tensor,
    keep_targets: Sequence[float],
) -> torch.Tensor:
    """``CE + 2·ratio + 0.5·KL(student ‖ teacher) + 0.5·MSE(kept final tokens)`` as in docs/reference.md.

    The token MSE is the mean over the kept tokens' elements written as a masked sum, which equals
    indexing the kept tokens but has no data-dependent shape and so no host sync.
    """
    logits = out.logits.float()
    cls = F.cross_entropy(logits, targets)
    ratio = torch.stack(
        [((d.mean(dim=1) - t) ** 2).mean() for d, t in zip(out.decisions, keep_targets, strict=True)]
    ).mean()
    kl = F.kl_div(
        F.log_softmax(logits, dim=-1),
        F.log_softmax(teacher_logits.float(), dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    mask = out.mask.float().unsqueeze(-1)
    sq = (out.tokens.float() - teacher_tokens.float()) ** 2 * mask
    token = sq.sum() / (mask.sum() * sq.shape[-1]).clamp_min(1.0)
    return cls + 2.0 * ratio + 0.5 * kl + 0.5 * token


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def maybe_compile(fn: Callable, compiled: bool, backend: str) -> Callable:
    # A fresh dynamo cache per measurement: many models share the same forward code, and past the
    # recompile limit dynamo would silently fall back to eager.
    if not compiled:
        return fn
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, dynamic=False)


def train_step_images_per_second(
    student: nn.Module,
    teacher: nn.Module,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    compiled: bool,
    backend: str,
    warmup: int,
    repeats: int,
) -> tuple[float, float | None]:
    """Median images/s of full DynamicViT training steps, and the peak CUDA memory in GiB (None on CPU)."""
    student.train().to(device)
    teacher.eval().requires_grad_(False).to(device)
    size = tuple(student.patch_embed.img_size)
    x = torch.randn(batch_size, 3, *size, device=device)
    y = torch.randint(0, student.num_classes, (batch_size,), device=device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device.type == "cuda")
    run_student = maybe_compile(student, compiled, backend)
    run_teacher = maybe_compile(lambda images: forward_with_tokens(teacher, images), compiled, backend)
    keep_targets = student.stage_keep_ratios

    def step() -> None:
        with autocast(device, dtype):
            with torch.no_grad():
                teacher_logits, teacher_tokens = run_teacher(x)
            loss = dynamicvit_loss(run_student(x), y, teacher_logits, teacher_tokens, keep_targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return batch_size / statistics.median(times), peak


def inference(
    model: nn.Module, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, compiled: bool
) -> dict:
    """Images/s at the benchmark batch and median batch-1 latency in ms."""
    common = dict(device=device, dtype=dtype, pairs=args.repeats, channels_last=args.channels_last)
    ips = measure_throughput(maybe_compile(model, compiled, args.compile_backend), batch_size=args.batch_size, **common)
    one = measure_throughput(maybe_compile(model, compiled, args.compile_backend), batch_size=1, **common)
    return {"images_per_s": ips, "latency_ms": 1000.0 / one}


def run(args: argparse.Namespace) -> list[dict]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rows = []
    for name in args.models:
        kwargs = dict(num_classes=args.num_classes, img_size=args.img_size)
        teacher = create_teacher(name, **kwargs)
        for mode in args.modes:
            compiled = mode == "compiled"
            rows.append({"model": name, "variant": "teacher", "keep_ratio": 1.0, "mode": mode})
            rows[-1].update(inference(teacher, args, device, dtype, compiled))
            for keep_ratio in args.keep_ratios:
                student = create_student(name, keep_ratio=keep_ratio, **kwargs)
                row = {"model": name, "variant": f"ρ={keep_ratio}", "keep_ratio": keep_ratio, "mode": mode}
                row.update(inference(student, args, device, dtype, compiled))
                if not args.skip_train:
                    for path, recompute in (("function", True), ("plain", False)):
                        set_recompute(student, recompute)
                        ips, peak = train_step_images_per_second(
                            student, teacher, args.batch_size, device, dtype, compiled,
                            args.compile_backend, args.warmup, args.train_repeats,
                        )  # fmt: skip
                        row[f"train_{path}_images_per_s"], row[f"train_{path}_peak_gib"] = ips, peak
                rows.append(row)
                del student
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Speed relative to the teacher of the same model and mode, and Function / plain for training."""
    teachers = {(r["model"], r["mode"]): r for r in rows if r["variant"] == "teacher"}
    for r in rows:
        t = teachers[(r["model"], r["mode"])]
        r["images_per_s_vs_teacher"] = r["images_per_s"] / t["images_per_s"]
        r["latency_speedup_vs_teacher"] = t["latency_ms"] / r["latency_ms"]
        if "train_plain_images_per_s" in r:
            r["train_function_vs_plain"] = r["train_function_images_per_s"] / r["train_plain_images_per_s"]


def markdown(rows: list[dict]) -> str:
    def num(r: dict, key: str, fmt: str) -> str:
        return format(r[key], fmt) if r.get(key) is not None else ""

    lines = [
        "| model | variant | mode | img/s | × teacher | latency ms (bs 1) | × teacher | train img/s Function "
        "| train img/s plain | Function / plain | train peak GiB Function | train peak GiB plain |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [
            r["model"],
            r["variant"],
            r["mode"],
            num(r, "images_per_s", ".1f"),
            num(r, "images_per_s_vs_teacher", ".2f"),
            num(r, "latency_ms", ".2f"),
            num(r, "latency_speedup_vs_teacher", ".2f"),
            num(r, "train_function_images_per_s", ".1f"),
            num(r, "train_plain_images_per_s", ".1f"),
            num(r, "train_function_vs_plain", ".2f"),
            num(r, "train_function_peak_gib", ".1f"),
            num(r, "train_plain_peak_gib", ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "deit_base_patch16_224"])
    parser.add_argument("--keep-ratios", nargs="+", type=float, default=[0.9, 0.7, 0.5])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (aot_eager: quick CPU check)"
    )
    parser.add_argument("--img-size", type=int, default=None, help="input side (default: each model's own)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20, help="timed blocks per inference measurement")
    parser.add_argument("--train-repeats", type=int, default=10)
    parser.add_argument("--skip-train", action="store_true", help="inference only")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", default=None, help="write all rows and the setup to this file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device; use --device cpu for a smoke check")
    if "compiled" in args.modes and args.warmup < 1:
        parser.error("compiled mode needs --warmup >= 1 (the first call compiles)")
    return check_options(parser, args)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args)
    print(markdown(rows))
    if args.json:
        env = environment(args.device, args.batch_size, [args.dtype])
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
