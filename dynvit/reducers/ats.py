"""ATS: adaptive token sampling (Fayyaz et al., "Adaptive Token Sampler for Efficient Vision Transformers", ECCV 2022).

As the authors' code (``adaptivetokensampling/ATS``) does it, at chosen blocks, between attention and MLP:

1. every patch token gets a significance score: the class token's attention to it, summed over the
   heads, times the norm of its whole value vector (all heads concatenated); the scores are
   normalised to sum 1;
2. the scores are sorted ascending and their cumulative sum is min-max normalised to [0, 1];
3. K fixed, evenly spaced points from the smallest positive value of that curve up to 1 are inverted:
   each picks the token whose normalised cumulative value is nearest (the first one on ties);
4. tokens picked more than once count once, so an image keeps at most K patch tokens and usually
   fewer: the count adapts to the image. The class token always stays. The least significant token
   sits at 0 on the normalised curve, below the first point, so it is never picked.

The authors' configuration samples K = the number of input patch tokens (196 for DeiT-S) in every
block from the 4th on; that is ``max_tokens``' default. Deterministic, so eval and train agree;
training-free. docs/reference.md ("Fidelity") lists where other implementations depart from this.

Removed tokens: the authors' code either keeps them as zero rows (``DROP_TOKENS: False``, its default)
or drops them and pads the batch (``True``, its DeiT-S evaluation config). Their zero scores change the
CDF's minimum, so the two give different samples after the first stage; ``drop_tokens`` picks which
one dynvit reproduces. The default, False, makes every image's result independent of its batch.

Batches hold a padded set: every image keeps as many slots as the batch's largest kept set, and the
unused slots are masked out of every later attention with ``-inf`` on their keys (they receive no
attention, so their significance is 0 and no later stage picks them). ``run_blocks`` reports the real
counts per image, which is what an image costs on its own (batch 1 has no padding); see
:mod:`dynvit.reducers.cost` for the GFLOPs at those counts. Other prefix tokens (distillation, register
tokens) stay like the class token; a ViT without a class token is refused, since ATS scores by its attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dynvit.methods import Knob, Method, register
from dynvit.models.tokens import validate_loc
from dynvit.reducers.base import AttentionStats, ReducedViT, TokenState


def significance(stats: AttentionStats, num_prefix: int = 1) -> torch.Tensor:
    """Significance (B, n) of the non-prefix tokens: ``(Σ_h A_h[cls, j]) · ‖v_j‖``, normalised to sum 1.

    ``v_j`` is token j's whole value vector, every head's part concatenated.
    """
    B, H, N, D = stats.values.shape
    value_norm = stats.values.transpose(1, 2).reshape(B, N, H * D).norm(dim=-1)
    score = (stats.cls_attn.sum(dim=1) * value_norm)[:, num_prefix:]
    return score / score.sum(dim=1, keepdim=True)


def sample_points(normalized_cdf: torch.Tensor, k: int) -> torch.Tensor:
    """The k evenly spaced points (B, k) from the smallest positive value of each curve up to 1.

    Written as the authors' code computes them (a linspace over [0, 1] moved onto [start, 1]), so the
    points agree to the last bit. One point is the end point 1: the most significant token.
    """
    B = normalized_cdf.shape[0]
    if k == 1:
        return normalized_cdf.new_ones(B, 1)
    grid = torch.linspace(0, 1, k, device=normalized_cdf.device, dtype=normalized_cdf.dtype).expand(B, -1)
    start = (normalized_cdf + (normalized_cdf == 0).to(normalized_cdf.dtype) * 1e8).min(dim=1, keepdim=True).values
    steps = torch.arange(k, device=normalized_cdf.device, dtype=normalized_cdf.dtype).expand(B, -1)
    return start + ((grid * (k - 1)) - start * steps) / (k - 1)


def inverse_transform_sample(
    significance: torch.Tensor, k: int, zero_floor: torch.Tensor | None = None
) -> torch.Tensor:
    """Tokens (B, n) bool picked by inverting the sorted, min-max normalised CDF at k evenly spaced points.

    Each point picks the token whose normalised cumulative value is nearest; a token picked several
    times counts once, so at most k are picked. Zero-score tokens (padding) are never picked.

    Args:
        zero_floor: (B, 1) bool: the authors' sequence for this image also holds zero-score tokens that
            are not in ``significance`` (removed ones, when tokens are not dropped), so the CDF's minimum is 0.
    """
    sorted_scores, order = significance.sort(dim=1, stable=True)
    cdf = sorted_scores.cumsum(dim=1)
    low, high = cdf.min(dim=1, keepdim=True).values, cdf.max(dim=1, keepdim=True).values
    if zero_floor is not None:
        low = torch.where(zero_floor, torch.zeros_like(low), low)
    span = high - low
    # One token (or one with all the mass at the bottom) has a flat curve: it is the token to keep.
    normalized = torch.where(span > 0, (cdf - low) / torch.where(span > 0, span, 1.0), 1.0)
    points = sample_points(normalized, k)
    # Nearest curve value for each point; argmin returns the first index on ties, as the authors' min.
    nearest = (points.unsqueeze(2) - normalized.unsqueeze(1)).abs().argmin(dim=2)
    picked = order.gather(1, nearest)
    # A tensor source, not a bool scalar: jit tracing (fvcore) has no scatter overload for the latter.
    return torch.zeros_like(significance, dtype=torch.bool).scatter(
        1, picked, torch.ones_like(picked, dtype=torch.bool)
    )


def sample_positions(
    stats: AttentionStats, valid: torch.Tensor, k: int, zero_floor: torch.Tensor | None = None, num_prefix: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ATS stage's choice among n non-prefix tokens of which ``valid`` (B, n) are real (the rest padding).

    Returns the positions (B, m) to keep, m the batch's largest kept count — kept positions in their current
    order, then padding —, and which of them are real (B, m). ``zero_floor``: see :func:`inverse_transform_sample`.
    """
    keep = inverse_transform_sample(significance(stats, num_prefix), k, zero_floor) & valid
    n = keep.shape[1]
    m = int(keep.sum(dim=1).max())
    arange = torch.arange(n, device=keep.device)
    # Kept positions in ascending order first, the rest behind them; cut at the longest kept set.
    pos = torch.where(keep, arange, arange + n).argsort(dim=1)[:, :m]
    return pos, keep.gather(1, pos)


class ATSViT(ReducedViT):
    """A timm ViT with adaptive token sampling at ``pruning_loc`` blocks.

    Build with ``apply_reducer(vit, "ats")`` (the authors' setting) or ``apply_reducer(vit, "ats", max_tokens=K)``.
    """

    method = "ats"
    class_attention = True

    def configure(
        self,
        max_tokens: int | Sequence[int] | None = None,
        pruning_loc: Sequence[int] | None = None,
        drop_tokens: bool = False,
    ) -> None:
        """Args:
        max_tokens: K, the points sampled and so the most patch tokens a stage keeps (one int, or one
            per location). ``None``: the number of patch tokens of the input (196 for a 224² DeiT), the
            authors' configuration. Even then a stage drops tokens (duplicates, and the least
            significant one): ATS has no setting that keeps everything.
        pruning_loc: Blocks with a sampler, acting after attention; by default every block from
            DynamicViT's first stage block on (3..11 of a 12-block ViT, the paper's blocks 4–12).
        drop_tokens: The authors' ``DROP_TOKENS``. False (their code's default): removed tokens stay as
            zero rows, so after an image's first removal every CDF it samples from has minimum 0, whatever
            the batch. True (their DeiT-S evaluation config): removed tokens leave, and only the padding of
            a batch adds zero scores, so an image's later samples depend on the images beside it (one
            image at a time has none). Both cost the same.
        """
        loc = _at_stages(self.default_loc(), len(self.blocks))["pruning_loc"] if pruning_loc is None else pruning_loc
        loc = validate_loc(loc, len(self.blocks))
        if max_tokens is None:
            max_tokens = self.num_patches
        ks = list(max_tokens) if isinstance(max_tokens, Sequence) else [max_tokens] * len(loc)
        if len(ks) != len(loc) or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(
                f"max_tokens must be an int >= 1 or {len(loc)} of them (one per location {loc}), got {max_tokens!r}"
            )
        self.max_tokens, self.pruning_loc, self.drop_tokens = tuple(ks), loc, bool(drop_tokens)

    def start(self, state: TokenState) -> None:
        # Padding has size 0, which proportional attention turns into -inf on its keys: hidden from attention.
        state.valid = state.index.new_ones(state.index.shape, dtype=torch.bool)
        state.proportional = True

    def acts_between(self, i: int) -> bool:
        return i in self.pruning_loc

    def between(self, i: int, x: torch.Tensor, stats: AttentionStats, state: TokenState) -> torch.Tensor:
        N, p = self.num_patches, self.num_prefix_tokens
        # Without dropping, the removed tokens' zero rows are still in the authors' sequence.
        floor = None if self.drop_tokens else (state.valid.sum(dim=1, keepdim=True) < N)
        pos, valid = sample_positions(stats, state.valid, self.max_tokens[self.pruning_loc.index(i)], floor, p)
        x = state.select(x, pos)
        state.valid, state.index = valid, state.index.masked_fill(~valid, N)
        # Padding stands for no token: proportional attention hides it, pooling heads give it no weight.
        state.sizes = (
            None if bool(valid.all()) else torch.cat([valid.new_ones(x.shape[0], p), valid], dim=1).to(x.dtype)
        )
        state.mark_stage()
        return x


def _at_stages(stages: tuple[int, ...], depth: int) -> dict[str, tuple[int, ...]]:
    """Samplers in every block from the first stage block on, as the ATS paper places them."""
    return {"pruning_loc": tuple(range(stages[0], depth))}


register(
    Method(
        name="ats",
        summary="sample up to K tokens by class attention × value norm; the count adapts to the image (ATS)",
        learned=False,
        build=ATSViT.from_vit,
        knob=Knob("max_tokens", 1, lambda vit: vit.patch_embed.num_patches, integer=True, short="K"),
        cost="images",
        at_stages=_at_stages,
        reports=frozenset({"counts", "masks"}),
        needs_class_token=True,
        onnx="it keeps a different number of tokens per image, so its batch holds as many slots as the largest "
        "kept set: a data-dependent size torch.export refuses",
        reference="adaptivetokensampling/ATS",
        released={"K=N": {}},
    )
)

__all__ = ["ATSViT", "inverse_transform_sample", "sample_points", "sample_positions", "significance"]
