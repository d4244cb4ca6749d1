"""Cost/accuracy tables of pruned models: rows, a printed table, CSV/JSON files and a trade-off figure."""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ResultRow:
    """One model at one operating point.

    Attributes:
        method: ``teacher`` for the unpruned model, else the reduction method (``dynamicvit``, …).
        keep_ratio: Base keep ratio ρ (1.0 for the teacher).
        gflops: fvcore GFLOPs of one image.
        params_m: Parameters in millions.
        images_per_s: Eval-mode throughput (None when not measured).
        speedup: ``images_per_s`` ÷ the teacher's, measured alongside (None without a teacher).
        top1: Validation top-1 as a fraction (None without data).
        recall: Per pruning stage, the share of the object's patches still kept (data with patch masks).
        run: Where the row comes from (a sweep point's folder), if anywhere.
        param: The method's own setting when it is not ρ (``r=3``, ``keep_rate=0.62``, ``K=20``): ``keep_ratio``
            is then the DynamicViT keep ratio the method was matched to in GFLOPs.
        tokens: Patch tokens left in the last block (class token excluded); the mean over images for
            adaptive methods (ATS), whose ``gflops`` is then the mean too.
    """

    method: str
    keep_ratio: float
    gflops: float
    params_m: float
    images_per_s: float | None = None
    speedup: float | None = None
    top1: float | None = None
    recall: list[float] = field(default_factory=list)
    run: str | None = None
    param: str | None = None
    tokens: float | None = None

    def flat(self) -> dict[str, Any]:
        """A flat record: ``recall`` becomes ``recall_s1``, ``recall_s2``, …"""
        record = asdict(self)
        recall = record.pop("recall")
        record.update({f"recall_s{s + 1}": r for s, r in enumerate(recall)})
        return record

    @classmethod
    def from_flat(cls, record: dict[str, Any]) -> ResultRow:
        record = dict(record)
        stages = sorted((k for k in record if k.startswith("recall_s")), key=lambda k: int(k.removeprefix("recall_s")))
        recall = [record.pop(k) for k in stages]
        return cls(**record, recall=[r for r in recall if r is not None])


def records(rows: Sequence[ResultRow]) -> list[dict[str, Any]]:
    """Flat records with the same columns for every row (recall columns of the deepest model)."""
    flat = [row.flat() for row in rows]
    columns: dict[str, None] = {}
    for record in flat:
        columns.update(dict.fromkeys(record))
    return [{c: record.get(c) for c in columns} for record in flat]


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if kind == "percent":
        return f"{100 * value:.2f}"
    if kind == "ratio":
        return f"{value:.2f}×"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[ResultRow]) -> str:
    """A Markdown table: method, ρ, setting, GFLOPs, tokens, params, images/s, speedup, top-1 %,
    recall % per stage (columns nothing was measured for are left out)."""
    recs = records(rows)
    columns = [
        ("method", "method", "text"),
        ("run", "run", "text"),
        ("keep_ratio", "ρ", "float"),
        ("param", "setting", "text"),
        ("gflops", "GFLOPs", "float"),
        ("tokens", "tokens", "float"),
        ("params_m", "params (M)", "float"),
        ("images_per_s", "images/s", "float"),
        ("speedup", "speedup", "ratio"),
        ("top1", "top-1 %", "percent"),
    ]
    columns += [(k, f"recall s{k.removeprefix('recall_s')} %", "percent") for k in recs[0] if k.startswith("recall_s")]
    keep = [c for c in columns if any(r[c[0]] is not None for r in recs)]  # columns nothing was measured for go
    lines = ["| " + " | ".join(title for _, title, _ in keep) + " |", "|" + "|".join("---" for _ in keep) + "|"]
    for rec in recs:
        lines.append("| " + " | ".join(_fmt(rec[key], kind) for key, _, kind in keep) + " |")
    return "\n".join(lines)


def _legend_label(method: str, params: Sequence[str]) -> str:
    """``tome: r=7, 11`` from ``["r=7", "r=11"]``; the method alone without settings."""
    if not params:
        return method
    names = {p.split("=", 1)[0] for p in params}
    if len(names) == 1 and all("=" in p for p in params):
        return f"{method}: {names.pop()}=" + ", ".join(p.split("=", 1)[1] for p in params)
    return f"{method}: " + ", ".join(params)


def plot_tradeoff(rows: Sequence[ResultRow], path: str | Path, title: str | None = None) -> Path:
    """Left: top-1 against GFLOPs (GFLOPs against ρ without accuracy); right: speedup against ρ.

    The teacher is a star; each method a line through its operating points in its own marker.
    DynamicViT's points are labelled with ρ; methods matched to it list their settings (``r=7, 11``),
    highest ρ first, in the legend, and share its ρ on the right-hand axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    has_top1 = any(r.top1 is not None for r in rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    methods = list(dict.fromkeys(r.method for r in rows if r.method != "teacher"))  # first-seen order
    for method, marker in zip(methods, itertools.cycle("os^Dvp<>h"), strict=False):
        pts = sorted((r for r in rows if r.method == method), key=lambda r: r.keep_ratio)
        if has_top1:
            xs, ys = [r.gflops for r in pts], [100 * r.top1 if r.top1 is not None else math.nan for r in pts]
        else:
            xs, ys = [r.keep_ratio for r in pts], [r.gflops for r in pts]
        label = _legend_label(method, [r.param for r in reversed(pts) if r.param])
        (line,) = left.plot(xs, ys, marker=marker, linestyle="-", label=label)
        for r, x, y in zip(pts, xs, ys, strict=True):
            if not r.param:  # matched methods share DynamicViT's GFLOPs: their settings go in the legend
                left.annotate(f"ρ={r.keep_ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        speed = [(r.keep_ratio, r.speedup) for r in pts if r.speedup is not None]
        if speed:
            right.plot(*zip(*speed, strict=True), marker=marker, linestyle="-", label=method)
    for teacher in (r for r in rows if r.method == "teacher"):
        if has_top1 and teacher.top1 is not None:
            left.plot([teacher.gflops], [100 * teacher.top1], "k*", markersize=12, label="teacher")
        elif not has_top1:
            left.plot([1.0], [teacher.gflops], "k*", markersize=12, label="teacher")
        right.plot([1.0], [1.0], "k*", markersize=12, label="teacher")
    right.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    if has_top1:
        left.set(xlabel="GFLOPs per image", ylabel="validation top-1 (%)", title="accuracy vs cost")
    else:
        left.set(xlabel="keep ratio ρ", ylabel="GFLOPs per image", title="cost vs keep ratio")
    right.set(xlabel="keep ratio ρ", ylabel="speedup over the teacher (images/s)", title="speedup vs keep ratio")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(
    rows: Sequence[ResultRow], out_dir: str | Path, stem: str = "results", title: str | None = None
) -> dict[str, Path]:
    """Write ``<stem>.csv``, ``<stem>.json`` and ``tradeoff.png`` into ``out_dir``; return their paths."""
    if not rows:
        raise ValueError("no results to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recs = records(rows)
    paths = {"csv": out / f"{stem}.csv", "json": out / f"{stem}.json", "figure": out / "tradeoff.png"}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(recs[0]))
        writer.writeheader()
        writer.writerows(recs)
    paths["json"].write_text(json.dumps(recs, indent=2) + "\n")
    plot_tradeoff(rows, paths["figure"], title)
    return paths


def format_matches(records: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of matched settings, one row per keep ratio (see ``dynvit.run.compare.matched_records``)."""
    if not records:
        raise ValueError("no matched settings to format")
    columns = list(dict.fromkeys(key for record in records for key in record))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for record in records:
        lines.append("| " + " | ".join(_fmt(record.get(c), "float") for c in columns) + " |")
    return "\n".join(lines)


def write_matches(records: Sequence[dict[str, Any]], out_dir: str | Path, stem: str = "matched") -> dict[str, Path]:
    """Write matched settings as ``<stem>.csv`` and ``<stem>.json`` into ``out_dir``; return their paths."""
    if not records:
        raise ValueError("no matched settings to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for record in records for key in record))
    paths = {"csv": out / f"{stem}.csv", "json": out / f"{stem}.json"}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    paths["json"].write_text(json.dumps(list(records), indent=2) + "\n")
    return paths
