"""FLOPs with fvcore, counting fused attention too."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from math import prod
from typing import Any

import torch
from torch import nn

from dynvit.measure.throughput import check_measurable, keep_rng
from dynvit.models.dynamic_vit import input_size


def _sdpa_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """``F.scaled_dot_product_attention``: the two matrix products q·kᵀ and attn·v (one FLOP per MAC,
    fvcore's convention), which fvcore would otherwise skip as an unsupported op."""
    q, k, v = (inp.type().sizes() for inp in inputs[:3])
    batch_heads = prod(q[:-2])
    return batch_heads * q[-2] * k[-2] * (q[-1] + v[-1])


def count_flops(model: nn.Module, img_size: int | Sequence[int] | None = None) -> float:
    """GFLOPs of one image through ``model`` in eval mode (a pruned student prunes), via fvcore.

    Attention's two matrix products are counted whether timm runs them fused or not, so the result
    matches fvcore on the reference (unfused) DeiT code: 4.61 for DeiT-S at 224.

    Args:
        img_size: Input resolution; by default the model's own.
    """
    in_chans, *own_size = input_size(model)
    size = own_size if img_size is None else img_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    device, dtype = check_measurable(model), next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    try:
        with keep_rng(device):
            x = torch.randn(1, in_chans, *size, device=device, dtype=dtype)
            return count_module_flops(model, x) / 1e9
    finally:
        model.train(was_training)


def count_module_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """fvcore FLOPs of ``module(*inputs)`` as they run (no mode change), fused attention included."""
    # fvcore scripts and traces with torch.jit, which recent torch flags as deprecated on every call.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(module, inputs)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flops)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return analysis.total()


def count_params(model: nn.Module) -> float:
    """Parameters in millions."""
    return sum(p.numel() for p in model.parameters()) / 1e6
