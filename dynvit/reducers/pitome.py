"""PiToMe (Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging", NeurIPS 2024)
on timm ViTs, as its official code (``hchautran/PiToMe``, ``algo/pitome``) runs DeiT.

In every block, between attention and MLP, each patch token gets an energy score from the keys
(averaged over heads): ``E_i = mean_j ELU(cos(k_i, k_j) − margin)`` over all patch tokens j (itself
included), with ``margin = 0.75 − 0.75 · l / L`` in block l of L. ``r = floor(T − T · ratio)`` of the T
patch tokens are merged. In the first ``ceil(L / 2)`` blocks, ToMe's bipartite matching runs on the
tokens in energy order (A: ranks 0, 2, 4, …; B: ranks 1, 3, 5, …), the r best-matched A tokens merging
into their B partners. In the later blocks only the 2r highest-energy tokens take part (A and B
alternating as before) and every one of their A tokens merges into its most similar B token; the
other tokens are protected. Merges are size-weighted averages (ToMe's), and attention is plain: the
official DeiT patch does not pass sizes to attention (no proportional attention). Prefix tokens never
merge and do not enter the energy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dynvit.methods import Knob, Method, register
from dynvit.models.tokens import bipartite_soft_matching, gather_tokens, merge_weighted
from dynvit.reducers.base import ReducedRun, validate_rate
from dynvit.reducers.sources import TracedMergingViT, TracedRun, initial_sources, merge_sources
from dynvit.reducers.tome import merge_token_schedule


def energy_scores(metric: torch.Tensor, margin: float) -> torch.Tensor:
    """PiToMe's energy (B, T) of tokens with metric (B, T, D): the mean over all tokens j of
    ``ELU(cos(i, j) − margin)``, so a token with many close neighbours scores high."""
    metric = F.normalize(metric, dim=-1)
    return F.elu(metric @ metric.transpose(-2, -1) - margin).mean(dim=-1)


def pitome_merges(num_patches: int, depth: int, ratio: float) -> list[int]:
    """Tokens merged in each block: ``floor(T − T · ratio)`` of the T patch tokens left, computed as that
    float expression (as the official code), none at ratio 1."""
    merges, patches = [], num_patches
    for _ in range(depth):
        merges.append(math.floor(patches - patches * ratio) if ratio < 1.0 else 0)
        patches -= merges[-1]
    return merges


class PiToMeViT(TracedMergingViT):
    """A timm ViT that merges ``floor(T − T · ratio)`` tokens per block by PiToMe's energy-guided matching.

    Build with ``PiToMeViT.from_vit(vit, ratio=0.9)``.
    """

    method = "pitome"

    def configure(self, ratio: float = 0.9) -> None:
        """Args:
        ratio: Fraction in (0, 1] of the patch tokens each block keeps (before rounding down the merges);
            1 is the unmodified model. Below 0.5 more than half the tokens would have to pair up, which
            the matching cannot do.
        """
        validate_rate("ratio", ratio)
        depth = len(self.blocks)
        merges = pitome_merges(self.num_patches, depth, ratio)
        patches = self.num_patches
        for i, r in enumerate(merges):
            if 2 * r > patches:
                raise ValueError(
                    f"ratio={ratio} asks block {i} to merge {r} of its {patches} patch tokens, and PiToMe merges "
                    "tokens in pairs, so at most half of them: use ratio >= 0.5"
                )
            patches -= r
        self.ratio, self.merges = float(ratio), merges
        self.margins = [0.75 - 0.75 * (i / depth) for i in range(depth)]
        # The official code matches the whole set in the first ceil(L / 2) blocks, the highest-energy 2r after.
        self.matched_blocks = math.ceil(depth * 0.5)

    def token_schedule(self) -> list[tuple[int, int]]:
        return merge_token_schedule(self.num_patches + self.num_prefix_tokens, self.merges)

    def trace(self, x: torch.Tensor, track_sources: bool = False) -> TracedRun:
        prefix = self.num_prefix_tokens
        sources = initial_sources(x, prefix)[:, prefix:] if track_sources else None  # of the patch tokens
        size = None  # of the patch tokens (B, T, 1); all ones until the first merge
        per_block = []
        for i, (block, r) in enumerate(zip(self.blocks, self.merges, strict=True)):
            if r == 0:
                x = block(x)
            else:
                x, stats = block.attend(x)
                head, tokens = x[:, :prefix], x[:, prefix:]
                metric = stats.keys.mean(dim=1)[:, prefix:]
                order = energy_scores(metric, self.margins[i]).argsort(dim=-1, descending=True)
                tokens, metric = gather_tokens(tokens, order), gather_tokens(metric, order)
                size = tokens.new_ones(*tokens.shape[:2], 1) if size is None else gather_tokens(size, order)
                sources = None if sources is None else gather_tokens(sources, order)
                # Early blocks match all tokens; later ones only the 2r of highest energy, the rest protected.
                matched = tokens.shape[1] if i < self.matched_blocks else 2 * r
                plan = bipartite_soft_matching(metric[:, :matched], r, protect_first=False)
                merged, merged_size = merge_weighted(plan, tokens[:, :matched], size[:, :matched])
                x = torch.cat([head, tokens[:, matched:], merged], dim=1)
                size = torch.cat([size[:, matched:], merged_size], dim=1)
                if sources is not None:
                    sources = torch.cat([sources[:, matched:], merge_sources(plan, sources[:, :matched])], dim=1)
                x = block.feed_forward(x)
            if sources is not None:
                per_block.append(sources)
        sizes = None if size is None else torch.cat([size.new_ones(x.shape[0], prefix), size.squeeze(-1)], dim=1)
        run = ReducedRun(tokens=x, kept=[], counts=self.schedule_counts(x), sizes=sizes)
        return TracedRun(run, per_block if track_sources else None)


register(
    Method(
        name="pitome",
        summary=(
            "energy-ordered ToMe matching in the first half of the blocks, pairwise merging of the highest-energy "
            "tokens in the second (PiToMe, hchautran/PiToMe)"
        ),
        learned=False,
        build=PiToMeViT.from_vit,
        knob=Knob("ratio", 0.5, 1.0, integer=False, cheaper="lower"),
        cost="schedule",
        defaults=lambda model: {"ratio": 0.9},
        reports=frozenset({"counts", "sources"}),
        reference="hchautran/PiToMe algo/pitome/merge.py (pitome_vision), algo/pitome/patch/deit.py, timm.py",
        released={"ratio 0.9": {"ratio": 0.9}},
    )
)

__all__ = ["PiToMeViT", "energy_scores", "pitome_merges"]
