"""ToFu, Token Fusion (Kim et al., "Token Fusion: Bridging the Gap between Token Pruning and Token
Merging", WACV 2024), as ``Westlake-AI/OpenToMe`` implements it (there is no official code).

In every block, between attention and MLP, ToMe's bipartite matching on the keys (averaged over heads)
picks the ``r`` most similar pairs, the class token protected. In the first half of the network (blocks
``i <= depth // 2``) the matched A tokens are *pruned*: dropped, their partners unchanged. Later blocks
*merge* them by MLERP: the destination becomes the plain mean of itself and the tokens it receives,
rescaled to the largest norm among them. OpenToMe rescales by that norm over the *original*
destination's norm (``mean / ‖dst‖ · max‖·‖``), where the paper divides by the norm of the mean; dynvit
follows OpenToMe (docs/reference.md, "Fidelity: recent mergers"). No sizes are tracked: attention is
plain and merges are unweighted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dynvit.methods import Knob, Method, register
from dynvit.models.tokens import MergePlan, bipartite_soft_matching, gather_tokens, max_merges
from dynvit.reducers.base import ReducedRun, held_before
from dynvit.reducers.sources import TracedMergingViT, TracedRun, drop_merged, initial_sources, merge_sources
from dynvit.reducers.tome import merge_schedule, merge_token_schedule


def merge_mlerp(plan: MergePlan, x: torch.Tensor) -> torch.Tensor:
    """OpenToMe's MLERP merge of tokens x (B, N, C): each B token becomes the mean of itself and the A
    tokens it receives, times ``max norm among them / its own original norm``.

    Returns (B, N - r, C) in :func:`dynvit.reducers.tome.merge_sum`'s order (unmerged A, then all B).
    """
    a, b = x[:, ::2], x[:, 1::2]
    src = gather_tokens(a, plan.src)
    # A sum and a count rather than scatter_reduce(reduce="mean"): the same numbers, and the ONNX exporter
    # (torch 2.15) translates "mean" wrongly (a wrong sum, or a graph onnxruntime refuses).
    dst = plan.dst.unsqueeze(-1)
    total = b.scatter_add(1, dst.expand_as(src), src)
    count = torch.ones_like(b[..., :1]).scatter_add(1, dst, torch.ones_like(src[..., :1]))
    mean = total / count
    norm = b.norm(dim=-1).scatter_reduce(1, plan.dst, src.norm(dim=-1), reduce="amax")
    # Every B token is rescaled, as in OpenToMe: one that received nothing is itself up to rounding.
    b = mean / b.norm(dim=-1, keepdim=True) * norm.unsqueeze(-1)
    return torch.cat([gather_tokens(a, plan.unmerged), b], dim=1)


class ToFuViT(TracedMergingViT):
    """A timm ViT that prunes (first half) or MLERP-merges (second half) r matched tokens per block.

    Build with ``ToFuViT.from_vit(vit, r=13)``.
    """

    method = "tofu"

    def configure(self, r: int | Sequence[int] = 13) -> None:
        """Args:
        r: Tokens removed per block (an int for all blocks, or one per block), capped where fewer than
            ``2 r`` patch tokens are left, as in ToMe (see :func:`dynvit.reducers.tome.merge_schedule`).
        """
        self.merges = merge_schedule(self.num_patches, len(self.blocks), r)
        self.r = r

    def prunes(self, block: int) -> bool:
        """Whether block ``block`` prunes its matched tokens (the first half, ``block <= depth // 2``) or merges them."""
        return block <= len(self.blocks) // 2

    def token_schedule(self) -> list[tuple[int, int]]:
        return merge_token_schedule(self.num_patches + self.num_prefix_tokens, self.merges)

    def trace(self, x: torch.Tensor, track_sources: bool = False) -> TracedRun:
        sources = initial_sources(x, self.num_prefix_tokens) if track_sources else None
        # Prefix tokens before the last one stay out of the matching; the last one is A's protected first.
        held = max(self.num_prefix_tokens - 1, 0)
        per_block = []
        for i, (block, r) in enumerate(zip(self.blocks, self.merges, strict=True)):
            if r == 0:
                x = block(x)
            else:
                x, stats = block.attend(x)
                plan = bipartite_soft_matching(stats.keys.mean(dim=1)[:, held:], r, self.num_prefix_tokens > 0)
                reduce = drop_merged if self.prunes(i) else merge_mlerp
                x = held_before(x, reduce(plan, x[:, held:]), held)
                if sources is not None:
                    follow = drop_merged if self.prunes(i) else merge_sources
                    sources = held_before(sources, follow(plan, sources[:, held:]), held)
                x = block.feed_forward(x)
            if sources is not None:
                per_block.append(sources[:, self.num_prefix_tokens :])
        run = ReducedRun(tokens=x, kept=[], counts=self.schedule_counts(x))
        return TracedRun(run, per_block if track_sources else None)


register(
    Method(
        name="tofu",
        summary=(
            "ToMe's matching; the first half of the blocks prunes the matched tokens, the rest merge them "
            "by MLERP (ToFu, as Westlake-AI/OpenToMe implements it)"
        ),
        learned=False,
        build=ToFuViT.from_vit,
        knob=Knob("r", 0, lambda model: max_merges(model.patch_embed.num_patches), integer=True, cheaper="higher"),
        cost="schedule",
        defaults=lambda model: {"r": min(13, max_merges(model.patch_embed.num_patches))},
        reports=frozenset({"counts", "sources"}),
        reference="Westlake-AI/OpenToMe opentome/timm/tofu.py, opentome/tome/tome.py (no official code)",
        released={"r=13": {"r": 13}},
    )
)

__all__ = ["ToFuViT", "merge_mlerp"]
