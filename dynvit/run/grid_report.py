"""The fine-tuning grid's report: every method at every budget, training-free beside fine-tuned.

A grid (``cli.py sweep`` over ``model.init_args.method`` × ``keep_ratio`` × ``fine_tune`` of a
:class:`~dynvit.lightning.MethodFineTuning` config) gives one :class:`~dynvit.run.report.ResultRow` per point,
its ``track`` saying which. This module folds them into one line per method and budget
(``grid.md``/``.csv``/``.json``), marks the Pareto front, names the best method at each budget, and draws
top-1 against GFLOPs and against measured speedup (``grid.png``: one colour per method, hollow markers
training-free, filled fine-tuned). Points repeated over seeds (``seed_everything`` swept) are averaged, with
their range, and a win whose range overlaps the runner-up's is called a tie.

The budgets every fine-tuned point trained with (epochs, data, augmentation, optimiser) are read from the
sweep's ``config.yaml`` and written above the table; a sweep that varies one of them is flagged there.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dynvit.files import staged, write_text
from dynvit.measure.throughput import format_speedup
from dynvit.run.report import ResultRow, save_figure

TRACKS = ("training-free", "fine-tuned")
# Sweep keys that make points of one grid, not different training budgets.
GRID_KEYS = ("method", "keep_ratio", "fine_tune", "seed_everything")
# What a fine-tuned point's training budget is made of, as config keys (model.init_args.* and trainer.*).
BUDGET_MODEL_KEYS = (
    "lr",
    "lr_base_batch_size",
    "backbone_lr_scale",
    "weight_decay",
    "warmup_epochs",
    "min_lr_ratio",
    "label_smoothing",
    "mixup",
    "cutmix",
    "distill_weight",
    "model_kwargs",
    "teacher_checkpoint",
    "pretrained",
    "pruning_loc",
)
BUDGET_TRAINER_KEYS = ("max_epochs", "max_steps", "limit_train_batches", "accumulate_grad_batches", "precision")


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _spread(values: Sequence[float]) -> tuple[float, float] | None:
    return (min(values), max(values)) if len(values) > 1 else None


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def point_variant(point: Mapping[str, Any]) -> str:
    """What sets a grid point apart beyond its method, budget, track and seed (``distill_weight=0.5`` in a grid
    that sweeps it), else ``""``: points of one variant are repeats of each other, averaged over seeds; points of
    two variants are two lines of the table, never one range."""
    return " ".join(f"{_leaf(key)}={value}" for key, value in point.items() if _leaf(key) not in GRID_KEYS)


def label(record: Mapping[str, Any]) -> str:
    """A record's method with its variant, if any: ``tome``, ``tome (distill_weight=0.5)``."""
    return f"{record['method']} ({record['variant']})" if record.get("variant") else record["method"]


def grid_records(rows: Sequence[ResultRow], variants: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """One record per method, variant and budget ρ, in first-seen order: cost and speed (of the fine-tuned points
    where there are any: the cost is the budget's, the speed measured per point), and per track the mean top-1, its
    range over repeated points (seeds), and the last stage's recall and the purity, as fractions.

    ``variants`` maps a row's ``run`` (its sweep point's folder) to its :func:`point_variant`; rows it does not
    name have none."""
    variants = variants or {}
    groups: dict[tuple[str, str, float], list[ResultRow]] = {}
    for row in rows:
        if row.track in TRACKS:
            groups.setdefault((row.method, variants.get(row.run or "", ""), row.keep_ratio), []).append(row)
    records = []
    for (method, variant, rho), points in groups.items():
        timed = [r for r in points if r.track == "fine-tuned"] or points

        def mean_of(attr: str, pts: Sequence[ResultRow] = timed) -> float | None:
            return _mean([getattr(r, attr) for r in pts if getattr(r, attr) is not None])

        record: dict[str, Any] = {
            "method": method,
            "variant": variant or None,
            "keep_ratio": rho,
            # Training may replace the knob's setting (DiffRate's searched rates): both tracks' then.
            "param": " / ".join(dict.fromkeys(r.param for r in points if r.param)) or None,
            "gflops": mean_of("gflops"),
            "speedup": mean_of("speedup"),
            "speedup_low": mean_of("speedup_low"),
            "speedup_high": mean_of("speedup_high"),
            "latency_ms": mean_of("latency_ms"),
            "latency_speedup": mean_of("latency_speedup"),
        }
        for track in TRACKS:
            key = "ft" if track == "fine-tuned" else "tf"
            pts = [r for r in points if r.track == track]
            top1 = [r.top1 for r in pts if r.top1 is not None]
            spread = _spread(top1)
            record[f"top1_{key}"] = _mean(top1)
            record[f"top1_{key}_low"], record[f"top1_{key}_high"] = spread if spread else (None, None)
            record[f"seeds_{key}"] = len(top1)
            record[f"recall_{key}"] = _mean([r.recall[-1] for r in pts if r.recall])
            record[f"purity_{key}"] = mean_of("purity", pts)
        records.append(record)
    return records


def pareto_front(points: Sequence[tuple[float, float]], lower_x_is_better: bool) -> list[int]:
    """Indices of the points (x, top-1) no other point beats in both: cheaper (or faster) and at least as
    accurate, or as cheap and more accurate. Sorted by x."""
    sign = 1 if lower_x_is_better else -1
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (sign * xj <= sign * x and yj >= y) and (sign * xj < sign * x or yj > y)
            for j, (xj, yj) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _points(records: Sequence[dict[str, Any]], x: str) -> list[tuple[dict[str, Any], str, float, float]]:
    """(record, track, x, top-1) for every measured point of the grid."""
    out = []
    for rec, (track, key) in itertools.product(records, zip(TRACKS, ("tf", "ft"), strict=True)):
        if rec.get(x) is not None and rec.get(f"top1_{key}") is not None:
            out.append((rec, track, rec[x], rec[f"top1_{key}"]))
    return out


def front_labels(records: Sequence[dict[str, Any]], x: str, lower_x_is_better: bool) -> list[str]:
    """``method ρ track`` of the points on the Pareto front of top-1 against ``x`` (``gflops`` or ``speedup``)."""
    pts = _points(records, x)
    front = pareto_front([(px, py) for _, _, px, py in pts], lower_x_is_better)
    return [f"{label(pts[i][0])} ρ={pts[i][0]['keep_ratio']:g} {pts[i][1]}" for i in front]


def best_at_budgets(records: Sequence[dict[str, Any]]) -> list[str]:
    """A sentence per budget ρ and track: the method with the best mean top-1, and whether its lead is beyond the
    range of the runner-up over repeated points (else a tie, named as such)."""
    lines = []
    for rho in sorted({r["keep_ratio"] for r in records}, reverse=True):
        for track, key in zip(TRACKS, ("tf", "ft"), strict=True):
            ranked = sorted(
                (r for r in records if r["keep_ratio"] == rho and r.get(f"top1_{key}") is not None),
                key=lambda r: -r[f"top1_{key}"],
            )
            if not ranked:
                continue
            best = ranked[0]
            line = f"- ρ={rho:g}, {track}: **{label(best)}** {100 * best[f'top1_{key}']:.2f} %"
            if len(ranked) > 1:
                second = ranked[1]
                margin = 100 * (best[f"top1_{key}"] - second[f"top1_{key}"])
                line += f", {margin:.2f} points ahead of {label(second)}"
                low, high = best.get(f"top1_{key}_low"), second.get(f"top1_{key}_high")
                seeds = min(best[f"seeds_{key}"], second[f"seeds_{key}"])
                if low is not None and high is not None:
                    verdict = "beyond" if low > high else "within (a tie)"
                    line += f"; {verdict} the range over {seeds} seeds"
                else:
                    line += " (one seed: the margin's noise is not measured)"
            lines.append(line)
    return lines


def budgets(config_path: Path, swept: Sequence[str]) -> list[str]:
    """The training budget every point shares, from the sweep's ``config.yaml``, and any swept key that changes it."""
    config = yaml.safe_load(Path(config_path).read_text()) or {}
    trainer = config.get("trainer") or {}
    model = (config.get("model") or {}).get("init_args") or {}
    data = config.get("data") or {}
    callbacks = [c.get("class_path", c) if isinstance(c, dict) else str(c) for c in trainer.get("callbacks") or []]
    lines = [f"- trainer: {', '.join(f'{k}={trainer.get(k)}' for k in BUDGET_TRAINER_KEYS)}"]
    lines.append(f"- optimisation and augmentation: {', '.join(f'{k}={model.get(k)}' for k in BUDGET_MODEL_KEYS)}")
    lines.append(f"- data: {data.get('class_path')} {json.dumps(data.get('init_args') or {}, sort_keys=True)}")
    lines.append(f"- callbacks (model EMA where listed): {callbacks or 'none'}")
    varied = [k for k in swept if _leaf(k) not in GRID_KEYS]
    if varied:
        lines.append(f"- **not equal across points**: the sweep varies {varied}")
    else:
        lines.append("- every fine-tuned point trains with these same epochs, data and augmentation")
    return lines


def _pct(value: float | None, low: float | None = None, high: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    spread = f" ({100 * low:.2f}–{100 * high:.2f})" if low is not None and high is not None else ""
    return f"{100 * value:.2f}{spread}"


def _ratio(value: float | None, low: float | None = None, high: float | None = None) -> str:
    return "–" if value is None else format_speedup(value, low, high)


def format_grid(records: Sequence[dict[str, Any]], teacher: ResultRow | None = None) -> str:
    """The Markdown table of :func:`grid_records`; ★ marks a point on the top-1/GFLOPs Pareto front."""
    pts = _points(records, "gflops")
    on_front = {(id(pts[i][0]), pts[i][1]) for i in pareto_front([(x, y) for _, _, x, y in pts], True)}
    header = [
        "method",
        "ρ",
        "setting",
        "GFLOPs",
        "speedup (95 % CI)",
        "latency ms (batch 1)",
        "top-1 % training-free",
        "top-1 % fine-tuned",
        "recall % tf / ft",
        "purity % tf / ft",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    if teacher is not None:
        lines.append(f"| teacher | 1 | – | {teacher.gflops:.4g} | 1.00× | – | {_pct(teacher.top1)} | – | – | – |")
    for rec in records:
        star = {t: " ★" if (id(rec), t) in on_front else "" for t in TRACKS}
        tf = _pct(rec["top1_tf"], rec["top1_tf_low"], rec["top1_tf_high"]) + star["training-free"]
        ft = _pct(rec["top1_ft"], rec["top1_ft_low"], rec["top1_ft_high"]) + star["fine-tuned"]
        latency = "–" if rec["latency_ms"] is None else f"{rec['latency_ms']:.3g}"
        cells = [
            label(rec),
            f"{rec['keep_ratio']:g}",
            rec["param"] or "–",
            "–" if rec["gflops"] is None else f"{rec['gflops']:.4g}",
            _ratio(rec["speedup"], rec["speedup_low"], rec["speedup_high"]),
            latency,
            tf,
            ft,
            f"{_pct(rec['recall_tf'])} / {_pct(rec['recall_ft'])}",
            f"{_pct(rec['purity_tf'])} / {_pct(rec['purity_ft'])}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_grid(records: Sequence[dict[str, Any]], path: Path, teacher: ResultRow | None = None) -> Path:
    """Top-1 against GFLOPs (left) and against measured speedup (right): one colour per method, hollow
    training-free, filled fine-tuned, the Pareto front as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    names = list(dict.fromkeys(label(r) for r in records))
    cmap = plt.get_cmap("tab20")
    colours = {name: cmap(i % 20) for i, name in enumerate(names)}
    for ax, x, lower, axis_label in (
        (axes[0], "gflops", True, "GFLOPs per image"),
        (axes[1], "speedup", False, "measured speedup over the teacher"),
    ):
        pts = _points(records, x)
        for rec, track, px, py in pts:
            filled = track == "fine-tuned"
            ax.scatter(
                [px],
                [100 * py],
                s=45,
                marker="o",
                edgecolors=[colours[label(rec)]],
                facecolors=[colours[label(rec)]] if filled else "none",
                linewidths=1.5,
            )
        front = pareto_front([(px, py) for _, _, px, py in pts], lower)
        if front:
            ax.plot([pts[i][2] for i in front], [100 * pts[i][3] for i in front], "k--", lw=1, label="Pareto front")
        if teacher is not None and teacher.top1 is not None:
            tx = teacher.gflops if x == "gflops" else 1.0
            ax.plot([tx], [100 * teacher.top1], "k*", markersize=12, label="teacher")
        ax.set(xlabel=axis_label, ylabel="validation top-1 (%)")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker="o", linestyle="none", color=colours[n], label=n) for n in names]
    handles += [
        Line2D([], [], marker="o", linestyle="none", markerfacecolor="none", color="grey", label="training-free"),
        Line2D([], [], marker="o", linestyle="none", color="grey", label="fine-tuned"),
        Line2D([], [], linestyle="--", color="k", label="Pareto front"),
    ]
    axes[1].legend(handles=handles, fontsize=7, ncol=2, loc="lower right")
    fig.suptitle("token reduction: training-free (hollow) and fine-tuned (filled)")
    return save_figure(fig, path)


def write_grid_report(
    rows: Sequence[ResultRow],
    out_dir: str | Path,
    config_path: str | Path,
    swept: Sequence[str] = (),
    environment: dict[str, Any] | None = None,
    variants: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write ``grid.md`` (budgets, table, best method per budget, Pareto fronts), ``grid.csv``, ``grid.json`` and
    ``grid.png`` into ``out_dir``; return their paths under ``grid``, ``grid_csv``, ``grid_json``, ``grid_figure``.
    ``variants``: as :func:`grid_records` takes them."""
    out = Path(out_dir)
    records = grid_records(rows, variants)
    if not records:
        raise ValueError("no grid points to report: rows need a track (training-free or fine-tuned)")
    teacher = next((r for r in rows if r.method == "teacher"), None)
    paths = {
        "grid": out / "grid.md",
        "grid_csv": out / "grid.csv",
        "grid_json": out / "grid.json",
        "grid_figure": out / "grid.png",
    }
    budget_lines = budgets(Path(config_path), swept)
    text = [
        "# Token reduction: training-free and fine-tuned",
        "",
        "## Budgets (every fine-tuned point)",
        *budget_lines,
        "",
        "## Table",
        "ρ is the budget: DynamicViT's keep ratio at the stage blocks; each method is set to the GFLOPs of that "
        "student. Speed is measured per point (fine-tuned where there is one), paired with the teacher. "
        "Top-1 is the mean over seeds with its range; ★: on the Pareto front of top-1 against GFLOPs.",
        "",
        format_grid(records, teacher),
        "",
        "## Best method at each budget",
        *best_at_budgets(records),
        "",
        "## Pareto front",
        f"- top-1 vs GFLOPs: {', '.join(front_labels(records, 'gflops', True)) or '–'}",
        f"- top-1 vs measured speedup: {', '.join(front_labels(records, 'speedup', False)) or '–'}",
        "",
    ]
    # Staged, as write_report's files are: a rerun rewrites them, and one cut short would lose the last.
    write_text(paths["grid"], "\n".join(text))
    columns = list(dict.fromkeys(k for r in records for k in r))
    with staged(paths["grid_csv"]) as staging, staging.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    write_text(
        paths["grid_json"],
        json.dumps({"environment": environment or {}, "budgets": budget_lines, "rows": records}, indent=2) + "\n",
    )
    plot_grid(records, paths["grid_figure"], teacher)
    return paths


__all__ = [
    "best_at_budgets",
    "format_grid",
    "grid_records",
    "label",
    "pareto_front",
    "plot_grid",
    "point_variant",
    "write_grid_report",
]
