"""SiT's token slimming (Zong et al., "Self-slimmed Vision Transformer", ECCV 2022) as TokenReduction runs
it (``JoakimHaurum/TokenReduction``, ``models/sit.py``).

Before each block of ``reduction_loc`` a small MLP scores every patch token x (B, N_s, C) against each of
the K_s output tokens: ``S = MLP(x)`` (B, N_s, K_s), with the MLP LayerNorm → Linear C→C/2 → GELU →
Linear C/2→K_s. A learned scalar ``scale`` sharpens the scores, a softmax over the *tokens* turns each
output token's column into weights, and the new tokens are ``W · x`` of the raw (not normed) tokens.
The class token passes unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from dynvit.methods import Knob, Method, register
from dynvit.reducers.clustering import Assignment, ClusteringViT, StageContext, default_params


def slim_merge(x: torch.Tensor, scores: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens x (B, N, C) into K tokens by scores (B, N, K) times ``scale``, softmaxed over the N tokens.

    Returns:
        The merged tokens ``W · x`` (B, K, C) and the weights W (B, K, N); each row of W sums to 1.
    """
    weights = (scores * scale).softmax(dim=1).transpose(1, 2)
    return weights @ x, weights


class TokenSlimming(nn.Module):
    """One stage's slimming: the scoring MLP ``weight`` and the scalar ``scale`` (the reference's names).

    The reference's init: its LayerNorm eps is PyTorch's default 1e-5, its Linear layers get timm's ViT init,
    ``scale`` starts at 1 (shape (1, 1, 1), as its checkpoints store it).
    """

    def __init__(self, dim: int, num_tokens: int) -> None:
        super().__init__()
        hidden = int(dim * 0.5)
        self.weight = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_tokens))
        self.scale = nn.Parameter(torch.ones(1, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens x (B, N, C) → merged tokens (B, K, C) and weights (B, K, N); see :func:`slim_merge`."""
        return slim_merge(x, self.weight(x), self.scale)


class SiTViT(ClusteringViT):
    """A timm ViT whose patch tokens are slimmed by a learned scoring MLP before each ``reduction_loc`` block.

    Build with ``SiTViT.from_vit(vit, keep_rate=0.7)``; the slimming modules start at the reference's init.
    """

    method = "sit"

    def stage_module(self, stage: int, keep: int) -> nn.Module:
        return self.init_stage_module(TokenSlimming(self.embed_dim, keep))

    def reduce(self, stage: int, x: torch.Tensor, context: StageContext) -> tuple[torch.Tensor, Assignment]:
        tokens, weights = self.cluster_layers[stage](x)
        return tokens, {"weights": weights}


register(
    Method(
        name="sit",
        summary="merge the patch tokens into K_s by a learned scoring MLP softmaxed over tokens (SiT, as in "
        "TokenReduction)",
        learned=True,
        build=SiTViT.from_vit,
        knob=Knob("keep_rate", 0.0, 1.0),
        cost="schedule",
        defaults=default_params,
        reports=frozenset({"counts", "assignments"}),
        needs_class_token=False,
        onnx=None,
        reference="JoakimHaurum/TokenReduction models/sit.py",
        released={"keep 0.7": {"keep_rate": 0.7}},
    )
)

__all__ = ["SiTViT", "TokenSlimming", "slim_merge"]
