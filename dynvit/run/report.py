"""Cost/accuracy tables of pruned models: rows, a printed table, CSV/JSON files and a trade-off figure."""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dynvit.files import staged, write_text
from dynvit.measure.throughput import format_speedup


@dataclass
class ResultRow:
    """One model at one operating point.

    Attributes:
        method: ``teacher`` for the unpruned model, else the reduction method (``dynamicvit``, …).
        keep_ratio: Base keep ratio ρ (1.0 for the teacher).
        gflops: fvcore GFLOPs of one image.
        params_m: Parameters in millions.
        images_per_s: Eval-mode throughput (None when not measured): the median over timed blocks.
        speedup: Over the float32 eager teacher, the median of per-pair time ratios measured alongside it
            (:mod:`dynvit.measure.throughput`; None without a teacher).
        speedup_low, speedup_high: The speedup's 95 % interval (None below 6 pairs).
        top1: Validation top-1 as a fraction (None without data).
        recall: Per pruning stage, the share of the object's patches still kept (data with patch masks).
        purity: For tokens that stand for sets of patches, the share of the object's patches in
            object-majority tokens after the last block (data with patch masks): a merger's from its merge
            sources, a clustering method's from its last stage's clusters.
        images: How many validation images top-1, recall and purity were scored on.
        run: Where the row comes from (a sweep point's folder), if anywhere.
        param: The method's own setting when it is not ρ (``r=3``, ``keep_rate=0.62``, ``K=20``): ``keep_ratio``
            is then the DynamicViT keep ratio the method was matched to in GFLOPs.
        tokens: Patch tokens left in the last block (class token excluded); the mean over images for
            adaptive methods (ATS), whose ``gflops`` is then the mean too.
        precision: ``fp32``, ``bf16`` or ``int8`` (:func:`dynvit.quantize`); GFLOPs are those of the float32 graph.
        backend: ``eager`` (PyTorch) or ``onnxruntime`` (the exported ONNX file).
        latency_ms: Median milliseconds of one image (batch 1).
        latency_speedup, latency_speedup_low, latency_speedup_high: Batch-1 speedup over the teacher
            and its 95 % interval, estimated like ``speedup``.
        track: ``training-free`` (the method on the teacher's weights) or ``fine-tuned`` (trained after
            reduction), for the points of a fine-tuning grid; None elsewhere.
        exit_shares: For a cascade that exits early (DVT), the share of the scored images that left at each
            exit, coarsest first (empty for other models).
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
    precision: str = "fp32"
    backend: str = "eager"
    speedup_low: float | None = None
    speedup_high: float | None = None
    latency_ms: float | None = None
    latency_speedup: float | None = None
    latency_speedup_low: float | None = None
    latency_speedup_high: float | None = None
    purity: float | None = None
    images: int | None = None
    track: str | None = None
    exit_shares: list[float] = field(default_factory=list)

    @property
    def variant(self) -> str:
        """How the row ran where that is not float32 eager PyTorch: ``int8``, ``onnxruntime``, ``onnxruntime int8``."""
        parts = [p for p, default in ((self.backend, "eager"), (self.precision, "fp32")) if p != default]
        return " ".join(parts)

    @property
    def label(self) -> str:
        """The method with its variant: ``dynamicvit``, ``dynamicvit int8``, ``teacher onnxruntime``."""
        return f"{self.method} {self.variant}".strip()

    def flat(self) -> dict[str, Any]:
        """A flat record: ``recall`` becomes ``recall_s1``, ``recall_s2``, …, ``exit_shares`` ``exit1``, ``exit2``, …"""
        record = asdict(self)
        recall = record.pop("recall")
        record.update({f"recall_s{s + 1}": r for s, r in enumerate(recall)})
        record.update({f"exit{k + 1}": share for k, share in enumerate(record.pop("exit_shares"))})
        return record

    @classmethod
    def from_flat(cls, record: dict[str, Any]) -> ResultRow:
        record = dict(record)
        stages = sorted((k for k in record if k.startswith("recall_s")), key=lambda k: int(k.removeprefix("recall_s")))
        recall = [record.pop(k) for k in stages]
        exits = sorted((k for k in record if re.fullmatch(r"exit\d+", k)), key=lambda k: int(k.removeprefix("exit")))
        shares = [record.pop(k) for k in exits]
        return cls(
            **record, recall=[r for r in recall if r is not None], exit_shares=[e for e in shares if e is not None]
        )


def records(rows: Sequence[ResultRow]) -> list[dict[str, Any]]:
    """Flat records with the same columns for every row (recall columns of the deepest model)."""
    flat = [row.flat() for row in rows]
    columns: dict[str, None] = {}
    for record in flat:
        columns.update(dict.fromkeys(record))
    return [{c: record.get(c) for c in columns} for record in flat]


def _fmt(value: Any, kind: str, record: dict[str, Any] | None = None, key: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if kind == "percent":
        return f"{100 * value:.2f}"
    if kind == "ratio":
        return format_speedup(value, (record or {}).get(f"{key}_low"), (record or {}).get(f"{key}_high"))
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[ResultRow]) -> str:
    """A Markdown table: method, ρ, setting, precision, backend, GFLOPs, tokens, params, images/s,
    speedup (95 % interval), batch-1 latency and its speedup, scored images, top-1 %, the share of images
    leaving at each exit of a cascade, recall % per stage, purity %.

    Columns nothing was measured for are left out, and so are precision and backend while every row
    is float32 eager PyTorch.
    """
    recs = records(rows)
    for rec in recs:  # a cascade's exit shares in one cell: 62/30/8
        shares = [rec[k] for k in rec if re.fullmatch(r"exit\d+", k) and rec[k] is not None]
        rec["exit_shares"] = "/".join(f"{100 * v:.0f}" for v in shares) if shares else None
    columns = [
        ("method", "method", "text"),
        ("track", "track", "text"),
        ("run", "run", "text"),
        ("keep_ratio", "ρ", "float"),
        ("param", "setting", "text"),
        ("precision", "precision", "text"),
        ("backend", "backend", "text"),
        ("gflops", "GFLOPs", "float"),
        ("tokens", "tokens", "float"),
        ("params_m", "params (M)", "float"),
        ("images_per_s", "images/s", "float"),
        ("speedup", "speedup (95 % CI)", "ratio"),
        ("latency_ms", "latency ms (batch 1)", "float"),
        ("latency_speedup", "latency speedup (95 % CI)", "ratio"),
        ("images", "images", "text"),
        ("top1", "top-1 %", "percent"),
        ("exit_shares", "% left at exit 1/2/3", "text"),
    ]
    columns += [(k, f"recall s{k.removeprefix('recall_s')} %", "percent") for k in recs[0] if k.startswith("recall_s")]
    columns += [("purity", "purity %", "percent")]
    defaults = {"precision": "fp32", "backend": "eager"}
    keep = [
        c
        for c in columns
        if any(r[c[0]] is not None and r[c[0]] != defaults.get(c[0]) for r in recs)  # unmeasured columns go
    ]
    lines = ["| " + " | ".join(title for _, title, _ in keep) + " |", "|" + "|".join("---" for _ in keep) + "|"]
    for rec in recs:
        lines.append("| " + " | ".join(_fmt(rec[key], kind, rec, key) for key, _, kind in keep) + " |")
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

    Each method in each precision and backend (``dynamicvit``, ``dynamicvit int8``, …) is a line
    through its operating points in its own marker; speedups carry their 95 % intervals as error bars.
    The float32 teacher is a star, its other variants crosses. DynamicViT's points are labelled with ρ;
    methods matched to it list their settings (``r=7, 11``), highest ρ first, in the legend, and share
    its ρ on the right-hand axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    has_top1 = any(r.top1 is not None for r in rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    curves = list(dict.fromkeys(r.label for r in rows if r.method != "teacher"))  # first-seen order
    teachers = [r for r in rows if r.method == "teacher"]

    def errorbar(ax, pts: Sequence[ResultRow], xs: Sequence[float], **style) -> None:
        ys = [r.speedup for r in pts]
        yerr = [
            [r.speedup - r.speedup_low if r.speedup_low is not None else 0.0 for r in pts],
            [r.speedup_high - r.speedup if r.speedup_high is not None else 0.0 for r in pts],
        ]
        ax.errorbar(xs, ys, yerr=yerr, capsize=3, **style)

    for label, marker in zip(curves, itertools.cycle("os^Dvp<>h"), strict=False):
        pts = sorted((r for r in rows if r.label == label), key=lambda r: r.keep_ratio)
        if has_top1:
            xs, ys = [r.gflops for r in pts], [100 * r.top1 if r.top1 is not None else math.nan for r in pts]
        else:
            xs, ys = [r.keep_ratio for r in pts], [r.gflops for r in pts]
        legend = _legend_label(label, [r.param for r in reversed(pts) if r.param])
        left.plot(xs, ys, marker=marker, linestyle="-", label=legend)
        for r, x, y in zip(pts, xs, ys, strict=True):
            if not r.param and not r.variant:  # one label per point is enough: on the float32 eager curve
                left.annotate(f"ρ={r.keep_ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        timed = [r for r in pts if r.speedup is not None]
        if timed:
            errorbar(right, timed, [r.keep_ratio for r in timed], marker=marker, linestyle="-", label=label)
    # The float32 teacher is a black star; its other variants grey crosses, pluses, diamonds, …
    shades = zip(itertools.cycle(["0.35", "0.55", "0.7", "0.85"]), itertools.cycle("XPdv"), strict=False)
    for teacher, (grey, mark) in zip(teachers, itertools.chain([("k", "*")], shades), strict=False):
        style = dict(marker=mark, color=grey, linestyle="none", markersize=10, label=teacher.label)
        if has_top1 and teacher.top1 is not None:
            left.plot([teacher.gflops], [100 * teacher.top1], **style)
        elif not has_top1 and not teacher.variant:
            left.plot([1.0], [teacher.gflops], **style)
        if teacher.speedup is not None:
            errorbar(right, [teacher], [1.0], **style)
    right.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    if has_top1:
        left.set(xlabel="GFLOPs per image", ylabel="validation top-1 (%)", title="accuracy vs cost")
    else:
        left.set(xlabel="keep ratio ρ", ylabel="GFLOPs per image", title="cost vs keep ratio")
    right.set(
        xlabel="keep ratio ρ",
        ylabel="speedup over the fp32 teacher (95 % CI)",
        title="speedup vs keep ratio",
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure to ``path`` through :func:`~dynvit.files.staged`, then close it."""
    import matplotlib.pyplot as plt

    with staged(path) as staging:  # the format named, as the staging file's suffix names none
        fig.savefig(staging, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def write_report(
    rows: Sequence[ResultRow],
    out_dir: str | Path,
    stem: str = "results",
    title: str | None = None,
    environment: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``<stem>.csv``, ``<stem>.json`` and ``tradeoff.png`` into ``out_dir``; return their paths.

    ``environment`` (:func:`dynvit.measure.environment`) goes into both files: as ``env_*`` columns of
    every CSV row, so a row read on its own still names its machine, and as the JSON's
    ``"environment"`` beside its ``"rows"``.
    """
    if not rows:
        raise ValueError("no results to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recs = records(rows)
    env = dict(environment or {})
    paths = {"csv": out / f"{stem}.csv", "json": out / f"{stem}.json", "figure": out / "tradeoff.png"}
    # Every file staged: a rerun of a sweep or benchmark rewrites them, and one cut short would lose the last.
    with staged(paths["csv"]) as staging, staging.open("w", newline="") as f:
        columns = list(recs[0]) + [f"env_{k}" for k in env]
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({**rec, **{f"env_{k}": v for k, v in env.items()}} for rec in recs)
    write_text(paths["json"], json.dumps({"environment": env, "rows": recs}, indent=2) + "\n")
    plot_tradeoff(rows, paths["figure"], title)
    return paths


def read_rows(path: str | Path) -> list[ResultRow]:
    """The rows of a ``results.json``/``summary.json`` written by :func:`write_report`."""
    return [ResultRow.from_flat(record) for record in json.loads(Path(path).read_text())["rows"]]


def format_matches(records: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of matched settings, one row per keep ratio (see ``dynvit.reducers.matching.matched_records``)."""
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
    with staged(paths["csv"]) as staging, staging.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    write_text(paths["json"], json.dumps(list(records), indent=2) + "\n")
    return paths
