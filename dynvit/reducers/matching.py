"""Match reducers to a FLOPs budget: the ToMe ``r`` or EViT/top-k keep rate nearest a target GFLOPs.

FLOPs fall monotonically as a reducer's parameter reduces more (larger r, smaller keep rate), so a
bisection finds the two candidates around the target with a handful of fvcore counts; counts are
cached by token schedule, since parameters with the same schedule cost the same. Ties go to the
candidate that reduces less (smaller r, larger keep rate).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from timm.models.vision_transformer import VisionTransformer

from dynvit.measure import count_flops
from dynvit.models.factory import create_student, create_teacher
from dynvit.reducers import apply_reducer
from dynvit.reducers.tome import max_merges


class Match(NamedTuple):
    """A reducer parameter and the GFLOPs it gives."""

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


def _scheduled_gflops(model: VisionTransformer, method: str, name: str, params: dict) -> Callable[[float], float]:
    """GFLOPs of ``model`` reduced with ``{name: value, **params}``, counted once per token schedule."""
    by_schedule: dict[tuple, float] = {}

    def gflops_of(value: float) -> float:
        apply_reducer(model, method, **{name: value}, **params)
        key = tuple(model.token_schedule())
        if key not in by_schedule:
            by_schedule[key] = count_flops(model)
        return by_schedule[key]

    return gflops_of


def match_tome_r(factory: Callable[[], VisionTransformer], target_gflops: float, **params) -> Match:
    """The ToMe ``r`` (an int from 0 to ``N // 2``) whose GFLOPs is nearest ``target_gflops``.

    Args:
        factory: Builds the backbone (a plain timm ViT), e.g. ``lambda: create_teacher("deit_small_patch16_224")``.
        **params: Other ToMe parameters (``prop_attn``).
    """
    model = factory()
    candidates = list(range(max_merges(model.patch_embed.num_patches) + 1))
    value, gflops = nearest(candidates, _scheduled_gflops(model, "tome", "r", params), target_gflops)
    return Match(int(value), gflops)


def match_keep_rate(
    factory: Callable[[], VisionTransformer], target_gflops: float, method: str = "evit", steps: int = 100, **params
) -> Match:
    """The EViT or top-k keep rate on the grid ``1, 1 - 1/steps, …, 1/steps`` with GFLOPs nearest the target.

    Args:
        factory: Builds the backbone (a plain timm ViT).
        method: ``"evit"`` or ``"topk"``.
        steps: Grid resolution (100: keep rates to two decimals).
        **params: Other parameters of the method (``pruning_loc``).
    """
    if method not in ("evit", "topk"):
        raise ValueError(f"keep-rate matching is for 'evit' or 'topk', got {method!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    candidates = [round(i / steps, 10) for i in range(steps, 0, -1)]
    return nearest(candidates, _scheduled_gflops(factory(), method, "keep_rate", params), target_gflops)


def match_dynamicvit(
    name: str, keep_ratios: Sequence[float] = (0.9, 0.8, 0.7, 0.5), steps: int = 100, **timm_kwargs
) -> list[dict[str, float]]:
    """For each DynamicViT keep ratio on backbone ``name``, its GFLOPs (predictors included) and the
    ToMe r and EViT / top-k keep rates nearest to it, with their GFLOPs: the rows of a report table."""

    def factory() -> VisionTransformer:
        return create_teacher(name, **timm_kwargs)

    rows = []
    for ratio in keep_ratios:
        target = count_flops(create_student(name, keep_ratio=ratio, **timm_kwargs))
        tome = match_tome_r(factory, target)
        evit = match_keep_rate(factory, target, "evit", steps)
        topk = match_keep_rate(factory, target, "topk", steps)
        rows.append(
            dict(
                keep_ratio=ratio,
                dynamicvit_gflops=target,
                tome_r=tome.value,
                tome_gflops=tome.gflops,
                evit_keep_rate=evit.value,
                evit_gflops=evit.gflops,
                topk_keep_rate=topk.value,
                topk_gflops=topk.gflops,
            )
        )
    return rows


__all__ = ["Match", "match_dynamicvit", "match_keep_rate", "match_tome_r", "nearest"]
