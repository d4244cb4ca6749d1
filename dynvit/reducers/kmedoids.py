"""K-Medoids token clustering, training-free, as TokenReduction runs it (``models/kmedoids.py``).

Before each block of ``reduction_loc`` the patch tokens are clustered into K_s clusters and replaced by
their medoids (actual tokens, so the output tokens are a subset of the input ones). Each token i is weighted
by the attention it *received* in the previous block, w_i = Σ_heads Σ_queries attn[:, :, q, i], so
location 0 has no weights and is refused. The medoids start as the K_s tokens of largest w; then
``cluster_iters`` rounds of: assign every token to its nearest medoid, and make each cluster's medoid the
member i of least ``w_i · Σ_j d(i, j)``. That sum runs over *all* tokens j, not only the cluster's members
(the reference's choice), and a cluster left empty takes token 0. A last assignment gives the clusters
reported. Distances are ``torch.cdist`` in its default mode, as the reference computes them: for more than
25 tokens it uses the matrix-product formula, whose values differ from the direct one by up to ~6e-4 —
enough to change choices, so no other distance is used.

With ``equal_weight`` every token weighs 1 and the medoids start from farthest-point seeding instead: a
random first token (one for the whole batch), then repeatedly the token whose *largest* distance to the
chosen ones is largest (the reference takes the maximum, not the usual minimum). No attention is needed
then, so location 0 is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dynvit.methods import Knob, Method, register
from dynvit.models.tokens import gather_tokens
from dynvit.reducers.base import SelectionViT
from dynvit.reducers.clustering import Assignment, ClusteringViT, StageContext, default_params


def nearest_medoid(dist: torch.Tensor, medoids: torch.Tensor) -> torch.Tensor:
    """Index into ``medoids`` (B, K) of each token's nearest medoid (B, N), from distances (B, N, N)."""
    B, N, _ = dist.shape
    return torch.gather(dist, 2, medoids[:, None, :].expand(B, N, -1)).argmin(dim=-1)


def best_members(cost: torch.Tensor, assignment: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Per cluster, the member of least ``cost`` (B, K); token 0 for an empty cluster.

    Args:
        cost: Each token's cost as a medoid (B, N).
        assignment: Each token's cluster (B, N), in 0..num_clusters-1.
    """
    clusters = torch.arange(num_clusters, device=assignment.device)
    members = assignment[:, None, :] == clusters[None, :, None]  # (B, K, N)
    choice = cost[:, None, :].masked_fill(~members, float("inf")).argmin(dim=-1)
    return choice.masked_fill(~members.any(dim=-1), 0)


def farthest_first(x: torch.Tensor, num_clusters: int, first: int) -> torch.Tensor:
    """The reference's seeding without weights (B, K): token ``first``, then each time the token whose
    largest distance to the medoids chosen so far is largest (chosen tokens count as distance 0)."""
    B, N, _ = x.shape
    medoids = torch.full((B, 1), first, dtype=torch.long, device=x.device)
    for _ in range(1, num_clusters):
        chosen = torch.zeros(B, N, dtype=torch.bool, device=x.device).scatter_(1, medoids, True)
        farthest = torch.cdist(x, gather_tokens(x, medoids)).masked_fill(chosen[:, :, None], 0.0).amax(dim=-1)
        medoids = torch.cat([medoids, farthest.argmax(dim=1, keepdim=True)], dim=1)
    return medoids


def k_medoids(
    x: torch.Tensor, num_clusters: int, iterations: int, weight: torch.Tensor | None, first: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenReduction's weighted K-Medoids of the tokens x (B, N, C).

    Args:
        num_clusters: K.
        iterations: Assignment/update rounds after the initial medoids.
        weight: Token weights (B, N): medoids start as the K heaviest. None: all 1, farthest-point seeding
            from token ``first``.
    Returns:
        The medoids (B, K), indices into the N tokens, and each token's cluster (B, N), indices into K.
    """
    dist = torch.cdist(x, x)
    if weight is None:
        medoids = farthest_first(x, num_clusters, first)
        weight = x.new_ones(x.shape[:2])
    else:
        medoids = weight.topk(num_clusters, dim=1).indices
    # A candidate's cost: its weight times its distance to every token, summed as the reference sums it.
    cost = (dist * weight[:, :, None]).sum(dim=-1)
    for _ in range(iterations):
        medoids = best_members(cost, nearest_medoid(dist, medoids), num_clusters)
    return medoids, nearest_medoid(dist, medoids)


def attention_received(attention: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Attention each patch token received (B, N): summed over heads, then over all queries (prefix tokens
    included), from probabilities (B, H, P + N, P + N)."""
    return attention.sum(dim=1).sum(dim=1)[:, num_prefix:]


class KMedoidsViT(ClusteringViT, SelectionViT):
    """A timm ViT whose patch tokens are replaced by the medoids of K_s clusters before ``reduction_loc`` blocks.

    Build with ``KMedoidsViT.from_vit(vit, keep_rate=0.7)``. The medoids are original patches, so
    ``predict_with_masks`` shows which patches are still tokens after each stage.
    """

    method = "kmedoids"
    selects = True
    equal_weight: bool = False

    @property
    def needs_attention(self) -> bool:
        """Received attention weighs the tokens unless ``equal_weight`` is set."""
        return not self.equal_weight

    def configure(
        self,
        keep_rate: float = 0.7,
        reduction_loc: Sequence[int] | None = None,
        cluster_iters: int = 3,
        equal_weight: bool = False,
        seed: int | None = None,
    ) -> None:
        """Args:
        keep_rate, reduction_loc: As :meth:`ClusteringViT.configure`; location 0 needs ``equal_weight``.
        cluster_iters: Assignment/update rounds (the reference's default 3).
        equal_weight: Weigh all tokens 1 and seed by farthest points instead of received attention.
        seed: With ``equal_weight``, seeds the first medoid's draw afresh on every forward; None draws from
            torch's global generator.
        """
        if isinstance(cluster_iters, bool) or not isinstance(cluster_iters, int) or cluster_iters < 0:
            raise ValueError(f"cluster_iters must be a non-negative int, got {cluster_iters!r}")
        if not isinstance(equal_weight, bool):
            raise ValueError(f"equal_weight must be True or False, got {equal_weight!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.cluster_iters, self.equal_weight, self.seed = cluster_iters, equal_weight, seed
        super().configure(keep_rate, reduction_loc)

    def reduce(self, stage: int, x: torch.Tensor, context: StageContext) -> tuple[torch.Tensor, Assignment]:
        # The choice is discrete: no graph for the N×N distances; gradients reach the medoid tokens.
        with torch.no_grad():
            if self.equal_weight:
                first = int(torch.randint(x.shape[1], (1,), generator=context.generator, device=x.device))
                medoids, assignment = k_medoids(x, context.keep, self.cluster_iters, None, first)
            else:
                weight = attention_received(context.attention, self.num_prefix_tokens)
                medoids, assignment = k_medoids(x, context.keep, self.cluster_iters, weight)
        return gather_tokens(x, medoids), {"centres": medoids, "assignment": assignment}


register(
    Method(
        name="kmedoids",
        summary="replace the patch tokens by the medoids of K-Medoids clusters weighted by received attention "
        "(TokenReduction)",
        learned=False,
        build=KMedoidsViT.from_vit,
        knob=Knob("keep_rate", 0.0, 1.0),
        cost="schedule",
        defaults=lambda vit: {**default_params(vit), "cluster_iters": 3, "equal_weight": False},
        reports=frozenset({"counts", "masks", "assignments"}),
        needs_class_token=False,
        onnx="torch.onnx has no conversion for torch.cdist (aten::_cdist_forward), and distances computed any "
        "other way change which medoids are chosen",
        reference="JoakimHaurum/TokenReduction models/kmedoids.py",
        released={"keep 0.7": {"keep_rate": 0.7}},
    )
)

__all__ = ["KMedoidsViT", "attention_received", "best_members", "farthest_first", "k_medoids", "nearest_medoid"]
