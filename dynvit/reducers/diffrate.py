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

The released DeiT-S schedules are :data:`DEIT_S_SCHEDULES`; ``strength`` bends one to another cost
(``strength=0``: no reduction). DiffRate's contribution is the *search* for the schedule, and
:meth:`DiffRateViT.learn_rates` turns it on: every block after the first gets two
:class:`KeptCountDistribution` (pruning, merging): a categorical distribution over candidate kept
counts (every ``granularity``-th count), whose expectation, rounded up, is the block's count. In training
mode nothing is removed: tokens are sorted as in eval, pruned and merged ones are *masked* out of every
later attention (DynamicViT's masked softmax) by a 0/1 mask whose gradient is the distribution's keep
probability per position (straight-through), merged tokens are averaged into their destinations as in
eval, and :meth:`DiffRateViT.formula_flops` is DiffRate's differentiable FLOPs count. The search
objective, cross-entropy + 5·(GFLOPs − target)², is the fine-tuned track's ``diffrate`` objective
(:mod:`dynvit.lightning.finetune`). In eval the model runs the counts the distributions give, as
DiffRate deploys a searched schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dynvit.methods import Knob, Method, register
from dynvit.models.checkpoint import CheckpointMismatch, register_layout
from dynvit.models.dynamic_vit import input_size
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


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """``hard``'s value with ``soft``'s gradient (DiffRate's straight-through ceil, min and masks)."""
    return hard.detach() + (soft - soft.detach())


class KeptCountDistribution(nn.Module):
    """DiffRate's differentiable discrete proxy for one block's pruning or merging.

    A categorical distribution (softmax of :attr:`logits`, zeros at start: uniform, as DiffRate starts)
    over the candidate kept patch counts ``N, N − g, N − 2g, …`` (g the granularity). The block keeps
    ``ceil(E[count]) + P`` tokens (P prefix tokens), with the gradient of the expectation.
    """

    def __init__(self, num_patches: int, num_prefix: int, granularity: int) -> None:
        super().__init__()
        self.num_prefix, self.num_patches = num_prefix, num_patches
        candidates = torch.arange(num_patches, 0, -granularity, dtype=torch.float32)
        self.register_buffer("candidates", candidates, persistent=False)
        self.logits = nn.Parameter(torch.zeros_like(candidates))

    def expected_kept(self) -> torch.Tensor:
        """Tokens kept, prefix tokens included: ``ceil(E[count]) + P`` as a 0-d tensor with E's gradient."""
        expected = self.candidates @ self.logits.softmax(dim=-1)
        return straight_through(torch.ceil(expected), expected) + self.num_prefix

    def kept(self) -> int:
        """Tokens kept, prefix tokens included, as the model runs in eval."""
        with torch.no_grad():
            return int(self.expected_kept())

    def keep_mask(self, kept: int, upto: int) -> torch.Tensor:
        """A mask over the P + N sorted positions: 0 on ``[kept, upto)``, 1 elsewhere, with the gradient of the
        probability that each position is kept (the probability mass of the candidates that reach it)."""
        positions = torch.arange(self.num_prefix + self.num_patches, device=self.logits.device)
        reach = positions[None, :] < self.candidates[:, None] + self.num_prefix
        probability = self.logits.softmax(dim=-1) @ reach.to(self.logits.dtype)
        hard = torch.ones_like(probability)
        hard[kept:upto] = 0.0
        return straight_through(hard, probability)


class DiffRateViT(TracedMergingViT):
    """A timm ViT that prunes and merges tokens by a DiffRate schedule in every block.

    Build with ``DiffRateViT.from_vit(vit, schedule="deit_s_2.9")`` or with explicit ``prune_kept_num`` and
    ``merge_kept_num`` lists; ``predict_with_sources`` shows which patches each token stands for. In
    training mode it reduces as in eval (so the backbone can be fine-tuned at a schedule), until
    :meth:`learn_rates` starts DiffRate's search: from then on the rates set the schedule, and training mode
    is DiffRate's own forward, which keeps every token and masks the reduced ones.
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
        if "prune_rates" not in self._modules:
            self.prune_rates: nn.ModuleList | None = None
            self.merge_rates: nn.ModuleList | None = None

    def learn_rates(self, granularity: int = 4) -> None:
        """Give every block after the first learnable kept-count distributions for pruning and merging (DiffRate's
        search; the first block keeps every token, as in DiffRate), which set the schedule from now on.

        Args:
            granularity: Gap between candidate kept counts (DiffRate's default 4 on DeiT's 196 patches).
        """
        if (
            isinstance(granularity, bool)
            or not isinstance(granularity, int)
            or not 1 <= granularity <= self.num_patches
        ):
            raise ValueError(
                f"granularity is the gap between candidate kept counts, an int in [1, {self.num_patches}] for this "
                f"model's {self.num_patches} patches, got {granularity!r}"
            )
        p, n, device = self.num_prefix_tokens, self.num_patches, self.cls_token.device
        self.prune_rates = nn.ModuleList(KeptCountDistribution(n, p, granularity) for _ in self.blocks[1:]).to(device)
        self.merge_rates = nn.ModuleList(KeptCountDistribution(n, p, granularity) for _ in self.blocks[1:]).to(device)
        self.new_param_prefixes = ("prune_rates.", "merge_rates.")
        self._counts_key: tuple | None = None

    def kept_counts(self) -> tuple[list[int], list[int]]:
        """(prune_kept_num, merge_kept_num): the configured schedule, or the one the learned rates give."""
        if self.prune_rates is None:
            return self.prune_kept_num, self.merge_kept_num
        if torch.compiler.is_compiling() and self._counts_key is not None:
            # A compiled graph bakes the counts in, as read when the model last entered eval mode.
            return list(self._counts[0]), list(self._counts[1])
        # Read once per change of the rates (an optimiser step or a loaded state bumps their version), not in
        # every eval forward, where ~10 small ops per block would show in a small model's batch-1 latency.
        rates = [*self.prune_rates, *self.merge_rates]
        key = tuple((id(d.logits), d.logits._version) for d in rates)
        if self._counts_key != key:
            full = [self.num_patches + self.num_prefix_tokens]
            depth = len(self.prune_rates)
            kept = [d.kept() for d in rates]
            self._counts_key, self._counts = key, (full + kept[:depth], full + kept[depth:])
        return list(self._counts[0]), list(self._counts[1])

    def train(self, mode: bool = True) -> DiffRateViT:
        super().train(mode)
        if not mode and self.prune_rates is not None:
            self.kept_counts()  # read the learned counts now, outside any compiled graph
        return self

    def token_schedule(self) -> list[tuple[int, int]]:
        # A count above the tokens left changes nothing, as in DiffRate (its slicing keeps what there is).
        counts, n = [], self.num_patches + self.num_prefix_tokens
        for p, m in zip(*self.kept_counts(), strict=True):
            counts.append((n, min(n, p, m)))
            n = counts[-1][1]
        return counts

    def formula_flops(self, kept_after: Sequence[int] | None = None) -> torch.Tensor:
        """DiffRate's FLOPs count (multiply-adds, as its ``calculate_flop_training``): per block ``4NC² + 2N²C`` in
        attention for the N tokens entering it and ``2NC·hidden`` in the MLP for the N left after pruning and
        merging, plus patch embedding (N with prefix tokens, as DiffRate; a conv stem counted as one patchify
        convolution) and classifier.

        Args:
            kept_after: Tokens left after each block (prefix tokens included). None: the learned rates' counts,
                differentiable in them (the N after a block is a straight-through min of its two counts, whose
                gradient goes to both, as in DiffRate).
        """
        if kept_after is None and self.prune_rates is None:
            raise ValueError("formula_flops without kept_after counts a learned schedule: call learn_rates() first")
        c, patch = self.embed_dim, self.patch_embed.patch_size
        n = torch.tensor(float(self.num_patches + self.num_prefix_tokens), device=self.cls_token.device)
        flops = n * c * patch[0] * patch[1] * input_size(self)[0] + c * self.num_classes
        rates = [None, *zip(self.prune_rates, self.merge_rates, strict=True)] if kept_after is None else None
        for i, block in enumerate(self.blocks):
            flops = flops + 4 * n * c * c + 2 * n * n * c
            if kept_after is not None:
                n = torch.full_like(n, kept_after[i])
            elif rates[i] is not None:
                prune, merge = (d.expected_kept() for d in rates[i])
                n = straight_through(torch.minimum(n, torch.minimum(prune, merge)), prune + merge)
            flops = flops + 2 * n * c * block.mlp.fc1.out_features
        return flops

    def trace(self, x: torch.Tensor, track_sources: bool = False) -> TracedRun:
        if self.training and self.prune_rates is not None:
            if track_sources:
                raise ValueError("sources are traced in eval; the rate search's training forward masks tokens")
            return TracedRun(self._search_run(x), None)
        prefix = self.num_prefix_tokens
        sources = initial_sources(x, prefix) if track_sources else None
        size = None  # all ones until the first merge: no bias until then
        per_block = []
        for block, (n, m), prune in zip(self.blocks, self.token_schedule(), self.kept_counts()[0], strict=True):
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

    def _search_run(self, x: torch.Tensor) -> ReducedRun:
        """DiffRate's training forward: every token stays; the pruned and merged ones are masked out of later
        attention by the rates' straight-through masks, which is how cross-entropy reaches the rates."""
        B, prefix = x.shape[0], self.num_prefix_tokens
        size = x.new_ones(x.shape[:2])
        mask = x.new_ones(x.shape[:2])
        left = x.shape[1]  # tokens not masked: the first ``left`` after every sort
        rates = [None, *zip(self.prune_rates, self.merge_rates, strict=True)]
        for block, block_rates in zip(self.blocks, rates, strict=True):
            x, stats = block.attend(x, bias=key_bias(size.log()), cls_attn=True, keep=mask)
            # Masked tokens get (almost) no attention, so they sort behind every token still in play.
            ranked = stats.cls_attn.mean(dim=1)[:, prefix:].sort(dim=1, descending=True).indices + prefix
            order = torch.cat([torch.arange(prefix, device=x.device).expand(B, -1), ranked], dim=1)
            x, size, mask = gather_tokens(x, order), torch.gather(size, 1, order), torch.gather(mask, 1, order)
            if block_rates is not None:
                prune, merge = block_rates
                kept = int(prune.expected_kept().detach())
                if kept < left:
                    mask = mask * prune.keep_mask(kept, left)
                mid = min(left, kept)
                kept = int(merge.expected_kept().detach())
                if kept < mid:
                    x, size = merge_masked(x, size, kept, mid, prefix)
                    mask = mask * merge.keep_mask(kept, mid)
                left = min(mid, kept)
            x = block.feed_forward(x)
        return ReducedRun(tokens=x, kept=[], counts=self.schedule_counts(x), sizes=size)


@torch.no_grad()
def merge_destinations(x: torch.Tensor, kept: int, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every token of x (B, n, C) past the first ``kept``: its highest cosine similarity to one of them and
    that one's position (B, n − kept), the ``num_prefix`` first excluded. Without gradient, as DiffRate matches."""
    metric = x / x.norm(dim=-1, keepdim=True)
    similarity = metric[:, kept:] @ metric[:, :kept].transpose(-2, -1)
    similarity[..., :num_prefix] = -math.inf
    return similarity.max(dim=-1)


def merge_masked(
    x: torch.Tensor, size: torch.Tensor, kept: int, mid: int, num_prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffRate's training-mode merge: tokens ``[kept, mid)`` of x (B, n, C) are averaged into their most
    similar among the first ``kept`` (as :func:`merge_into_kept`) but stay in place, to be masked.

    Sizes (B, n): a merged token's ``size × similarity``, at least 1 (DiffRate clamps in training), is added
    to its destination's and stays its own.
    """
    best, dst = merge_destinations(x[:, :mid], kept, num_prefix)
    index = dst.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    head = x[:, :kept].scatter_reduce(1, index, x[:, kept:mid], reduce="mean")
    moved = torch.cat([size[:, :kept], size[:, kept:mid] * best], dim=1).clamp(min=1)
    size = torch.cat([moved[:, :kept].scatter_add(1, dst, moved[:, kept:]), moved[:, kept:], size[:, mid:]], dim=1)
    return torch.cat([head, x[:, kept:]], dim=1), size


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
    best, dst = merge_destinations(x, kept, num_prefix)
    index = dst.unsqueeze(-1)
    x = x[:, :kept].scatter_reduce(1, index.expand(-1, -1, x.shape[-1]), x[:, kept:], reduce="mean")
    size = size[:, :kept].scatter_add(1, dst, size[:, kept:] * best)
    if sources is not None:
        sources = sources[:, :kept].scatter_reduce(
            1, index.expand(-1, -1, sources.shape[-1]), sources[:, kept:], reduce="amax"
        )
    return x, size, sources


def diffrate_layout(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """DiffRate's checkpoint layout (its search's ``checkpoint.pth``) → dynvit's: ``blocks.{i}.prune_ddp.
    selected_probability`` becomes ``prune_rates.{i-1}.logits`` (likewise merging); block 0's single-candidate
    logits and every ``kept_token_candidate`` (the candidates follow from the granularity) are dropped. dynvit's
    own layout passes unchanged.

    Raises:
        CheckpointMismatch: the checkpoint holds searched rates and ``model`` none, or rates of another granularity.
    """
    out = {}
    candidates = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[0] == "blocks" and parts[2] in ("prune_ddp", "merge_ddp"):
            block, kind = int(parts[1]), parts[2].split("_")[0]
            if parts[3] == "kept_token_candidate":
                candidates[block] = value
            elif block > 0:
                out[f"{kind}_rates.{block - 1}.logits"] = value
        else:
            out[key] = value
    if candidates:
        found = [c for b, c in sorted(candidates.items()) if b > 0 and len(c) > 1]
        granularity = int(found[0][0] - found[0][1]) if found else None
        if model.prune_rates is None or (
            granularity is not None and len(model.prune_rates[0].candidates) != len(found[0])
        ):
            raise CheckpointMismatch(
                f"this checkpoint holds DiffRate's searched rates (granularity {granularity}), and this "
                f"{type(model).__name__} {'has none' if model.prune_rates is None else 'has rates of another granularity'}: "
                f"call model.learn_rates({granularity}) before loading it"
            )
    return out


register_layout(DiffRateViT, diffrate_layout)

register(
    Method(
        name="diffrate",
        summary=(
            "prune by class attention, then merge into the most similar kept token, per a DiffRate schedule: "
            "a released one, or searched by fine-tuning with its FLOPs constraint (OpenGVLab/DiffRate)"
        ),
        learned=False,
        objective="diffrate",
        build=DiffRateViT.from_vit,
        knob=Knob("strength", 0.0, 4.0, integer=False, cheaper="higher"),
        cost="schedule",
        defaults=lambda model: {"schedule": DEFAULT_SCHEDULE},
        reports=frozenset({"counts", "sources"}),
        needs_class_token=True,
        onnx="after a merge, torch 2.15's ONNX decomposition cannot view the output of attention with the size "
        "bias ('Cannot view a tensor'), as for ToMe",
        reference="OpenGVLab/DiffRate DiffRate/patch/deit.py, DiffRate/ddp.py, DiffRate/merge.py, engine.py, "
        "compression_rate.json",
        released={"2.9 GFLOPs": {"schedule": "deit_s_2.9"}, "2.3 GFLOPs": {"schedule": "deit_s_2.3"}},
    )
)

__all__ = [
    "DEFAULT_SCHEDULE",
    "DEIT_S_SCHEDULES",
    "DiffRateViT",
    "KeptCountDistribution",
    "diffrate_layout",
    "merge_destinations",
    "merge_into_kept",
    "merge_masked",
]
