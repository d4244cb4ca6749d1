"""ATS: adaptive token sampling (Fayyaz et al., "Adaptive Token Sampler for Efficient Vision Transformers", ECCV 2022).

At chosen blocks, between attention and MLP, each patch token gets a significance score: the class
token's attention to it times the norm of its value, summed over heads and normalised to sum 1.
Sorting the scores and taking their cumulative sum gives a distribution function; inverting it at
K evenly spaced quantiles ``(j + 1/2) / K`` (deterministic, so repeatable in eval and train) picks up
to K tokens, and tokens picked twice collapse, so the kept number varies per image. An image whose
current token count is at most K keeps them all. Training-free.

Batches hold a padded set: every image keeps as many slots as the batch's largest kept set, and the
unused slots are masked out of every later attention with ``-inf`` on their keys (they receive no
attention, so their significance is 0 and no later stage picks them). ``run_blocks`` reports the real
counts per image, which is what an image costs on its own (batch 1 has no padding); see
:mod:`dynvit.reducers.cost` for the GFLOPs at those counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dynvit.models.dynamic_vit import gather_tokens
from dynvit.reducers.base import AttentionStats, ReducedRun, SelectionViT, key_bias, validate_loc


def significance(stats: AttentionStats, num_prefix: int = 1) -> torch.Tensor:
    """Significance (B, n) of the non-prefix tokens: ``Σ_h A_h[cls, j] · ‖v_h,j‖``, normalised to sum 1."""
    p = num_prefix
    score = (stats.cls_attn[..., p:] * stats.values[:, :, p:].norm(dim=-1)).sum(dim=1)
    return score / score.sum(dim=1, keepdim=True)


def inverse_transform_sample(significance: torch.Tensor, k: int) -> torch.Tensor:
    """Tokens (B, n) bool picked by inverting the sorted scores' CDF at quantiles ``(j + 1/2) / k``.

    A token is picked when some quantile falls into its CDF step, so at most k are picked, fewer
    where one token's step spans several quantiles; zero-score tokens are never picked.
    """
    order = significance.argsort(dim=1)
    cdf = significance.gather(1, order).cumsum(dim=1)
    quantiles = (torch.arange(k, device=cdf.device, dtype=cdf.dtype) + 0.5) / k
    # Scale to the actual total, so rounding in the normalisation cannot push a quantile past the end.
    pos = torch.searchsorted(cdf, quantiles * cdf[:, -1:]).clamp_max(cdf.shape[1] - 1)
    picked = order.gather(1, pos)
    # A tensor source, not a bool scalar: jit tracing (fvcore) has no scatter overload for the latter.
    return torch.zeros_like(significance, dtype=torch.bool).scatter(
        1, picked, torch.ones_like(picked, dtype=torch.bool)
    )


def sample_tokens(
    x: torch.Tensor, stats: AttentionStats, valid: torch.Tensor, k: int, num_prefix: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ATS stage on tokens x (B, P + n, C) of which ``valid`` (B, n) are real (the rest padding).

    Returns the new tokens (B, P + m, C) with m the batch's largest kept count — the P prefix tokens,
    kept tokens in their current order, then padding —, their positions (B, m) among the n, and which
    of them are real (B, m).
    """
    picked = inverse_transform_sample(significance(stats, num_prefix), k)
    keep = torch.where(valid.sum(dim=1, keepdim=True) <= k, valid, picked & valid)
    n = keep.shape[1]
    m = int(keep.sum(dim=1).max())
    arange = torch.arange(n, device=x.device)
    # Kept positions in ascending order first, the rest behind them; cut at the longest kept set.
    pos = torch.where(keep, arange, arange + n).argsort(dim=1)[:, :m]
    p = num_prefix
    return torch.cat([x[:, :p], gather_tokens(x[:, p:], pos)], dim=1), pos, keep.gather(1, pos)


class ATSViT(SelectionViT):
    """A timm ViT with adaptive token sampling at ``pruning_loc`` blocks.

    Build with ``apply_reducer(vit, "ats", max_tokens=K)``.
    """

    method = "ats"
    needs_class_token = True

    def configure(self, max_tokens: int | Sequence[int], pruning_loc: Sequence[int] | None = None) -> None:
        """Args:
        max_tokens: K, the most patch tokens a stage keeps (one int, or one per location). K at least
            the current count keeps everything.
        pruning_loc: Blocks with a sampler, acting after attention; by default every block from
            DynamicViT's first stage block on (3..11 of a 12-block ViT, the paper's blocks 4–12).
        """
        loc = tuple(range(self.default_loc()[0], len(self.blocks))) if pruning_loc is None else tuple(pruning_loc)
        validate_loc(loc, len(self.blocks), self.num_patches)
        ks = [max_tokens] * len(loc) if isinstance(max_tokens, int) else list(max_tokens)
        if len(ks) != len(loc) or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(
                f"max_tokens must be an int >= 1 or {len(loc)} of them (one per location {loc}), got {max_tokens!r}"
            )
        self.max_tokens, self.pruning_loc = tuple(ks), loc

    def run_blocks(self, x: torch.Tensor) -> ReducedRun:
        B, N, p = x.shape[0], self.num_patches, self.num_prefix_tokens
        index = torch.arange(N, device=x.device).expand(B, -1)  # original patch index; padding gets N
        valid = torch.ones(B, N, dtype=torch.bool, device=x.device)
        bias, kept, counts, stage = None, [], [], 0
        for i, block in enumerate(self.blocks):
            before = valid.sum(dim=1) + p
            if stage == len(self.pruning_loc) or i != self.pruning_loc[stage]:
                x = block(x, attn_mask=bias)
            else:
                x, stats = block.attend(x, bias=bias, cls_attn=True)
                x, pos, valid = sample_tokens(x, stats, valid, self.max_tokens[stage], p)
                index = torch.gather(index, 1, pos).masked_fill(~valid, N)
                kept.append(index)
                bias = None if bool(valid.all()) else key_bias(padding_bias(valid, x.dtype, p))
                x = block.feed_forward(x)
                stage += 1
            counts.append(torch.stack([before, valid.sum(dim=1) + p], dim=1))
        # Padding stands for no token: pooling heads give it no weight.
        sizes = None if bool(valid.all()) else torch.cat([valid.new_ones(B, p), valid], dim=1).to(x.dtype)
        return ReducedRun(tokens=x, kept=kept, counts=torch.stack(counts, dim=1), sizes=sizes)


def padding_bias(valid: torch.Tensor, dtype: torch.dtype, num_prefix: int = 1) -> torch.Tensor:
    """Additive key bias (B, P + m): 0 for the P prefix tokens and real tokens, ``-inf`` for padding."""
    bias = torch.zeros(valid.shape[0], valid.shape[1] + num_prefix, dtype=dtype, device=valid.device)
    real = torch.cat([valid.new_ones(valid.shape[0], num_prefix), valid], dim=1)
    return bias.masked_fill(real.logical_not(), -float("inf"))


__all__ = ["ATSViT", "inverse_transform_sample", "padding_bias", "sample_tokens", "significance"]
