"""PatchMerger (Renggli et al., "Learning to Merge Tokens in Vision Transformers", 2022) as TokenReduction
runs it (``JoakimHaurum/TokenReduction``, ``models/patchmerger.py``).

Before each block of ``reduction_loc`` the patch tokens x (B, N_s, C) are layer-normed and merged into
K_s tokens by K_s learned queries Q (K_s, C): ``W = softmax(Q · LN(x)ᵀ)`` over the tokens, unscaled
(the reference's ``scaled_attention`` is off), and the new tokens are ``W · LN(x)`` — the *normed* tokens,
so the residual stream continues from layer-normed values. The class token passes unchanged.

The blocks run timm's unfused attention by default. The merger's scores are unscaled products of
standard-normal queries and layer-normed tokens, with a spread of about √C (20 for DeiT-S), so its
softmax magnifies rounding in the tokens about as much: with timm's fused kernel the logits differed
from the reference's by up to 1.2e-5 of the largest logit on DeiT-S, unfused by nothing (with head_dim
64 the scale 1/8 is exact, so timm's ``(q · scale) @ kᵀ`` equals the reference's ``(q @ kᵀ) · scale``
bit for bit). ``fused_attention=True`` takes the fused kernel for speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import use_fused_attn
from torch import nn

from dynvit.methods import Knob, Method, register
from dynvit.reducers.clustering import Assignment, ClusteringViT, StageContext, default_params


def query_merge(x: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens x (B, N, C) into K tokens by queries (K, C): softmax over the N tokens, no scale.

    Returns:
        The merged tokens ``W · x`` (B, K, C) and the weights W (B, K, N); each row of W sums to 1.
    """
    weights = (queries @ x.transpose(-1, -2)).softmax(dim=-1)
    return weights @ x, weights


class PatchMerger(nn.Module):
    """One stage's merger: a LayerNorm (PyTorch's default eps 1e-5, as the reference builds it) and K queries.

    Attribute names are the reference's (``norm``, ``queries``), so its ``cluster_layers.{s}.*`` load as they are.
    """

    def __init__(self, dim: int, num_tokens: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        # The reference draws its queries from a standard normal; timm's ViT init leaves bare parameters alone.
        self.queries = nn.Parameter(torch.randn(num_tokens, dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens x (B, N, C) → merged tokens (B, K, C) and weights (B, K, N); see :func:`query_merge`."""
        return query_merge(self.norm(x), self.queries)


class PatchMergerViT(ClusteringViT):
    """A timm ViT whose patch tokens are merged by learned queries before each ``reduction_loc`` block.

    Build with ``PatchMergerViT.from_vit(vit, keep_rate=0.7)``; the mergers start at the reference's init.
    """

    method = "patchmerger"

    def configure(
        self, keep_rate: float = 0.7, reduction_loc: Sequence[int] | None = None, fused_attention: bool = False
    ) -> None:
        """Args:
        keep_rate, reduction_loc: As :meth:`ClusteringViT.configure`.
        fused_attention: Run the blocks' attention with timm's fused kernel (faster, but the logits move by
            ~1e-5 relative against the reference, see the module docstring); by default timm's unfused path.
        """
        if not isinstance(fused_attention, bool):
            raise ValueError(f"fused_attention must be True or False, got {fused_attention!r}")
        super().configure(keep_rate, reduction_loc)
        self.fused_attention = fused_attention
        for block in self.blocks:
            block.attn.fused_attn = fused_attention and use_fused_attn()

    def stage_module(self, stage: int, keep: int) -> nn.Module:
        return self.init_stage_module(PatchMerger(self.embed_dim, keep))

    def reduce(self, stage: int, x: torch.Tensor, context: StageContext) -> tuple[torch.Tensor, Assignment]:
        tokens, weights = self.cluster_layers[stage](x)
        return tokens, {"weights": weights}


register(
    Method(
        name="patchmerger",
        summary="merge the patch tokens into K_s by learned queries over layer-normed tokens (PatchMerger)",
        learned=True,
        build=PatchMergerViT.from_vit,
        knob=Knob("keep_rate", 0.0, 1.0),
        cost="schedule",
        defaults=lambda vit: {**default_params(vit), "fused_attention": False},
        reports=frozenset({"counts", "assignments"}),
        needs_class_token=False,
        onnx=None,
        reference="JoakimHaurum/TokenReduction models/patchmerger.py",
        released={"keep 0.7": {"keep_rate": 0.7}},
    )
)

__all__ = ["PatchMerger", "PatchMergerViT", "query_merge"]
