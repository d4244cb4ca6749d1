"""Plain masked-softmax attention vs the recomputing Function in one student training step (CPU).

For each model and precision, both attention paths run side by side in one process, interleaved
repeat by repeat so machine load hits both alike, and the script reports per path:

* the median CPU time (``time.process_time``, which machine load inflates far less than wall
  time) and wall time of one training step (forward, loss, backward) of the student;
* the activation bytes autograd saves for backward in that step: every distinct storage packed by
  ``saved_tensors_hooks``, parameters excluded. This is the peak of saved activations, reached at
  the end of the forward.

``--check-compile`` also compiles a tiny student's pruned eval forward with inductor and checks its
output against eager (minutes on a 2-core CPU, hence not a unit test).

Example::

    python benchmarks/masked_attention.py --models deit_tiny_patch16_224 deit_small_patch16_224 \\
        --batch-size 8 --dtypes fp32 bf16 --repeats 5 --json masked_attention.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn.functional as F
from options import check_options
from torch.autograd.graph import saved_tensors_hooks

from dynvit import create_student, environment
from dynvit.models.masked_attention import set_recompute

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATHS = {"plain": False, "function": True}


def autocast(dtype: torch.dtype) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def student_loss(student: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The student's own terms of the objective (CE + 2·keep-ratio MSE): enough to exercise every gradient."""
    out = student(x)
    ratio = torch.stack(
        [((d.mean(dim=1) - t) ** 2).mean() for d, t in zip(out.decisions, student.stage_keep_ratios, strict=True)]
    ).mean()
    return F.cross_entropy(out.logits.float(), y) + 2.0 * ratio


def saved_activation_bytes(student: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward after one forward."""
    params = {p.untyped_storage().data_ptr() for p in student.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t), autocast(dtype):
        loss = student_loss(student, x, y)
    del loss
    return sum(storages.values())


def step_seconds(student: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """CPU seconds and wall seconds of one forward + backward."""
    cpu, wall = time.process_time(), time.perf_counter()
    with autocast(dtype):
        loss = student_loss(student, x, y)
    loss.backward()
    student.zero_grad(set_to_none=True)
    return time.process_time() - cpu, time.perf_counter() - wall


def compare(name: str, dtype_name: str, batch_size: int, repeats: int, keep_ratio: float) -> dict:
    torch.manual_seed(0)
    student = create_student(name, keep_ratio=keep_ratio).train()
    dtype = DTYPES[dtype_name]
    x = torch.randn(batch_size, 3, *student.patch_embed.img_size)
    y = torch.randint(0, student.num_classes, (batch_size,))
    row = {"model": name, "dtype": dtype_name, "batch_size": batch_size, "keep_ratio": keep_ratio}
    times: dict[str, list[tuple[float, float]]] = {path: [] for path in PATHS}
    for path, recompute in PATHS.items():
        set_recompute(student, recompute)
        row[f"{path}_saved_mib"] = saved_activation_bytes(student, x, y, dtype) / 2**20
        step_seconds(student, x, y, dtype)  # warm-up
    for _ in range(repeats):
        for path, recompute in PATHS.items():
            set_recompute(student, recompute)
            times[path].append(step_seconds(student, x, y, dtype))
    for path in PATHS:
        row[f"{path}_cpu_s"] = statistics.median(t[0] for t in times[path])
        row[f"{path}_wall_s"] = statistics.median(t[1] for t in times[path])
    row["cpu_ratio"] = row["function_cpu_s"] / row["plain_cpu_s"]
    row["wall_ratio"] = row["function_wall_s"] / row["plain_wall_s"]
    row["saved_ratio"] = row["function_saved_mib"] / row["plain_saved_mib"]
    return row


def check_compile() -> float:
    """Max |compiled - eager| of a tiny student's pruned eval forward under inductor."""
    tiny = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    student = create_student("vit_tiny_patch16_224", pruning_loc=(1, 2, 3), **tiny).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(student, fullgraph=True, dynamic=False)
    with torch.no_grad():
        return (compiled(x) - student(x)).abs().max().item()


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | dtype | batch | CPU s/step plain | CPU s/step Function | CPU ratio | wall ratio "
        "| saved MiB plain | saved MiB Function | saved ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['batch_size']} | {r['plain_cpu_s']:.2f} | {r['function_cpu_s']:.2f} "
            f"| {r['cpu_ratio']:.2f} | {r['wall_ratio']:.2f} | {r['plain_saved_mib']:.0f} | {r['function_saved_mib']:.0f} "
            f"| {r['saved_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "deit_small_patch16_224"])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--keep-ratio", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=5)
    # One thread by default: with several, OpenMP spin-waiting on a loaded machine pads the CPU time.
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--check-compile", action="store_true", help="also check inductor on a tiny student (slow)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = check_options(parser, parser.parse_args())
    torch.set_num_threads(args.threads)
    rows = [
        compare(name, dtype, args.batch_size, args.repeats, args.keep_ratio)
        for name in args.models
        for dtype in args.dtypes
    ]
    print(markdown(rows))
    result = {"environment": environment("cpu", args.batch_size, args.dtypes), "rows": rows}
    if args.check_compile:
        result["compile_max_abs_diff"] = check_compile()
        print(f"\ninductor-compiled tiny student, eval: max |compiled - eager| = {result['compile_max_abs_diff']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
