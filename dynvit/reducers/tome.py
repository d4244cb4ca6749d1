"""ToMe: token merging by bipartite soft matching (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

In every block, between attention and MLP, the tokens are split alternately into sets A and B;
each A token is linked to its most similar B token (cosine similarity of the attention keys, mean
over heads) and the ``r`` most similar links are merged by size-weighted averaging. Sizes (how many
patches a token stands for) are tracked, and attention adds ``log(size)`` to its logits
("proportional attention") so a merged token keeps the weight of the tokens it replaced. Prefix
tokens are never merged: the last of them (the class token of a plain ViT) is the first token of set
A, protected as in ToMe, and any before it (a distilled DeiT's class token, all registers but the last)
stay out of the matching; a ViT without prefix tokens merges all of them, as ToMe does. Average and
attention pools weigh tokens by size. Training-free on a trained ViT; fine-tunes like the plain model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dynvit.methods import Knob, Method, register
from dynvit.models.tokens import bipartite_soft_matching, max_merges
from dynvit.reducers.base import AttentionStats, MergingViT, TokenState


def merge_schedule(num_patches: int, depth: int, r: int | Sequence[int]) -> list[int]:
    """Merges actually made in each block: ``r`` (per block if a sequence), capped where fewer than
    ``2 r`` patch tokens remain, as in ToMe (each A token merges at most once).

    Raises:
        ValueError: r is negative, not an integer, of the wrong length, or more than even the first
            block can merge (``num_patches // 2``).
    """
    rs = [r] * depth if isinstance(r, int) else list(r) if isinstance(r, Sequence) and not isinstance(r, str) else None
    if rs is None or len(rs) != depth or any(isinstance(v, bool) or not isinstance(v, int) for v in rs):
        raise ValueError(f"r must be an int or {depth} ints (one per block), got {r!r}")
    if any(v < 0 for v in rs):
        raise ValueError(f"r must be >= 0, got {r!r}")
    if any(v > max_merges(num_patches) for v in rs):
        raise ValueError(
            f"r={r!r} asks one block to merge more than the {max_merges(num_patches)} that bipartite matching "
            f"can merge among {num_patches} patch tokens: use r <= {max_merges(num_patches)}"
        )
    merges, patches = [], num_patches
    for v in rs:
        merges.append(min(v, max_merges(patches)))
        patches -= merges[-1]
    return merges


def merge_token_schedule(tokens: int, merges: Sequence[int]) -> list[tuple[int, int]]:
    """Tokens in each block's attention and MLP for a merger that merges ``merges[i]`` tokens between block
    ``i``'s attention and MLP, starting from ``tokens`` (prefix tokens included)."""
    counts = []
    for m in merges:
        counts.append((tokens, tokens - m))
        tokens -= m
    return counts


class ToMeViT(MergingViT):
    """A timm ViT that merges tokens in every block (ToMe). Build with ``apply_reducer(vit, "tome", r=13)``.

    Every block that merges is a stage: its kept map marks the patches whose tokens kept their place (the
    B token of each merge, every unmerged token), as many as there are patch tokens left.
    """

    method = "tome"

    def configure(self, r: int | Sequence[int] = 13, prop_attn: bool = True) -> None:
        """Args:
        r: Tokens merged per block (an int for all blocks, or one per block); capped where fewer than
            ``2 r`` patch tokens are left (see :func:`merge_schedule`). ``r=0`` is the unmodified model.
        prop_attn: Add ``log(size)`` to the attention logits (proportional attention).
        """
        self.merges = merge_schedule(self.num_patches, len(self.blocks), r)
        self.r = r
        self.prop_attn = bool(prop_attn)

    def token_schedule(self) -> list[tuple[int, int]]:
        return merge_token_schedule(self.num_patches + self.num_prefix_tokens, self.merges)

    def start(self, state: TokenState) -> None:
        state.proportional = self.prop_attn

    def acts_between(self, i: int) -> bool:
        return self.merges[i] > 0

    def between(self, i: int, x: torch.Tensor, stats: AttentionStats, state: TokenState) -> torch.Tensor:
        # Prefix tokens before the last one never enter the matching; the last one is A's protected first.
        held = max(self.num_prefix_tokens - 1, 0)
        plan = bipartite_soft_matching(stats.keys.mean(dim=1)[:, held:], self.merges[i], self.num_prefix_tokens > 0)
        x = state.merge(x, plan, held)
        state.mark_stage()
        return x

    @torch.no_grad()
    def sizes_per_block(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Tokens and their sizes (B, M, 1) after every block, for images x: to inspect the merging."""
        steps: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.run_blocks(self.embed(x), record=steps)
        return [(t, s.unsqueeze(-1) if s is not None else t.new_ones(*t.shape[:2], 1)) for t, s in steps]


register(
    Method(
        name="tome",
        summary="merge the r most similar token pairs in every block, size-weighted, with proportional attention (ToMe)",
        learned=False,
        build=ToMeViT.from_vit,
        knob=Knob("r", 0, lambda vit: max_merges(vit.patch_embed.num_patches), integer=True, cheaper="higher"),
        cost="schedule",
        reports=frozenset({"counts", "masks", "sources"}),
        onnx="after a merge, torch 2.15's ONNX decomposition cannot view the attention output of the merged "
        "tokens ('Cannot view a tensor')",
        reference="facebookresearch/ToMe tome/merge.py, tome/patch/timm.py",
        released={"r=13": {"r": 13}, "r=16": {"r": 16}},
    )
)

__all__ = ["ToMeViT", "merge_schedule", "merge_token_schedule"]
