"""Other token-reduction methods on the same timm backbones, to compare DynamicViT against.

Each method turns a trained timm ``VisionTransformer`` into a reduced one in place
(:func:`apply_reducer`), or builds one by name (:func:`create_reduced`). Reduced models return
logits in train and eval mode, work with ``count_flops`` and ``measure_throughput``, report their
real token counts (``predict_with_counts``) and kept-token masks (``predict_with_masks``) like
``DynamicViT``; mergers also report what each token stands for (``predict_with_sources``).

Every method registers itself beside its code (:mod:`dynvit.methods`); ``dynvit.methods.registered()``
lists them, with their parameters, cost knob and what they report (README's table of methods is
checked against it). EViT and ATS follow their authors' code (docs/reference.md, "Fidelity").
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dynvit import methods
from dynvit.models.factory import create_teacher
from dynvit.reducers.atc import ATCViT
from dynvit.reducers.ats import ATSViT
from dynvit.reducers.base import MergingViT, ReducedViT, SelectionViT, TokenState
from dynvit.reducers.cost import TokenCost, realised_gflops
from dynvit.reducers.diffrate import DiffRateViT
from dynvit.reducers.dpcknn import DPCKNNViT
from dynvit.reducers.dtem import DTEMViT
from dynvit.reducers.evit import EViT, TopKViT
from dynvit.reducers.kmedoids import KMedoidsViT
from dynvit.reducers.mctf import MCTFViT
from dynvit.reducers.patchmerger import PatchMergerViT
from dynvit.reducers.pitome import PiToMeViT
from dynvit.reducers.random_keep import RandomKeepViT
from dynvit.reducers.sinkhorn import SinkhornViT
from dynvit.reducers.sit import SiTViT
from dynvit.reducers.tofu import ToFuViT
from dynvit.reducers.tome import ToMeViT

# Every module of this package registers its methods when imported, so a new method is one file here and
# nothing else: those imported above keep their registration order (README's table), any other follows.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def apply_reducer(model: VisionTransformer, method: str, **params) -> nn.Module:
    """Turn a timm ``VisionTransformer`` (or distilled DeiT) into a model of the registered ``method`` in
    place, and return it.

    ``tome`` and ``random`` take any head DynamicViT takes (class token, average or attention pooling,
    registers, distillation token); ``evit``, ``topk`` and ``ats`` rank tokens by the class token's
    attention and refuse a ViT without one.

    Weights are kept (no training-free method adds parameters). A model reduced here may be reduced
    again with other parameters or another method.

    Args:
        model: A plain timm ViT, e.g. from :func:`dynvit.create_teacher`.
        method: A registered method's name (``dynvit.methods.registered()``).
        **params: The method's parameters (see each class's ``configure``).
    Raises:
        ValueError: unknown method (the message lists the registered ones), or a parameter out of range
            for this model.
        TypeError: the model cannot be reduced, or a parameter name is unknown.
    """
    return methods.get(method).build(model, **params)


def create_reduced(
    name: str,
    method: str,
    num_classes: int = 1000,
    img_size: int | None = None,
    checkpoint: str | Path | None = None,
    params: dict | None = None,
    **timm_kwargs,
) -> nn.Module:
    """The timm ViT ``name`` reduced with ``method``, optionally loaded from ``checkpoint`` first.

    Args:
        params: The method's parameters, e.g. ``{"r": 13}`` for ToMe.
        Other arguments as :func:`dynvit.create_teacher` (``img_size=None`` builds the model at its own
            resolution; ``timm_kwargs`` go to ``timm.create_model``).
    """
    methods.get(method)  # an unknown method fails before a model is built
    model = create_teacher(name, num_classes=num_classes, img_size=img_size, checkpoint=checkpoint, **timm_kwargs)
    return apply_reducer(model, method, **(params or {}))


__all__ = [
    "ATCViT",
    "DTEMViT",
    "MCTFViT",
    "DPCKNNViT",
    "DiffRateViT",
    "KMedoidsViT",
    "PatchMergerViT",
    "PiToMeViT",
    "SiTViT",
    "SinkhornViT",
    "ToFuViT",
    "ATSViT",
    "EViT",
    "MergingViT",
    "RandomKeepViT",
    "ReducedViT",
    "SelectionViT",
    "ToMeViT",
    "TokenCost",
    "TokenState",
    "TopKViT",
    "apply_reducer",
    "create_reduced",
    "realised_gflops",
]
