"""DynamicViT against the other token-reduction methods, at DynamicViT's own operating points.

For every DynamicViT keep ratio ρ the student is measured as it is, and every other method runs on
the *teacher's* weights (the ViT DynamicViT was distilled from), set to cost what DynamicViT costs
at ρ (fvcore GFLOPs, predictors included):

============  ====================================================================================
``tome``      the merges per block ``r`` with the nearest GFLOPs (:func:`~dynvit.reducers.matching.match_tome_r`)
``evit``      the keep rate with the nearest GFLOPs, reducing in DynamicViT's stage blocks. EViT is
              fine-tuned in its paper; here it is evaluated training-free, and its rows say so
``topk``      as ``evit``, without the fused token
``ats``       the K whose *mean* GFLOPs over calibration images is nearest: ATS keeps a different
              number of tokens per image, so its rows report the mean GFLOPs and tokens it actually
              used on the validation images; samplers in every block from DynamicViT's first stage on
``random``    DynamicViT's own token counts at ρ, in the same blocks, tokens drawn at random
============  ====================================================================================

All of them are training-free: the teacher's weights are used as they are.
"""

from __future__ import annotations

import copy
import difflib
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dynvit.measure.flops import count_flops
from dynvit.models.dynamic_vit import keep_counts
from dynvit.reducers import REDUCERS, ReducedViT, TokenCost, apply_reducer
from dynvit.reducers.base import check_reducible
from dynvit.reducers.matching import Match, match_keep_rate, match_tome_r, nearest
from dynvit.run.benchmark import SpeedSettings, check_ratios, dynamicvit_at, measure_point, time_in_rounds
from dynvit.run.report import ResultRow

METHODS: tuple[str, ...] = ("dynamicvit", *REDUCERS)
# How a method's rows are labelled where that differs from its name.
LABELS: dict[str, str] = {"evit": "evit (training-free)"}
# The parameter each reducer is matched on.
PARAMETERS: dict[str, str] = {
    "dynamicvit": "keep_ratio",
    "tome": "r",
    "evit": "keep_rate",
    "topk": "keep_rate",
    "ats": "max_tokens",
    "random": "keep_ratio",
}


def check_methods(methods: Sequence[str]) -> list[str]:
    """The method names as a list; ``ValueError`` for none, an unknown one (with a suggestion) or a repeat."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    if not methods:
        raise ValueError(f"no methods given: pass e.g. --methods [dynamicvit,tome]; choose from {list(METHODS)}")
    for method in methods:
        if method not in METHODS:
            close = difflib.get_close_matches(str(method), METHODS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown method {method!r}: choose from {list(METHODS)}{hint}")
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise ValueError(f"methods {repeated} are listed more than once")
    return methods


def check_comparable(student: nn.Module, teacher: nn.Module | None, methods: Sequence[str]) -> None:
    """Raise unless ``methods`` can be compared on this student and teacher, before anything is measured.

    Raises:
        TypeError: the student has no keep ratio and stage blocks, or a reducer cannot take the teacher over.
        ValueError: a method other than DynamicViT is asked for and there is no teacher.
    """
    dynamicvit_at(student)  # raises TypeError for a model without a keep ratio
    if not hasattr(student, "pruning_loc"):
        raise TypeError(f"{type(student).__name__} has no pruning_loc: the comparison reduces in its stage blocks")
    reducers = [m for m in methods if m != "dynamicvit"]
    if not reducers:
        return
    if teacher is None:
        raise ValueError(
            f"{reducers} run on the teacher's weights, and this model has no teacher: use a DynamicViTModule "
            "config with model.init_args.teacher_checkpoint set"
        )
    for method in reducers:
        try:
            check_reducible(teacher, REDUCERS[method])
        except TypeError as e:
            raise TypeError(f"{[method]} cannot run on this teacher: {e}") from None


@dataclass
class Matched:
    """One method set up to cost what DynamicViT costs at one keep ratio.

    Attributes:
        method: A key of :data:`METHODS`.
        keep_ratio: The DynamicViT keep ratio ρ it is matched to.
        target: DynamicViT's GFLOPs at ρ.
        gflops: The method's GFLOPs as matched (for ATS the mean over the calibration images).
        params: What :func:`~dynvit.reducers.apply_reducer` gets (empty for DynamicViT).
    """

    method: str
    keep_ratio: float
    target: float
    gflops: float
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float:
        """The matched parameter's value (ρ itself for DynamicViT)."""
        return self.params.get(PARAMETERS[self.method], self.keep_ratio)

    @property
    def label(self) -> str:
        """``r=3``, ``keep_rate=0.62``, ``K=20``, …: the setting as the table shows it."""
        name = "K" if self.method == "ats" else PARAMETERS[self.method]
        return f"{name}={self.value:g}"


@torch.no_grad()
def mean_cost(model: ReducedViT, images: Iterable[torch.Tensor], cost: TokenCost) -> tuple[float, float]:
    """Mean GFLOPs and mean patch tokens in the last block (class token excluded) per image.

    Each image is costed at its own token counts (``predict_with_counts``), as if run alone.
    """
    device = next(model.parameters()).device
    gflops = tokens = 0.0
    seen = 0
    for x in images:
        _, counts = model.predict_with_counts(x.to(device))
        gflops += cost(counts).sum().item()
        tokens += (counts[:, -1, 1] - model.num_prefix_tokens).sum().item()
        seen += counts.shape[0]
    if seen == 0:
        raise ValueError("no images to measure ATS's mean cost on")
    return gflops / seen, tokens / seen


def ats_loc(student: nn.Module, depth: int) -> tuple[int, ...]:
    """ATS's sampler blocks: every block from DynamicViT's first stage block on (as in the ATS paper)."""
    return tuple(range(student.pruning_loc[0], depth))


def match_ats(
    model: VisionTransformer,
    target: float,
    images: Sequence[torch.Tensor],
    pruning_loc: Sequence[int],
    cost: TokenCost | None = None,
) -> Match:
    """The ATS K (1 to N) whose mean GFLOPs over ``images`` is nearest ``target``; ``model`` is reduced in place.

    A bisection over K (mean cost grows with K), one pass over the images per K tried.

    Args:
        cost: ``TokenCost.from_model`` of this backbone, if already fitted.
    """
    loc = tuple(pruning_loc)
    model = apply_reducer(model, "ats", max_tokens=model.patch_embed.num_patches, pruning_loc=loc)
    cost = TokenCost.from_model(model) if cost is None else cost
    means: dict[int, float] = {}

    def gflops_of(k: float) -> float:
        if k not in means:
            apply_reducer(model, "ats", max_tokens=int(k), pruning_loc=loc)
            means[int(k)] = mean_cost(model, images, cost)[0]
        return means[int(k)]

    value, gflops = nearest(list(range(model.num_patches, 0, -1)), gflops_of, target)
    return Match(int(value), gflops)


def match_methods(
    student: nn.Module,
    teacher: VisionTransformer,
    ratios: Sequence[float],
    methods: Sequence[str],
    images: Sequence[torch.Tensor] | None = None,
    steps: int = 100,
    cost: TokenCost | None = None,
) -> list[Matched]:
    """Every method set to each DynamicViT keep ratio's GFLOPs, ratio by ratio in the order given.

    Args:
        student: The DynamicViT student (its ``keep_ratio`` is restored afterwards).
        teacher: The plain ViT the reducers run on; it is copied, never changed.
        ratios: DynamicViT keep ratios in (0, 1].
        methods: Keys of :data:`METHODS`.
        images: Calibration images for ATS (batches of images on the teacher's device).
        steps: Resolution of the EViT / top-k keep-rate grid (100: two decimals).
        cost: ``TokenCost.from_model(teacher)``, if already fitted (ATS costs images with it).
    """
    ratios, methods = check_ratios(ratios), check_methods(methods)
    check_comparable(student, teacher, methods)
    if "ats" in methods and not images:
        raise ValueError("matching ATS's mean GFLOPs needs calibration images (a validation loader)")
    loc, at = tuple(student.pruning_loc), dynamicvit_at(student)
    original = student.keep_ratio
    if "ats" in methods and cost is None:
        cost = TokenCost.from_model(teacher)

    def factory() -> VisionTransformer:
        return copy.deepcopy(teacher)

    matched = []
    try:
        for ratio in ratios:
            target = count_flops(at(ratio))
            for method in methods:
                params: dict[str, Any] = {}
                if method == "dynamicvit":
                    match = Match(ratio, target)
                elif method == "tome":
                    match = match_tome_r(factory, target)
                elif method in ("evit", "topk"):
                    params = {"pruning_loc": loc}
                    match = match_keep_rate(factory, target, method, steps, **params)
                elif method == "ats":
                    params = {"pruning_loc": ats_loc(student, len(teacher.blocks))}
                    match = match_ats(factory(), target, images, params["pruning_loc"], cost)
                else:  # random: DynamicViT's counts, so its cost is DynamicViT's less the predictors
                    params = {"pruning_loc": loc}
                    match = Match(ratio, count_flops(apply_reducer(factory(), method, keep_ratio=ratio, **params)))
                if method != "dynamicvit":
                    params[PARAMETERS[method]] = match.value
                matched.append(Matched(method, ratio, target, match.gflops, params))
    finally:
        at(original)
    return matched


def first_images(loader: Iterable, count: int) -> list[torch.Tensor]:
    """The first ``count`` images of a loader of ``(x, y, ...)`` batches, as batches (the last one cut)."""
    batches, seen = [], 0
    for x, *_ in loader:
        if seen >= count:
            break
        batches.append(x[: count - seen])
        seen += batches[-1].shape[0]
    return batches


def student_label(student: nn.Module) -> str:
    """The name a student's rows carry: ``dynamicvit`` for :class:`~dynvit.models.DynamicViT`."""
    return getattr(student, "method", type(student).__name__.lower())


def final_tokens(model: nn.Module) -> float | None:
    """Patch tokens in the last block's MLP (prefix tokens excluded) where that does not depend on the image."""
    if isinstance(model, ReducedViT):
        schedule = model.token_schedule()
        return None if schedule is None else float(schedule[-1][1] - model.num_prefix_tokens)
    if hasattr(model, "keep_ratio") and hasattr(model, "pruning_loc"):
        return float(keep_counts(model.num_patches, model.keep_ratio, len(model.pruning_loc))[-1])
    return float(model.patch_embed.num_patches)


def compare(
    student: nn.Module,
    teacher: VisionTransformer | None,
    ratios: Sequence[float],
    methods: Sequence[str] = METHODS,
    loader: Iterable | None = None,
    settings: SpeedSettings | None = None,
    calibration: Sequence[torch.Tensor] | None = None,
    steps: int = 100,
) -> tuple[list[ResultRow], list[Matched]]:
    """The teacher row, then for each keep ratio (highest first) one row per method, in the order given.

    Each row carries the method's setting (``param``), its GFLOPs (ATS: the mean it used on the
    validation images, or on the calibration images without a loader), parameters, images/s,
    speedup over the teacher, tokens left in the last block, and, with a loader, top-1 and kept-token
    recall per stage (methods that keep a subset of the patches; ToMe merges them, so it has none).

    Args:
        student: The DynamicViT student; its weights are measured as they are.
        teacher: The unpruned ViT; the other methods run on copies of it.
        ratios: DynamicViT keep ratios in (0, 1].
        methods: Keys of :data:`METHODS`, in the order the rows take.
        loader: Validation batches ``(x, y[, patch_mask])`` for top-1 and recall.
        settings: Device, dtype, batch size and repeats of the measurement.
        calibration: Image batches ATS's K is matched on; needed when ``ats`` is compared.
        steps: Resolution of the EViT / top-k keep-rate grid.
    Returns:
        The rows, and the settings each method was matched to.
    """
    ratios, methods = sorted(check_ratios(ratios), reverse=True), check_methods(methods)
    check_comparable(student, teacher, methods)
    if "ats" in methods and not calibration:
        raise ValueError("matching ATS's mean GFLOPs needs calibration images (a validation loader)")
    settings = settings or SpeedSettings()
    device = torch.device(settings.device)
    for net in (student, teacher):
        if net is not None:
            net.to(device)
    images = [x.to(device) for x in calibration] if calibration is not None else None
    # One fit of the per-block cost polynomials serves ATS's matching and its rows.
    cost = TokenCost.from_model(teacher) if "ats" in methods and teacher is not None else None
    matched = match_methods(student, teacher, ratios, methods, images, steps, cost)

    rows: list[ResultRow] = []
    models: list[Callable[[], nn.Module]] = []  # each row's model, set up again for the later timing rounds
    if teacher is not None:
        row = measure_point(teacher, "teacher", 1.0, settings, loader)
        row.tokens = final_tokens(teacher)
        rows.append(row)
        models.append(lambda: teacher)
    at, original = dynamicvit_at(student), student.keep_ratio
    reduced: dict[str, ReducedViT] = {}  # one copy of the teacher per method, reconfigured per ratio
    try:
        for m in matched:
            if m.method == "dynamicvit":
                model_of = functools.partial(at, m.keep_ratio)
            else:
                if m.method not in reduced:
                    reduced[m.method] = copy.deepcopy(teacher)
                model_of = functools.partial(apply_reducer, reduced[m.method], m.method, **m.params)
            model = model_of()
            label = student_label(student) if m.method == "dynamicvit" else LABELS.get(m.method, m.method)
            row = measure_point(model, label, m.keep_ratio, settings, loader)
            row.param = m.label if m.method != "dynamicvit" else None
            row.tokens = final_tokens(model)
            if m.method == "ats":
                # fvcore counted one random image; ATS's cost is what the real images made it keep.
                on = (batch[0] for batch in loader) if loader is not None else images
                row.gflops, row.tokens = mean_cost(model, on, cost)
            rows.append(row)
            models.append(model_of)
        time_in_rounds(rows, models, settings)
    finally:
        at(original)
    return rows, matched


def matched_records(matched: Sequence[Matched]) -> list[dict[str, Any]]:
    """One record per keep ratio: DynamicViT's GFLOPs, then each method's setting and GFLOPs
    (``tome_r``, ``tome_gflops``, ``evit_keep_rate``, …), as :func:`~dynvit.reducers.matching.match_dynamicvit` lists them."""
    by_ratio: dict[float, dict[str, Any]] = {}
    for m in matched:
        record = by_ratio.setdefault(m.keep_ratio, {"keep_ratio": m.keep_ratio, "dynamicvit_gflops": m.target})
        if m.method != "dynamicvit":
            record[f"{m.method}_{PARAMETERS[m.method]}"] = m.value
            record[f"{m.method}_gflops"] = m.gflops
    return list(by_ratio.values())


def sweep_matches(
    student: nn.Module, teacher: nn.Module | None, ratios: Sequence[float], methods: Sequence[str] = ("tome", "evit")
) -> list[dict[str, Any]] | None:
    """For a sweep's keep ratios, :func:`matched_records` of those ``methods`` that can run on the teacher
    (EViT needs a class token); None where none can (no teacher, or not a plain timm ViT). Matching needs
    only the architecture, not trained weights."""
    runnable = []
    for method in methods:
        try:
            check_comparable(student, teacher, [method])
            runnable.append(method)
        except (TypeError, ValueError):
            continue
    if not runnable:
        return None
    methods = runnable
    ratios = sorted(set(check_ratios(ratios)), reverse=True)
    return matched_records(match_methods(student, teacher, ratios, ["dynamicvit", *methods]))


__all__ = [
    "LABELS",
    "METHODS",
    "Matched",
    "ats_loc",
    "check_comparable",
    "check_methods",
    "compare",
    "final_tokens",
    "first_images",
    "match_ats",
    "match_methods",
    "matched_records",
    "mean_cost",
    "student_label",
    "sweep_matches",
]
