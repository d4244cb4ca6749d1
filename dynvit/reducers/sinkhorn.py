"""Sinkhorn clustering of tokens as TokenReduction runs it (``JoakimHaurum/TokenReduction``, ``models/sinkhorn.py``).

Before each block of ``reduction_loc`` the patch tokens x (B, N_s, C) are merged into K_s tokens by
learned centres V (K_s, C). Tokens and centres are L2-normalised, their cosine scores S (B, K_s, N_s) go
through log-domain Sinkhorn (:func:`log_sinkhorn`: ε = ``sinkhorn_eps``, ``cluster_iters`` rounds, both
marginals uniform at 1/(K_s + N_s)), and the transport plan scaled by K_s + N_s weighs the *normalised*
tokens: the new tokens are ``W · x̂``. The class token passes unchanged.

The reference renormalises the centre parameter in place on every forward. Here the forward computes
the same numbers from a normalised copy and never writes to the parameter; the backward pass leaves it
normalised instead, so training steps from unit centres as there (see :class:`_UnitCentres`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynvit.methods import Knob, Method, register
from dynvit.reducers.clustering import Assignment, ClusteringViT, StageContext, default_params


def log_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Entropic optimal transport of scores (B, K, N) in log space, as TokenReduction computes it.

    Both marginals are uniform with mass 1/(K + N) per row and per column (the reference's ``-log(K + N)``
    for both, so rows and columns need not balance when K ≠ N). With Z = scores/ε and potentials u (B, K),
    v (B, N) starting at 0, each round sets u from the rows, then v from the columns:
    ``u = -log(K+N) - logsumexp_n(Z + v)``, ``v = -log(K+N) - logsumexp_k(Z + u)``.

    Returns:
        The plan ``exp(Z + u + v)`` times K + N (B, K, N): after the last round every column sums to 1.
    """
    _, k, n = scores.shape
    # The reference takes the log in the scores' dtype; so does this.
    log_marginal = -scores.new_tensor(float(k + n)).log()
    z = scores / eps
    u = torch.zeros_like(z[:, :, 0])
    v = torch.zeros_like(z[:, 0, :])
    for _ in range(iters):
        u = log_marginal - torch.logsumexp(z + v.unsqueeze(1), dim=2)
        v = log_marginal - torch.logsumexp(z + u.unsqueeze(2), dim=1)
    return (z + u.unsqueeze(2) + v.unsqueeze(1) - log_marginal).exp()


def sinkhorn_merge(x: torch.Tensor, centres: torch.Tensor, eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens x (B, N, C) onto unit centres (K, C) by Sinkhorn transport of their cosine scores.

    Args:
        centres: Already of unit length (the caller normalises them, see :class:`SinkhornClustering`).
        eps, iters: As :func:`log_sinkhorn`.
    Returns:
        The merged tokens ``W · x̂`` (B, K, C), x̂ the L2-normalised tokens, and the weights W (B, K, N).
    """
    x = F.normalize(x, p=2, dim=-1)
    weights = log_sinkhorn(centres @ x.transpose(-1, -2), eps, iters)
    return weights @ x, weights


class _UnitCentres(torch.autograd.Function):
    """The rows of the centre parameter scaled to unit length, as the reference's forward uses them.

    The gradient passes straight through to the parameter, as in the reference, whose normalisation runs
    under ``no_grad``. The reference also leaves the parameter normalised, so every optimizer step starts
    from unit centres; backward does that projection here (a forward never writes to the parameter). Without
    it, standard-normal centres (length ≈ √C, 19.6 for DeiT-S) would turn each update by about 1/√C of the
    reference's angle, and the length would drift further as training goes.
    """

    @staticmethod
    def forward(ctx, centres: torch.Tensor) -> torch.Tensor:
        ctx.centres = centres
        return F.normalize(centres, p=2, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ctx.centres.copy_(F.normalize(ctx.centres, p=2, dim=-1))
        return grad


class SinkhornClustering(nn.Module):
    """One stage's Sinkhorn clustering: K learned centres ``v`` (the reference's name), a standard-normal draw.

    The forward uses the centres at unit length without writing to ``v``; backward leaves ``v`` normalised
    before the optimizer steps, as the reference's forward does (see :class:`_UnitCentres`).
    """

    def __init__(self, dim: int, num_tokens: int, eps: float, iters: int) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.randn(num_tokens, dim))
        self.eps, self.iters = eps, iters

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens x (B, N, C) → merged tokens (B, K, C) and weights (B, K, N); see :func:`sinkhorn_merge`."""
        return sinkhorn_merge(x, _UnitCentres.apply(self.v), self.eps, self.iters)


class SinkhornViT(ClusteringViT):
    """A timm ViT whose patch tokens are clustered onto learned centres by Sinkhorn before each
    ``reduction_loc`` block.

    Build with ``SinkhornViT.from_vit(vit, keep_rate=0.7)``; the centres start at the reference's init.
    """

    method = "sinkhorn"

    def configure(
        self,
        keep_rate: float = 0.7,
        reduction_loc: tuple[int, ...] | None = None,
        sinkhorn_eps: float = 1.0,
        cluster_iters: int = 3,
    ) -> None:
        """Args:
        keep_rate, reduction_loc: As :meth:`ClusteringViT.configure`.
        sinkhorn_eps: Entropic regularisation ε > 0: scores are divided by it (TokenReduction's default 1.0).
        cluster_iters: Sinkhorn rounds, at least 1 (TokenReduction's default 3).
        """
        if isinstance(sinkhorn_eps, bool) or not isinstance(sinkhorn_eps, int | float) or not sinkhorn_eps > 0:
            raise ValueError(f"sinkhorn_eps must be a positive number, got {sinkhorn_eps!r}")
        if isinstance(cluster_iters, bool) or not isinstance(cluster_iters, int) or cluster_iters < 1:
            raise ValueError(f"cluster_iters must be an integer of at least 1, got {cluster_iters!r}")
        self.sinkhorn_eps, self.cluster_iters = float(sinkhorn_eps), cluster_iters
        super().configure(keep_rate, reduction_loc)

    def stage_module(self, stage: int, keep: int) -> nn.Module:
        return self.init_stage_module(SinkhornClustering(self.embed_dim, keep, self.sinkhorn_eps, self.cluster_iters))

    def reduce(self, stage: int, x: torch.Tensor, context: StageContext) -> tuple[torch.Tensor, Assignment]:
        tokens, weights = self.cluster_layers[stage](x)
        return tokens, {"weights": weights}


register(
    Method(
        name="sinkhorn",
        summary="cluster the patch tokens onto K_s learned centres by log-domain Sinkhorn over cosine scores",
        learned=True,
        build=SinkhornViT.from_vit,
        knob=Knob("keep_rate", 0.0, 1.0),
        cost="schedule",
        defaults=lambda vit: {**default_params(vit), "sinkhorn_eps": 1.0, "cluster_iters": 3},
        reports=frozenset({"counts", "assignments"}),
        needs_class_token=False,
        onnx=None,
        reference="JoakimHaurum/TokenReduction models/sinkhorn.py",
        released={"keep 0.7": {"keep_rate": 0.7}},
    )
)

__all__ = ["SinkhornClustering", "SinkhornViT", "log_sinkhorn", "sinkhorn_merge"]
