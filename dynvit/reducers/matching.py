"""Match any registered method to a FLOPs budget: the value of its knob whose GFLOPs is nearest a target.

One search serves every method: the registry (:mod:`dynvit.methods`) gives the knob's candidates, ordered
from the least reduction to the most, so GFLOPs never rise along them, and a bisection finds the two
around the target with a handful of counts. How one candidate is counted is the method's ``cost``:

- ``"schedule"``: token counts fixed by the parameters; fvcore on one forward, counted once per token
  schedule (parameters with the same schedule cost the same);
- ``"images"``: token counts that depend on the image (ATS); the mean over calibration images, each
  priced at its own counts (:class:`~dynvit.reducers.cost.TokenCost`);
- ``"keep_ratio"``: not searched; the knob is DynamicViT's keep ratio and takes the compared one.

Ties go to the candidate that reduces less. :func:`match_to_student` sets every method to a DynamicViT
student's GFLOPs at each of its keep ratios: the operating points of a comparison.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dynvit import methods
from dynvit.measure.flops import count_flops
from dynvit.methods import Method
from dynvit.models.contract import EarlyExiting
from dynvit.reducers.base import check_reducible
from dynvit.reducers.cost import TokenCost

# The method name that stands for every registered method (``--methods all``).
ALL = "all"


class Match(NamedTuple):
    """A knob value and the GFLOPs it gives."""

    value: float
    gflops: float


def nearest(candidates: Sequence[float], gflops_of: Callable[[float], float], target: float) -> Match:
    """The candidate whose GFLOPs is nearest ``target``, ties to the earlier one.

    Args:
        candidates: Parameter values ordered so their GFLOPs never increase (less reduction first).
        gflops_of: GFLOPs of one candidate; called O(log n) times.
    """
    if not candidates:
        raise ValueError("no candidates to match")

    def first_at_most(value: float, hi: int) -> int:
        """First index in [0, hi] with GFLOPs <= value (hi + 1 if none)."""
        lo, hi = 0, hi + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if gflops_of(candidates[mid]) <= value:
                hi = mid
            else:
                lo = mid + 1
        return lo

    below = first_at_most(target, len(candidates) - 1)
    options = [below] if below < len(candidates) else []
    if below > 0:
        # The last candidate above target heads a run of equal GFLOPs; take the run's first.
        options.append(first_at_most(gflops_of(candidates[below - 1]), below - 1))
    best = min(options, key=lambda i: (abs(gflops_of(candidates[i]) - target), i))
    return Match(candidates[best], gflops_of(candidates[best]))


@torch.no_grad()
def mean_cost(model: nn.Module, images: Iterable[torch.Tensor], cost: TokenCost | None) -> tuple[float, float]:
    """Mean GFLOPs and mean patch tokens in the last block (prefix tokens excluded) per image.

    Each image is costed at its own token counts (``predict_with_counts``), as if run alone; a cascade that exits
    early (DVT) at the cost of the exits it ran, and ``cost`` is not used.
    """
    if isinstance(model, EarlyExiting):
        return model.mean_exit_cost(images)
    device = next(model.parameters()).device
    gflops = tokens = 0.0
    seen = 0
    for x in images:
        _, counts = model.predict_with_counts(x.to(device))
        gflops += cost(counts).sum().item()
        tokens += (counts[:, -1, 1] - model.num_prefix_tokens).sum().item()
        seen += counts.shape[0]
    if seen == 0:
        raise ValueError("no images to measure the mean cost on")
    return gflops / seen, tokens / seen


def match_gflops(
    method: str | Method,
    model: VisionTransformer,
    target: float,
    images: Sequence[torch.Tensor] | None = None,
    cost: TokenCost | None = None,
    steps: int = 100,
    **params: Any,
) -> Match:
    """The knob value of ``method`` whose GFLOPs on ``model`` is nearest ``target``; ``model`` is reduced in place
    (a method that ``wraps`` the ViT, DVT, builds its model around it once, taking ``model`` over).

    Args:
        method: A registered method (or its name) whose ``cost`` is ``"schedule"`` or ``"images"``.
        model: A plain timm ViT (or one this method reduced already), e.g. a copy of the teacher.
        target: GFLOPs to match.
        images: Batches of calibration images, for methods whose cost depends on the image.
        cost: ``TokenCost.from_model`` of this backbone, if already fitted (methods costed on images).
        steps: Resolution of a fractional knob (100: keep rates to two decimals).
        **params: The method's other parameters (``pruning_loc``).
    Raises:
        ValueError: a method that is not matched (``cost="keep_ratio"``), or no calibration images for one
            costed on images.
    """
    method = methods.get(method) if isinstance(method, str) else method
    knob = method.knob
    if method.wraps and methods.of(model) is not method:
        # Its build makes a new model around the ViT (DVT's cascade): built once, then only the knob is searched.
        model = method.build(model, **params)
    candidates = valid_candidates(method, model, steps, **params)
    if method.cost == "schedule":
        by_schedule: dict[tuple, float] = {}

        def gflops_of(value: float) -> float:
            method.apply(model, **{knob.name: value}, **params)
            key = tuple(model.token_schedule())
            if key not in by_schedule:
                by_schedule[key] = count_flops(model)
            return by_schedule[key]

    elif method.cost == "images":
        if not images:
            raise ValueError(f"matching {method.name}'s mean GFLOPs needs calibration images (a validation loader)")
        if cost is None and not isinstance(model, EarlyExiting):
            cost = TokenCost.from_model(model)
        means: dict[float, float] = {}

        def gflops_of(value: float) -> float:
            if value not in means:
                method.apply(model, **{knob.name: value}, **params)
                means[value] = mean_cost(model, images, cost)[0]
            return means[value]

    else:
        raise ValueError(
            f"{method.name} is not matched to a GFLOPs target: its {knob.name} is DynamicViT's keep ratio, "
            "set to the compared one"
        )
    return nearest(candidates, gflops_of, target)


def valid_candidates(method: str | Method, model: nn.Module, steps: int = 100, **params: Any) -> list[float]:
    """The knob's candidates (:meth:`~dynvit.methods.Knob.candidates`) that ``model`` accepts: those before the
    first that leaves no token at some stage (DynamicViT's ``int(N · ρ^s)``), found by bisection, since every
    later candidate reduces more. ``model`` is left set to one of them.

    Raises:
        ValueError: not even the least reduction fits (its own error says why).
    """
    method = methods.get(method) if isinstance(method, str) else method
    candidates = method.knob.candidates(model, steps)

    def accepted(value: float) -> bool:
        try:
            method.apply(model, **{method.knob.name: value}, **params)
        except ValueError:
            return False
        return True

    lo, hi = 0, len(candidates)
    while lo < hi:
        mid = (lo + hi) // 2
        if accepted(candidates[mid]):
            lo = mid + 1
        else:
            hi = mid
    if lo == 0:  # not even the least reduction fits: its own error says why
        method.apply(model, **{method.knob.name: candidates[0]}, **params)
    return candidates[:lo]


@dataclass
class Matched:
    """One method set up to cost what the student costs at one keep ratio.

    Attributes:
        method: A registered method's name.
        keep_ratio: The student's keep ratio ρ it is matched to.
        target: The student's GFLOPs at ρ.
        gflops: The method's GFLOPs as matched (for a method costed on images the mean over the calibration images).
        params: What the method's builder gets (empty for the student itself).
        student: Whether this is the trained student itself, measured as it is; every other method runs on
            the teacher's weights (a learned one with its new modules at init).
    """

    method: str
    keep_ratio: float
    target: float
    gflops: float
    params: dict[str, Any] = field(default_factory=dict)
    student: bool = False

    @property
    def value(self) -> float:
        """The matched knob's value (ρ itself for the student)."""
        return self.params.get(methods.get(self.method).knob.name, self.keep_ratio)

    @property
    def label(self) -> str:
        """``r=3``, ``keep_rate=0.62``, ``K=20``, …: the setting as the table shows it."""
        return methods.get(self.method).knob.label(self.value)

    @property
    def row_label(self) -> str:
        """How the method's rows are named: the student's record label, a training-free method's label
        (``evit (training-free)`` where its paper fine-tunes), or a learned one's at init."""
        method = methods.get(self.method)
        return method.at_init_label if method.learned and not self.student else method.label


def student_method(student: nn.Module) -> Method:
    """The registered learned method of a student (:func:`dynvit.methods.controlling`: DynamicViT's for a
    hierarchical student); DynamicViT's for a model no method controls, whose missing knob
    :func:`student_at` then names."""
    return methods.controlling(student) or methods.get("dynamicvit")


def student_at(student: nn.Module) -> Callable[[float], nn.Module]:
    """Sets the student's knob (its keep ratio) and returns the student.

    Raises:
        TypeError: ``student`` is no student whose knob can be set (a plain ViT, a reducer).
    """
    method = student_method(student)
    if not method.learned and methods.controlling(student) is method:
        raise TypeError(
            f"{type(student).__name__} is a {method.name} model, not a learned student: `benchmark` varies a "
            f"learned student's knob and matches every method to it. A fine-tuned {method.name} "
            "(dynvit.lightning.MethodFineTuning) is timed against its teacher by its own fit (throughput/speedup "
            "in its run's metrics) and in the grid `cli.py sweep` writes"
        )
    if method.cost == "images":
        # Its knob is a threshold on each image's confidence, not a share of tokens: "no threshold to vary"
        # (what the check below said of a trained DVT, whose thresholds are set) sent users looking for one.
        raise TypeError(
            f"{type(student).__name__} is a trained {method.name} model, whose cost differs per image: `benchmark` "
            "varies a keep-ratio student and matches every method to it. Measure the trained cascade at its "
            "thresholds with DVT.mean_exit_cost and DVT.leaving_shares (benchmarks/dvt_digits.py does so on the "
            f"digits), or give a keep-ratio student's checkpoint with --methods {method.name} to build one from its "
            "teacher"
        )
    if not method.learned or getattr(student, method.knob.name, None) is None:
        raise TypeError(
            f"{type(student).__name__} has no {method.knob.name} to vary: the comparison needs a trained student "
            "(e.g. DynamicViTModule's net)"
        )

    def at(value: float) -> nn.Module:
        return method.apply(student, **{method.knob.name: value})

    return at


def stage_blocks_of(student: nn.Module) -> tuple[int, ...]:
    """The blocks a student reduces before: where the methods compared with it reduce too.

    Raises:
        TypeError: the student names no stage blocks.
    """
    loc = getattr(student, "pruning_loc", None)
    if loc is None:
        raise TypeError(f"{type(student).__name__} has no pruning_loc: the comparison reduces in its stage blocks")
    return tuple(loc)


def check_methods(names: Sequence[str] | str) -> list[str]:
    """The method names as a list; ``ValueError`` for none, an unknown one (with a suggestion) or a repeat.

    ``"all"`` (or ``["all"]``) is every registered method, in registration order.
    """
    names = [names] if isinstance(names, str) else list(names)
    if names == [ALL]:
        return list(methods.registered())
    if not names:
        raise ValueError(
            f"no methods given: pass e.g. --methods [dynamicvit,tome] or --methods all; choose from "
            f"{list(methods.registered())}"
        )
    for name in names:  # an unknown name lists the registered ones
        methods.get(name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"methods {repeated} are listed more than once")
    return names


def on_teacher(student: nn.Module, names: Sequence[str]) -> list[str]:
    """The methods of ``names`` that run on copies of the teacher: all but the student's own (training-free
    methods on its weights as they are, other learned methods with their new modules at init)."""
    own = student_method(student).name
    return [name for name in names if name != own]


def check_comparable(student: nn.Module, teacher: nn.Module | None, names: Sequence[str]) -> None:
    """Raise unless ``names`` can be compared on this student and teacher, before anything is measured.

    Raises:
        TypeError: the student has no keep ratio and stage blocks, or a method cannot take the teacher over.
        ValueError: a method other than the student's is asked for and there is no teacher.
    """
    student_at(student)
    stage_blocks_of(student)
    free = on_teacher(student, names)
    if not free:
        return
    if teacher is None:
        raise ValueError(
            f"{free} run on the teacher's weights, and this model has no teacher: use a DynamicViTModule "
            "config with model.init_args.teacher_checkpoint set"
        )
    for name in free:
        try:
            check_reducible(teacher, name)
        except TypeError as e:
            raise TypeError(f"{[name]} cannot run on this teacher: {e}") from None


def match_to_student(
    student: nn.Module,
    teacher: VisionTransformer | None,
    ratios: Sequence[float],
    names: Sequence[str],
    images: Sequence[torch.Tensor] | None = None,
    steps: int = 100,
    cost: TokenCost | None = None,
) -> list[Matched]:
    """Every method set to each of the student's keep ratios' GFLOPs, ratio by ratio in the order given.

    The student's own method is the student, measured as it is; every other method runs on a copy of the
    teacher (a learned one with its new modules at init), at the student's stage blocks where it has
    locations, matched by its registry ``cost``.

    Args:
        student: The trained student (its keep ratio is restored afterwards).
        teacher: The plain ViT the other methods run on; it is copied, never changed.
        ratios: Keep ratios in (0, 1].
        names: Registered method names, or ``"all"``.
        images: Calibration images for methods costed on images (batches on the teacher's device).
        steps: Resolution of fractional knobs (100: two decimals).
        cost: ``TokenCost.from_model(teacher)``, if already fitted.
    """
    names = check_methods(names)
    check_comparable(student, teacher, names)
    own = student_method(student).name
    records = [methods.get(name) for name in names]
    imaged = [m.name for m in records if m.cost == "images" and m.name != own]
    if imaged and not images:
        raise ValueError(f"matching {imaged}'s mean GFLOPs needs calibration images (a validation loader)")
    at = student_at(student)
    original = getattr(student, student_method(student).knob.name)
    stages = stage_blocks_of(student)
    if cost is None and imaged:
        cost = TokenCost.from_model(teacher)
    matched = []
    try:
        for ratio in ratios:
            target = count_flops(at(ratio))
            for method in records:
                if method.name == own:
                    matched.append(Matched(method.name, ratio, target, target, student=True))
                    continue
                params = method.stage_params(stages, len(teacher.blocks))
                if method.cost == "keep_ratio":
                    model = method.apply(copy.deepcopy(teacher), **{method.knob.name: ratio}, **params)
                    match = Match(ratio, count_flops(model))
                else:
                    match = match_gflops(method, copy.deepcopy(teacher), target, images, cost, steps, **params)
                params[method.knob.name] = match.value
                matched.append(Matched(method.name, ratio, target, match.gflops, params))
    finally:
        at(original)
    return matched


def matched_records(matched: Sequence[Matched]) -> list[dict[str, Any]]:
    """One record per keep ratio: the student's GFLOPs (``dynamicvit_gflops``, named for its method), then each
    other method's setting and GFLOPs (``tome_r``, ``tome_gflops``, ``evit_keep_rate``, …): the rows of a
    report table."""
    learned = next((m.method for m in matched if m.student), "student")
    by_ratio: dict[float, dict[str, Any]] = {}
    for m in matched:
        record = by_ratio.setdefault(m.keep_ratio, {"keep_ratio": m.keep_ratio, f"{learned}_gflops": m.target})
        if not m.student:
            record[f"{m.method}_{methods.get(m.method).knob.name}"] = m.value
            record[f"{m.method}_gflops"] = m.gflops
    return list(by_ratio.values())


__all__ = [
    "ALL",
    "Match",
    "Matched",
    "check_comparable",
    "check_methods",
    "match_gflops",
    "match_to_student",
    "matched_records",
    "mean_cost",
    "nearest",
    "on_teacher",
    "stage_blocks_of",
    "student_at",
    "student_method",
    "valid_candidates",
]
