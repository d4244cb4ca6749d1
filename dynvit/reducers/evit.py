"""EViT (Liang et al., "Not All Patches are What You Need", ICLR 2022) and its fusion-free variant, top-k.

At chosen blocks, between attention and MLP, the non-class tokens are ranked by the class token's
attention (mean over heads) in that block; the top ``ceil(keep_rate · n)`` of the n current ones
stay and the MLP runs on them. EViT also fuses the dropped tokens into one token appended after the
kept ones, ``Σ_dropped a_i x_i`` with a the head-averaged class attention as the softmax gave it (not
renormalised over the dropped set: the official ``youweiliang/evit`` code); at a later stage that fused
token is ranked like any other (and fused again if dropped). ``fusion="dynvit_mean"`` fuses the
attention-weighted *mean* instead (dynvit's earlier variant, kept as an option). Top-k just drops them.
No parameters are added; EViT is meant to be fine-tuned, top-k is used training-free. Prefix tokens
(distillation, register tokens) are kept like the class token; a ViT without a class token is refused,
since the method ranks by its attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dynvit.methods import Knob, Method, locations, register
from dynvit.models.tokens import validate_loc
from dynvit.reducers.base import AttentionStats, ReducedViT, TokenState, validate_rate

# How EViT fuses the dropped tokens: the official sum weighted by raw class attention, or dynvit's
# attention-weighted mean (the same weights renormalised to sum to 1 over the dropped tokens).
FUSIONS = ("official", "dynvit_mean")


def attentive_count(keep_rate: float, num_tokens: int) -> int:
    """Tokens kept out of ``num_tokens``: ``ceil(keep_rate · num_tokens)``, so at least one stays.

    The float product as the official EViT takes it (``math.ceil(keep_rate * (N - 1))``), float noise
    included: 0.55 · 100 is 55.00000000000001, so 56 of 100 tokens stay, as there.
    """
    return math.ceil(keep_rate * num_tokens)


def attentive_positions(cls_attn: torch.Tensor, keep: int, num_prefix: int = 1) -> torch.Tensor | None:
    """Positions (B, keep), ascending, of the ``keep`` non-prefix tokens the class token attends to most
    (``cls_attn`` (B, P + n), averaged over heads); None when ``keep >= n`` keeps them all."""
    scores = cls_attn[:, num_prefix:]
    if keep >= scores.shape[1]:
        return None
    return scores.topk(keep, dim=1).indices.sort(dim=1).values


def fused_token(
    x: torch.Tensor, cls_attn: torch.Tensor, top: torch.Tensor, fusion: str, num_prefix: int = 1
) -> torch.Tensor:
    """EViT's token (B, 1, C) made of the non-prefix tokens of x (B, P + n, C) not at positions ``top``:
    ``"official"``: ``Σ_dropped a_i x_i`` with a the class attention as the softmax gave it;
    ``"dynvit_mean"``: the same weights renormalised to sum 1 over the dropped tokens."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS} or None, got {fusion!r}")
    weight = cls_attn[:, num_prefix:].scatter(1, top, 0.0)  # attention of the dropped tokens, zero on the kept
    if fusion == "dynvit_mean":
        weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
    return (weight.unsqueeze(-1) * x[:, num_prefix:]).sum(dim=1, keepdim=True)


def attentive_schedule(
    num_patches: int, depth: int, keep_rate: float, pruning_loc: Sequence[int], fuse: bool, num_prefix: int = 1
) -> list[tuple[int, int]]:
    """Tokens (prefix tokens included) in attention and MLP of every block for EViT / top-k."""
    counts, n = [], num_patches
    for i in range(depth):
        before = n
        if i in pruning_loc:
            keep = attentive_count(keep_rate, n)
            n = keep + (fuse and keep < n)
        counts.append((before + num_prefix, n + num_prefix))
    return counts


class AttentiveViT(ReducedViT):
    """A timm ViT that keeps the class token's most attended tokens at ``pruning_loc`` blocks.

    Build with ``apply_reducer(vit, "evit", keep_rate=0.7)`` or ``"topk"``.
    """

    fusion: str | None = None  # EViT's fused token (see FUSIONS); None drops the rest
    class_attention = True

    @property
    def fuse(self) -> bool:
        """Whether the dropped tokens are fused into one extra token."""
        return self.fusion is not None

    def configure(self, keep_rate: float = 0.7, pruning_loc: Sequence[int] | None = None) -> None:
        """Args:
        keep_rate: Fraction in (0, 1] of the current non-class tokens kept at each stage (rounded up).
        pruning_loc: Blocks in which tokens are reduced, after attention; by default DynamicViT's
            stage blocks (3, 6, 9 for a 12-block ViT, EViT's 4th, 7th and 10th).
        """
        validate_rate("keep_rate", keep_rate)
        loc = validate_loc(self.default_loc() if pruning_loc is None else pruning_loc, len(self.blocks))
        self.keep_rate, self.pruning_loc = float(keep_rate), loc

    def token_schedule(self) -> list[tuple[int, int]]:
        return attentive_schedule(
            self.num_patches, len(self.blocks), self.keep_rate, self.pruning_loc, self.fuse, self.num_prefix_tokens
        )

    def acts_between(self, i: int) -> bool:
        return i in self.pruning_loc

    def between(self, i: int, x: torch.Tensor, stats: AttentionStats, state: TokenState) -> torch.Tensor:
        # The current count from the schedule: a Python int, even under jit tracing.
        n = self.token_schedule()[i][0] - self.num_prefix_tokens
        cls_attn = stats.cls_attn.mean(dim=1)
        top = attentive_positions(cls_attn, attentive_count(self.keep_rate, n), self.num_prefix_tokens)
        if top is not None:  # else nothing is dropped, and nothing fused
            kept = state.select(x, top)
            x = (
                kept
                if self.fusion is None
                else state.append(kept, fused_token(x, cls_attn, top, self.fusion, self.num_prefix_tokens))
            )
        state.mark_stage()
        return x


class EViT(AttentiveViT):
    """EViT: :class:`AttentiveViT` plus one fused token made of the dropped ones."""

    method = "evit"

    def configure(
        self, keep_rate: float = 0.7, pruning_loc: Sequence[int] | None = None, fusion: str = "official"
    ) -> None:
        """Args:
        keep_rate, pruning_loc: As :meth:`AttentiveViT.configure`.
        fusion: ``"official"``: the fused token is ``Σ_dropped a_i x_i`` with the raw head-averaged class
            attention a, as the official EViT; ``"dynvit_mean"``: the a-weighted mean of the dropped tokens
            (dynvit's variant, docs/reference.md "Fidelity").
        """
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        super().configure(keep_rate, pruning_loc)
        self.fusion = fusion


class TopKViT(AttentiveViT):
    """Attention top-k: EViT's selection without the fused token, training-free."""

    method = "topk"


# EViT and top-k share everything but the fused token: the knob, where they act, what they report.
ATTENTIVE = dict(
    learned=False,
    knob=Knob("keep_rate", 0.0, 1.0),
    cost="schedule",
    at_stages=locations("pruning_loc"),
    reports=frozenset({"counts", "masks"}),
    needs_class_token=True,
)
register(
    Method(
        name="evit",
        summary="keep the tokens the class token attends to most, fuse the rest into one token (EViT)",
        build=EViT.from_vit,
        fine_tuned_in_paper=True,
        reference="youweiliang/evit evit.py",
        **ATTENTIVE,
        released={"keep 0.7": {"keep_rate": 0.7}},
    )
)
register(
    Method(
        name="topk",
        summary="keep the tokens the class token attends to most, drop the rest (EViT without fusion)",
        build=TopKViT.from_vit,
        reference="JoakimHaurum/TokenReduction models/topk.py",
        **ATTENTIVE,
        released={"keep 0.7": {"keep_rate": 0.7}},
    )
)

__all__ = [
    "FUSIONS",
    "AttentiveViT",
    "EViT",
    "TopKViT",
    "attentive_count",
    "attentive_positions",
    "attentive_schedule",
    "fused_token",
]
