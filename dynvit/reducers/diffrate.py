"""DiffRate (Chen et al., "DiffRate: Differentiable Compression Rate for Efficient Vision Transformers",
ICCV 2023) with a given compression schedule, as its official code (``OpenGVLab/DiffRate``) evaluates one.

In every block, between attention and MLP, the patch tokens are sorted by the class token's attention
(mean over heads). The first ``prune_kept_num[i]`` tokens (prefix tokens included) stay, the rest are
dropped. If ``merge_kept_num[i]`` is smaller, each token past it merges into its most cosine-similar
token among the first ``merge_kept_num[i]`` (the block's hidden tokens after the attention residual are
the metric; prefix tokens never receive): an *unweighted* mean of the destination and everything it
receives. Token sizes grow by ``size × similarity`` of each merged token, and every block's attention
adds ``log(size)`` to its logits (proportional attention). The schedule counts every token, so a DeiT's
first entry is 197.

DiffRate's contribution is the *search* for the schedule (two categorical distributions over kept
counts per block, a straight-through estimator, cross-entropy + 5·(GFLOPs − target)², backbone frozen,
3 epochs). That search is training and is not here; the released DeiT-S schedules are
(:data:`DEIT_S_SCHEDULES`), and ``strength`` bends one to another cost (``strength=0``: no reduction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dynvit.methods import Knob, Method, register
from dynvit.models.tokens import gather_tokens, key_bias
from dynvit.reducers.base import ReducedRun
from dynvit.reducers.sources import TracedMergingViT, TracedRun, initial_sources

# The DeiT-S schedules released in DiffRate's compression_rate.json ("ViT-S-DeiT"), named by their
# GFLOPs as DiffRate counts them: (prune_kept_num, merge_kept_num), tokens kept per block with the class token.
DEIT_S_SCHEDULES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "deit_s_2.3": (
        (197, 192, 168, 143, 121, 105, 92, 74, 62, 45, 33, 3),
        (197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3),
    ),
    "deit_s_2.5": (
        (197, 192, 174, 156, 131, 115, 111, 99, 76, 50, 39, 3),
        (197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3),
    ),
    "deit_s_2.7": (
        (197, 196, 182, 160, 141, 127, 115, 105, 88, 66, 49, 3),
        (197, 188, 170, 147, 131, 119, 109, 96, 76, 54, 45, 3),
    ),
    "deit_s_2.9": (
        (197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3),
        (197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3),
    ),
    "deit_s_3.1": (
        (197, 197, 194, 180, 160, 147, 137, 129, 115, 92, 76, 3),
        (197, 196, 186, 164, 150, 141, 133, 121, 103, 78, 68, 3),
    ),
}
DEFAULT_SCHEDULE = "deit_s_2.9"
# The geometry the released schedules were searched on: DeiT's 196 patches, one class token, 12 blocks.
_RELEASED_PATCHES, _RELEASED_DEPTH = 196, 12


def _check_counts(name: str, counts: Sequence[int], depth: int, low: int, high: int) -> list[int]:
    """``counts`` as a list, or ``ValueError`` unless it holds ``depth`` non-increasing ints in [low, high]."""
    if isinstance(counts, str | bytes) or not isinstance(counts, Sequence):
        raise ValueError(f"{name} must be a sequence of {depth} ints (tokens kept per block), got {counts!r}")
    counts = list(counts)
    if len(counts) != depth or any(isinstance(k, bool) or not isinstance(k, int) for k in counts):
        raise ValueError(f"{name} must hold one int per block ({depth} for this model), got {counts}")
    if any(not low <= k <= high for k in counts):
        raise ValueError(
            f"{name} counts tokens kept with the prefix tokens, so each entry must be in [{low}, {high}] for this "
            f"model, got {counts}"
        )
    for i in range(1, depth):
        if counts[i] > counts[i - 1]:
            fixed = [min(counts[: j + 1]) for j in range(depth)]
            raise ValueError(
                f"{name} must not increase from block to block (block {i} keeps {counts[i]} after "
                f"{counts[i - 1]}): tokens dropped once stay dropped, so use its running minimum {fixed}"
            )
    return counts


def _bend(counts: Sequence[int], num_prefix: int, base_patches: int, num_patches: int, strength: float) -> list[int]:
    """Kept counts with the patch part bent to ``num_patches · (kept / base_patches) ** strength``, rounded,
    at least one patch; ``strength=1`` with ``base_patches == num_patches`` returns ``counts`` unchanged."""
    return [num_prefix + max(1, round(num_patches * ((k - num_prefix) / base_patches) ** strength)) for k in counts]


class DiffRateViT(TracedMergingViT):
    """A timm ViT that prunes and merges tokens by a DiffRate schedule in every block.

    Build with ``DiffRateViT.from_vit(vit, schedule="deit_s_2.9")`` or with explicit ``prune_kept_num`` and
    ``merge_kept_num`` lists; ``predict_with_sources`` shows which patches each token stands for. In
    training mode it reduces as in eval (so the backbone can be fine-tuned at a schedule); DiffRate's own
    training-mode forward, which keeps all tokens under soft masks, serves its search.
    """

    method = "diffrate"
    needs_class_token = True

    def configure(
        self,
        schedule: str | None = None,
        prune_kept_num: Sequence[int] | None = None,
        merge_kept_num: Sequence[int] | None = None,
        strength: float = 1.0,
    ) -> None:
        """Args:
        schedule: A released schedule by name, a key of :data:`DEIT_S_SCHEDULES` (default ``"deit_s_2.9"``
            when no lists are given). On a model other than a 12-block ViT with 196 patches, block i takes
            the released kept fraction of the block at the same relative depth (dynvit's adaptation).
        prune_kept_num: Tokens (prefix tokens included) kept by pruning in each block, non-increasing.
        merge_kept_num: Tokens kept after merging in each block, non-increasing, at most ``prune_kept_num``.
        strength: Bends the schedule's kept patch fractions f to ``f ** strength``: 1 is the schedule itself,
            0 no reduction, larger values reduce more (the cost knob).
        """
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 <= strength < math.inf:
            raise ValueError(f"strength must be a number >= 0 (1: the schedule as given), got {strength!r}")
        depth, prefix, patches = len(self.blocks), self.num_prefix_tokens, self.num_patches
        given = (prune_kept_num is not None, merge_kept_num is not None)
        if any(given):
            if not all(given) or schedule is not None:
                raise ValueError(
                    "give either a named schedule or both prune_kept_num and merge_kept_num, got "
                    f"schedule={schedule!r}, prune_kept_num={prune_kept_num!r}, merge_kept_num={merge_kept_num!r}"
                )
            prune = _check_counts("prune_kept_num", prune_kept_num, depth, prefix + 1, prefix + patches)
            merge = _check_counts("merge_kept_num", merge_kept_num, depth, prefix + 1, prefix + patches)
            base = patches
        else:
            schedule = DEFAULT_SCHEDULE if schedule is None else schedule
            if schedule not in DEIT_S_SCHEDULES:
                raise ValueError(f"unknown DiffRate schedule {schedule!r}: choose one of {sorted(DEIT_S_SCHEDULES)}")
            # Block i reads the released block at the same relative depth (itself on a 12-block ViT); the
            # released counts hold one class token, replaced by this model's prefix tokens.
            at = [round(i * (_RELEASED_DEPTH - 1) / max(depth - 1, 1)) for i in range(depth)]
            prune, merge = ([prefix - 1 + counts[j] for j in at] for counts in DEIT_S_SCHEDULES[schedule])
            base = _RELEASED_PATCHES
        for i, (p, m) in enumerate(zip(prune, merge, strict=True)):
            if m > p:
                raise ValueError(
                    f"merge_kept_num[{i}]={m} exceeds prune_kept_num[{i}]={p}: merging keeps a subset of what "
                    f"pruning kept, so lower merge_kept_num[{i}] to at most {p}"
                )
        self.schedule, self.strength = schedule, float(strength)
        self.prune_kept_num = _bend(prune, prefix, base, patches, strength)
        self.merge_kept_num = _bend(merge, prefix, base, patches, strength)

    def token_schedule(self) -> list[tuple[int, int]]:
        # A count above the tokens left changes nothing, as in DiffRate (its slicing keeps what there is).
        counts, n = [], self.num_patches + self.num_prefix_tokens
        for p, m in zip(self.prune_kept_num, self.merge_kept_num, strict=True):
            counts.append((n, min(n, p, m)))
            n = counts[-1][1]
        return counts

    def trace(self, x: torch.Tensor, track_sources: bool = False) -> TracedRun:
        prefix = self.num_prefix_tokens
        sources = initial_sources(x, prefix) if track_sources else None
        size = None  # all ones until the first merge: no bias until then
        per_block = []
        for block, (n, m), prune in zip(self.blocks, self.token_schedule(), self.prune_kept_num, strict=True):
            p = min(n, prune)  # tokens left after pruning; m after merging
            bias = None if size is None else key_bias(size.log())
            if m == n:
                x = block(x) if bias is None else block.feed_forward(block.attend(x, bias=bias)[0])
            else:
                x, stats = block.attend(x, bias=bias, cls_attn=True)
                # Prefix tokens first, then the patches by the class token's attention, most attended first.
                ranked = stats.cls_attn.mean(dim=1)[:, prefix:].sort(dim=1, descending=True).indices + prefix
                keep = torch.cat([torch.arange(prefix, device=x.device).expand(x.shape[0], -1), ranked], dim=1)
                keep = keep[:, :p]
                x = gather_tokens(x, keep)
                size = x.new_ones(x.shape[:2]) if size is None else torch.gather(size, 1, keep)
                sources = None if sources is None else gather_tokens(sources, keep)
                if m < p:
                    x, size, sources = merge_into_kept(x, size, sources, m, prefix)
                x = block.feed_forward(x)
            if sources is not None:
                per_block.append(sources[:, prefix:])
        run = ReducedRun(tokens=x, kept=[], counts=self.schedule_counts(x), sizes=size)
        return TracedRun(run, per_block if track_sources else None)


def merge_into_kept(
    x: torch.Tensor, size: torch.Tensor, sources: torch.Tensor | None, kept: int, num_prefix: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """DiffRate's merge: every token past the first ``kept`` joins its most cosine-similar token among them.

    Args:
        x: Tokens (B, n, C), prefix tokens first, the rest ranked; x itself is the similarity metric.
        size: Token sizes (B, n); a merged token adds ``size × similarity`` to its destination's.
        sources: Sources (B, n, N) bool or None.
        kept: Tokens that stay (prefix tokens included); the ``num_prefix`` first never receive.
    Returns:
        The first ``kept`` tokens, each the unweighted mean of itself and what it received, their sizes and sources.
    """
    metric = x / x.norm(dim=-1, keepdim=True)
    similarity = metric[:, kept:] @ metric[:, :kept].transpose(-2, -1)
    similarity[..., :num_prefix] = -math.inf
    best, dst = similarity.max(dim=-1)
    index = dst.unsqueeze(-1)
    x = x[:, :kept].scatter_reduce(1, index.expand(-1, -1, x.shape[-1]), x[:, kept:], reduce="mean")
    size = size[:, :kept].scatter_add(1, dst, size[:, kept:] * best)
    if sources is not None:
        sources = sources[:, :kept].scatter_reduce(
            1, index.expand(-1, -1, sources.shape[-1]), sources[:, kept:], reduce="amax"
        )
    return x, size, sources


register(
    Method(
        name="diffrate",
        summary=(
            "prune by class attention, then merge into the most similar kept token, per a DiffRate schedule "
            "(OpenGVLab/DiffRate; its schedule search, a training, is not included)"
        ),
        learned=False,
        build=DiffRateViT.from_vit,
        knob=Knob("strength", 0.0, 4.0, integer=False, cheaper="higher"),
        cost="schedule",
        defaults=lambda model: {"schedule": DEFAULT_SCHEDULE},
        reports=frozenset({"counts", "sources"}),
        needs_class_token=True,
        onnx="after a merge, torch 2.15's ONNX decomposition cannot view the output of attention with the size "
        "bias ('Cannot view a tensor'), as for ToMe",
        reference="OpenGVLab/DiffRate DiffRate/patch/deit.py, DiffRate/merge.py, compression_rate.json",
        released={"2.9 GFLOPs": {"schedule": "deit_s_2.9"}, "2.3 GFLOPs": {"schedule": "deit_s_2.3"}},
    )
)

__all__ = ["DEFAULT_SCHEDULE", "DEIT_S_SCHEDULES", "DiffRateViT", "merge_into_kept"]
