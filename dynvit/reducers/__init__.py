"""Other token-reduction methods on the same timm backbones, to compare DynamicViT against.

Each method turns a trained timm ``VisionTransformer`` into a reduced one in place
(:func:`apply_reducer`), or builds one by name (:func:`create_reduced`). Reduced models return
logits in train and eval mode, work with ``count_flops`` and ``measure_throughput``, report their
real token counts (``predict_with_counts``), and the selection methods give kept-token masks
(``predict_with_masks``) like ``DynamicViT``.

============  ==================================================================  ===============
name          what it does                                                        parameters
============  ==================================================================  ===============
``tome``      merge the r most similar tokens in every block (ToMe)               ``r``, ``prop_attn``
``evit``      keep the most class-attended tokens, fuse the rest into one (EViT)  ``keep_rate``, ``pruning_loc``, ``fusion``
``topk``      EViT's selection without the fused token                            ``keep_rate``, ``pruning_loc``
``ats``       sample up to K tokens by class attention × value norm (ATS)         ``max_tokens``, ``pruning_loc``
``random``    uniformly random tokens in DynamicViT's counts (the floor)          ``keep_ratio``, ``pruning_loc``, ``seed``
============  ==================================================================  ===============

EViT and ATS follow their authors' code (docs/reference.md, "Fidelity").
"""

from __future__ import annotations

import difflib
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

from dynvit.models.factory import create_teacher
from dynvit.reducers.ats import ATSViT
from dynvit.reducers.base import ReducedViT, SelectionViT
from dynvit.reducers.cost import TokenCost, realised_gflops
from dynvit.reducers.evit import EViT, TopKViT
from dynvit.reducers.random_keep import RandomKeepViT
from dynvit.reducers.tome import ToMeViT

REDUCERS: dict[str, type[ReducedViT]] = {cls.method: cls for cls in (ToMeViT, EViT, TopKViT, ATSViT, RandomKeepViT)}


def _reducer(method: str) -> type[ReducedViT]:
    if method not in REDUCERS:
        close = difflib.get_close_matches(str(method), REDUCERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown token-reduction method {method!r}: choose one of {sorted(REDUCERS)}{hint}")
    return REDUCERS[method]


def apply_reducer(model: VisionTransformer, method: str, **params) -> ReducedViT:
    """Turn a timm ``VisionTransformer`` (or distilled DeiT) into a reduced model in place and return it.

    ``tome`` and ``random`` take any head DynamicViT takes (class token, average or attention pooling,
    registers, distillation token); ``evit``, ``topk`` and ``ats`` rank tokens by the class token's
    attention and refuse a ViT without one.

    Weights are kept (no reducer adds parameters). A model reduced here may be reduced again with
    other parameters or another method.

    Args:
        model: A plain timm ViT, e.g. from :func:`dynvit.create_teacher`.
        method: A key of :data:`REDUCERS`.
        **params: The method's parameters (see each class's ``configure``).
    Raises:
        ValueError: unknown method, or a parameter out of range for this model.
        TypeError: the model cannot be reduced, or a parameter name is unknown.
    """
    return _reducer(method).from_vit(model, **params)


def create_reduced(
    name: str,
    method: str,
    num_classes: int = 1000,
    img_size: int | None = None,
    checkpoint: str | Path | None = None,
    params: dict | None = None,
    **timm_kwargs,
) -> ReducedViT:
    """The timm ViT ``name`` reduced with ``method``, optionally loaded from ``checkpoint`` first.

    Args:
        params: The method's parameters, e.g. ``{"r": 13}`` for ToMe.
        Other arguments as :func:`dynvit.create_teacher` (``img_size=None`` builds the model at its own
            resolution; ``timm_kwargs`` go to ``timm.create_model``).
    """
    _reducer(method)  # an unknown method fails before a model is built
    model = create_teacher(name, num_classes=num_classes, img_size=img_size, checkpoint=checkpoint, **timm_kwargs)
    return apply_reducer(model, method, **(params or {}))


__all__ = [
    "REDUCERS",
    "ATSViT",
    "EViT",
    "RandomKeepViT",
    "ReducedViT",
    "SelectionViT",
    "ToMeViT",
    "TokenCost",
    "TopKViT",
    "apply_reducer",
    "create_reduced",
    "realised_gflops",
]
