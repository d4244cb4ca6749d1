"""Optimiser groups and the per-iteration warm-up + cosine schedule of the DeiT/DynamicViT recipe."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from torch import nn


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    lr_scales: Mapping[str, float] | None = None,
) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, position embedding and class token.

    Args:
        lr_scales: Learning-rate multipliers by parameter-name prefix (first match wins); parameters
            matching none get ``lr``. DynamicViT uses ``{"score_predictor.": 1.0, "": 0.01}``.
    """
    no_decay_names = set(getattr(model, "no_weight_decay", lambda: set())())
    scales = dict(lr_scales or {"": 1.0})
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((s for prefix, s in scales.items() if name.startswith(prefix)), 1.0)
        decay = p.ndim > 1 and name not in no_decay_names and not name.endswith(("pos_embed", "cls_token"))
        groups.setdefault((scale, decay), []).append(p)
    return [
        {"params": ps, "lr": lr * scale, "weight_decay": weight_decay if decay else 0.0}
        for (scale, decay), ps in groups.items()
    ]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier per optimiser step: linear warm-up from ~0, then cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
