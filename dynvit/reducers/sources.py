"""What the recent mergers (DiffRate, PiToMe, ToFu) share: a fixed token schedule, and merge *sources*.

A merged token stands for several original patches; its sources say which. They are tracked as a
boolean map (B, M, N) from the M current tokens to the N original patches, the way ToMe's
``trace_source`` tracks them (an adjacency matrix merged with ``amax``): a merge ORs the rows of the
tokens it joins, a dropped token takes its patches with it, and prefix tokens (class, distillation,
register tokens) have empty rows while tracked and are left out of what is reported.
:meth:`TracedMergingViT.predict_with_sources` reports the final tokens' sources (the ``SourceReporting``
contract), :meth:`TracedMergingViT.predict_with_block_sources` those after every block, so a picture can show
which patches merged where.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dynvit.models.tokens import MergePlan, gather_tokens
from dynvit.reducers.base import ReducedRun, ReducedViT


class TracedRun(NamedTuple):
    """A :class:`ReducedRun` and, when asked for, the sources (B, M_i - P, N) bool of the non-prefix tokens
    entering each block's MLP."""

    run: ReducedRun
    sources: list[torch.Tensor] | None


def initial_sources(x: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Sources (B, P + N, N) of unreduced tokens x (B, P + N, C): every patch its own, prefix rows empty."""
    B, n, _ = x.shape
    eye = torch.eye(n - num_prefix, dtype=torch.bool, device=x.device)
    rows = torch.cat([eye.new_zeros(num_prefix, n - num_prefix), eye])
    return rows.expand(B, -1, -1)


def merge_sources(plan: MergePlan, sources: torch.Tensor) -> torch.Tensor:
    """Apply a bipartite plan to sources (B, N, K) bool: a merged-away A row is ORed into its B partner.

    Returns (B, N - r, K) in :func:`dynvit.reducers.tome.merge_sum`'s order (unmerged A, then all B).
    """
    a, b = sources[:, ::2], sources[:, 1::2]
    index = plan.dst.unsqueeze(-1).expand(-1, -1, sources.shape[-1])
    b = b.scatter_reduce(1, index, gather_tokens(a, plan.src), reduce="amax")
    return torch.cat([gather_tokens(a, plan.unmerged), b], dim=1)


def drop_merged(plan: MergePlan, x: torch.Tensor) -> torch.Tensor:
    """Apply a bipartite plan by dropping the merged-away A rows of x (B, N, ·) instead of merging them
    (ToFu's pruning); returns (B, N - r, ·) in :func:`dynvit.reducers.tome.merge_sum`'s order."""
    return torch.cat([gather_tokens(x[:, ::2], plan.unmerged), x[:, 1::2]], dim=1)


class TracedMergingViT(ReducedViT):
    """A reducer whose token counts follow from its parameters alone and that traces merge sources after every
    block through its own :meth:`trace` (:class:`~dynvit.reducers.base.MergingViT`, ToMe's base, instead asks
    the shared ``run_blocks`` for the final sources only).

    Subclasses implement :meth:`token_schedule` and :meth:`trace`; ``run_blocks`` is ``trace`` without sources.
    """

    def trace(self, x: torch.Tensor, track_sources: bool = False) -> TracedRun:
        """Embedded tokens (B, P + N, C) through the blocks; with ``track_sources``, the non-prefix tokens'
        sources after each block's reduction."""
        raise NotImplementedError

    def token_schedule(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def run_blocks(self, x: torch.Tensor) -> ReducedRun:
        return self.trace(x).run

    def schedule_counts(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`token_schedule` as the (B, depth, 2) counts of a :class:`ReducedRun` for tokens x (B, ·, C)."""
        return torch.tensor(self.token_schedule(), device=x.device).expand(x.shape[0], -1, -1)

    @torch.no_grad()
    def predict_with_block_sources(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Eval-mode logits and, per block, which original patches (B, M_i - P, N) bool each non-prefix token
        entering its MLP stands for (a pruned patch: no token). The mode is restored after."""
        with self.evaluating():
            run, sources = self.trace(self.embed(x), track_sources=True)
            return self.pooled_head(self.norm(run.tokens), run.sizes), sources

    def predict_with_sources(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode logits and which original patches (B, M - P, N) bool each final non-prefix token stands for."""
        logits, sources = self.predict_with_block_sources(x)
        return logits, sources[-1]


__all__ = ["TracedMergingViT", "TracedRun", "drop_merged", "initial_sources", "merge_sources"]
