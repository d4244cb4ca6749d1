"""DPC-KNN token merging as TokenReduction runs it (``models/dpcknn.py``, after TCFormer's CTM).

Before each block of ``reduction_loc`` the patch tokens are clustered by density peaks (Du et al.'s
DPC-KNN) and each cluster is merged into one token:

- distances ``d = cdist(x, x) / √C`` on the raw patch tokens (``torch.cdist`` in its default mode, as the
  reference: its values decide the clusters);
- density ``ρ_i = exp(-mean of d² to the k nearest tokens)`` (itself included, ``k_neighbors`` 5), plus
  uniform noise × 1e-6 so that no two densities tie;
- ``δ_i`` = distance to the nearest denser token (the largest distance in the image for the densest);
- the K_s tokens of largest ``ρ·δ`` are the centres, in that order; every token joins its nearest centre,
  and each centre its own cluster;
- a cluster's token is the mean of its members weighted by ``exp(score(x))``, a learned Linear C → 1 per
  stage (``cluster_layers.{s}.score``), plus 1e-6 in the denominator. With ``equal_weight`` all weigh 1 and
  there is no Linear.

The clustering itself passes no gradient; the Linear learns through the merge weights. TokenReduction departs
from TCFormer here: no token convolution, no LayerNorm before scoring, no attention bias for merged sizes.

The noise makes a forward non-deterministic. It is drawn from torch's global generator like the reference's
(seed both with ``torch.manual_seed`` to compare them), or, with ``seed``, from a generator seeded afresh on
every forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dynvit.methods import Knob, Method, register
from dynvit.reducers.clustering import Assignment, ClusteringViT, StageContext, default_params


def density_peaks(
    x: torch.Tensor, num_clusters: int, k_neighbors: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN centres and clusters of the tokens x (B, N, C), as TokenReduction computes them.

    Args:
        num_clusters: K, the centres to pick.
        k_neighbors: Nearest tokens (the token itself included) that set a token's density.
        generator: Where the 1e-6 tie-breaking noise is drawn from; None: torch's global generator.
    Returns:
        The centres (B, K), indices into the N tokens ordered by ρ·δ, and each token's cluster (B, N),
        indices into K.
    """
    B, N, C = x.shape
    dist = torch.cdist(x, x) / C**0.5
    nearest = dist.topk(k_neighbors, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape, generator=generator, device=x.device, dtype=density.dtype) * 1e-6
    denser = density[:, None, :] > density[:, :, None]  # [b, i, j]: token j is denser than token i
    largest = dist.flatten(1).amax(dim=-1)[:, None, None]
    delta = torch.where(denser, dist, largest).amin(dim=-1)
    centres = (delta * density).topk(num_clusters, dim=-1).indices
    assignment = torch.gather(dist, 1, centres[:, :, None].expand(B, num_clusters, N)).argmin(dim=1)
    # A centre may be as close to an earlier centre as to itself; it stays in its own cluster.
    assignment.scatter_(1, centres, torch.arange(num_clusters, device=x.device).expand(B, -1))
    return centres, assignment


def merge_clusters(x: torch.Tensor, assignment: torch.Tensor, num_clusters: int, weight: torch.Tensor) -> torch.Tensor:
    """Each cluster's ``weight``-weighted mean of the tokens x (B, N, C) in it (B, K, C).

    Args:
        assignment: Each token's cluster (B, N).
        weight: Token weights (B, N, 1); a cluster's total gets 1e-6 added, as the reference's.
    """
    B, N, C = x.shape
    total = weight.new_zeros(B, num_clusters, 1).scatter_add(1, assignment[:, :, None], weight) + 1e-6
    share = weight / torch.gather(total, 1, assignment[:, :, None])
    merged = x.new_zeros(B, num_clusters, C)
    return merged.scatter_add(1, assignment[:, :, None].expand(B, N, C), x * share)


class TokenScore(nn.Module):
    """One stage's learned token weight, named as TokenReduction's ``CTM`` (``score``: Linear C → 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Merge weights ``exp(score(x))`` (B, N, 1) of tokens x (B, N, C)."""
        return self.score(x).exp()


class DPCKNNViT(ClusteringViT):
    """A timm ViT whose patch tokens are merged into K_s DPC-KNN clusters before ``reduction_loc`` blocks.

    Build with ``DPCKNNViT.from_vit(vit, keep_rate=0.7)``; the score Linears start at the reference's init.
    """

    method = "dpcknn"

    def configure(
        self,
        keep_rate: float = 0.7,
        reduction_loc: Sequence[int] | None = None,
        k_neighbors: int = 5,
        equal_weight: bool = False,
        seed: int | None = None,
    ) -> None:
        """Args:
        keep_rate, reduction_loc: As :meth:`ClusteringViT.configure`.
        k_neighbors: Nearest tokens that set a token's density (the reference's default 5); at most the
            tokens a stage clusters.
        equal_weight: Merge with equal weights, no learned score (then nothing is added to the ViT).
        seed: Seeds the tie-breaking noise afresh on every forward; None draws from torch's global generator.
        """
        if isinstance(k_neighbors, bool) or not isinstance(k_neighbors, int) or k_neighbors < 1:
            raise ValueError(f"k_neighbors must be a positive int, got {k_neighbors!r}")
        if not isinstance(equal_weight, bool):
            raise ValueError(f"equal_weight must be True or False, got {equal_weight!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.k_neighbors, self.equal_weight, self.seed = k_neighbors, equal_weight, seed
        super().configure(keep_rate, reduction_loc)
        # The last stage clusters the fewest tokens: those the stage before it left.
        fewest = self.keep_counts[-2] if len(self.keep_counts) > 1 else self.num_patches
        if k_neighbors > fewest:
            raise ValueError(
                f"k_neighbors {k_neighbors} exceeds the {fewest} tokens the last stage clusters: "
                f"use k_neighbors <= {fewest}, a larger keep_rate or fewer reduction_loc entries"
            )

    def stage_module(self, stage: int, keep: int) -> nn.Module | None:
        return None if self.equal_weight else self.init_stage_module(TokenScore(self.embed_dim))

    def reduce(self, stage: int, x: torch.Tensor, context: StageContext) -> tuple[torch.Tensor, Assignment]:
        with torch.no_grad():
            centres, assignment = density_peaks(x, context.keep, self.k_neighbors, context.generator)
        weight = x.new_ones(*x.shape[:2], 1) if self.equal_weight else self.cluster_layers[stage](x)
        merged = merge_clusters(x, assignment, context.keep, weight)
        return merged, {"centres": centres, "assignment": assignment}


register(
    Method(
        name="dpcknn",
        summary="merge the patch tokens in DPC-KNN density-peak clusters, weighted by a learned score "
        "(TokenReduction, after TCFormer)",
        learned=True,
        build=DPCKNNViT.from_vit,
        knob=Knob("keep_rate", 0.0, 1.0),
        cost="schedule",
        defaults=lambda vit: {**default_params(vit), "k_neighbors": 5, "equal_weight": False},
        reports=frozenset({"counts", "assignments"}),
        needs_class_token=False,
        onnx="torch.onnx has no conversion for torch.cdist (aten::_cdist_forward), and distances computed any "
        "other way change the clusters; the tie-breaking noise's shape also follows the batch size",
        reference="JoakimHaurum/TokenReduction models/dpcknn.py",
        released={"keep 0.7": {"keep_rate": 0.7}},
    )
)

__all__ = ["DPCKNNViT", "TokenScore", "density_peaks", "merge_clusters"]
