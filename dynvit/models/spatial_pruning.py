"""Dynamic spatial sparsification (DynamicViT journal version): what ConvNeXt and Swin students share.

A hierarchical backbone is pruned in one stage, its third (the longest). Keep predictors before
chosen blocks of that stage score every location of the stage's full map; the ratios are
``[ρ, ρ − 0.2, ρ − 0.4]``, each a share of the full map (not cumulative). The map never shrinks: a
block's spatial mixer (depthwise conv, window attention) runs on every location, its MLP (the *slow
path*) only on kept ones, and a cheap *fast path* on the rest.

- **Training** carries two full maps, a slow and a fast stream, blended by the hard Gumbel mask of the
  latest predictor, so shapes stay fixed and gradients reach the predictors
  (:meth:`SpatialPruningStage.run_streams`).
- **Inference** ranks the locations by their keep log-odds, runs the slow path on the top
  ``int(N · ratio)`` and the fast path on the rest, and scatters both back into the dense map
  (:meth:`SpatialPruningStage.run_split`, :func:`split_apply`). Later stages, the head, and dense
  consumers (``forward_intermediates``, ``features_only``) see an ordinary map.

How a backbone plugs in (``dynvit.models.dynamic_convnext`` is the worked example):

1. **Block.** A subclass of the backbone's block, converted in place by ``convert(block)``, that adds
   the fast path and implements the two methods the stage calls on blocks from the first pruning
   location on: ``forward_streams(slow, fast, mask) -> (slow, fast)`` (training; ``mask`` is the keep
   decision shaped to broadcast over the map) and ``forward_split(x, order, count) -> x`` (inference;
   use :func:`split_apply` for the gather/scatter). Its ``new_param_names`` name the fast path's
   parameters (prefixes within the block), which train at the full learning rate.
2. **Stage.** ``class PrunedStage(SpatialPruningStage, BackboneStage)`` with ``pruned_block`` (the
   block class above) and ``channels_last`` (the layout of the map the blocks see: False for NCHW
   as in ConvNeXt, True for NHWC as in timm's Swin). The backbone stage needs ``downsample`` and
   ``blocks``. :meth:`SpatialPruningStage.convert` turns a built stage into it in place; its
   ``forward`` then prunes, so the backbone's own forwards (and timm's feature wrappers) prune too.
3. **Model.** ``class DynamicX(SpatialPruningStudent, Backbone)`` with ``pruned_stage_name`` (the
   stage's module path, e.g. ``"stages.2"``) and two methods: ``forward_pruned(x, inference)`` (image →
   features before the head, plus what the pruned stage returned) and ``distilled_map(features)`` (the
   final feature map after the final norm, which the loss compares with the teacher's). The mixin
   gives ``keep_ratio``, ``stage_keep_ratios``, ``stage_keep_counts``, ``pruning_loc``,
   ``predict_with_masks``, ``mask_grid``, ``new_param_prefixes``, ``start_predictors_at_target``, and a
   ``forward`` returning :class:`SpatialOutput` in training and logits in eval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dynvit.models.dynamic_vit import init_predictor
from dynvit.models.predictor import KeepPredictor
from dynvit.models.tokens import top_indices

# Each pruning stage keeps this much less of the full map than the one before: [ρ, ρ − 0.2, ρ − 0.4].
RATIO_STEP = 0.2


class SpatialOutput(NamedTuple):
    """What a hierarchical student returns in training mode.

    Attributes:
        logits: Class logits (B, num_classes).
        features: The final feature map after the final norm, in the backbone's layout (ConvNeXt
            (B, C, H, W), Swin (B, H, W, C)), for feature-map distillation.
        decisions: Hard keep decisions of every pruning stage over the stage-3 locations, each (B, N)
            row-major, differentiable (straight-through Gumbel), for the keep-ratio loss.
    """

    logits: torch.Tensor
    features: torch.Tensor
    decisions: list[torch.Tensor]


def keep_schedule(keep_ratio: float, num_stages: int) -> list[float]:
    """Target share of the full map kept at each pruning stage: ``ρ − 0.2 · s``.

    Written as the reference writes it (``ρ − 0.2``, ``ρ − 0.4`` in floating point), so that
    ``int(N · ratio)`` gives the counts released checkpoints were measured with (97 of 196 at
    ρ = 0.7, stage 2: ``0.7 − 0.2`` is just below 0.5).
    """
    return [keep_ratio - RATIO_STEP * s for s in range(num_stages)]


def keep_location_counts(num_locations: int, keep_ratio: float, num_stages: int) -> list[int]:
    """Locations on the slow path at each pruning stage: ``int(N · (ρ − 0.2 · s))``."""
    return [int(num_locations * r) for r in keep_schedule(keep_ratio, num_stages)]


def validate_spatial_pruning(keep_ratio: float, pruning_loc: Sequence[int], depth: int, num_locations: int) -> None:
    """Raise ``ValueError`` naming the fix when a spatial pruning setup cannot work.

    Args:
        pruning_loc: Indices of the pruned stage's blocks before which a predictor sits.
        depth: Blocks in the pruned stage.
        num_locations: Locations of the pruned stage's map at the model's input size.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    locs = list(pruning_loc)
    if not locs:
        raise ValueError("pruning_loc is empty: give at least one block index of stage 3, e.g. (1, 2, 3)")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in locs):
        raise ValueError(f"pruning_loc must hold integer block indices of stage 3, got {tuple(locs)}")
    if any(b <= a for a, b in zip(locs, locs[1:], strict=False)):
        raise ValueError(f"pruning_loc must be strictly increasing, got {tuple(locs)}")
    if locs[0] < 0 or locs[-1] >= depth:
        raise ValueError(
            f"pruning_loc {tuple(locs)} must index blocks 0..{depth - 1} of stage 3 (it has {depth} blocks): "
            "pruning acts inside stage 3 only"
        )
    ratios = keep_schedule(keep_ratio, len(locs))
    counts = keep_location_counts(num_locations, keep_ratio, len(locs))
    if counts[-1] < 1:
        raise ValueError(
            f"keep_ratio {keep_ratio} keeps {max(counts[-1], 0)} of {num_locations} stage-3 locations at pruning "
            f"stage {len(locs)} (ratio ρ − {RATIO_STEP:g}·{len(locs) - 1} = {ratios[-1]:.3g}): raise keep_ratio "
            "or use fewer pruning locations"
        )


def rank_locations(scores: torch.Tensor) -> torch.Tensor:
    """Locations of each image from most to least worth keeping: (B, N) indices.

    Ranked by ``log p(keep)``, the reference's key, so the slow path gets exactly the reference's
    locations whenever its choice is defined. Exact ties, which the reference breaks arbitrarily,
    are broken by the keep log-odds ``score_keep − score_drop``: ``log p(keep)`` rounds to exactly 0
    in float32 once a predictor is confident (odds past ~e^17), where the odds still tell locations
    apart. (Ranking by the odds alone is the same order mathematically, but rounding flips near-equal
    neighbours: at the predictors' initialisation about one cut in 400 then keeps another location.)

    """
    n = scores.shape[1]
    # Both sorts put equal keys in index order (top_indices), in eager PyTorch and in an exported graph
    # alike: the second keeps the first's order among equal log p(keep).
    by_odds = top_indices(scores[..., 0] - scores[..., 1], n)
    by_keep = top_indices(scores[..., 0].gather(1, by_odds), n)
    return by_odds.gather(1, by_keep)


def gather_locations(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Batched ``x[b, index[b]]`` for tokens x (B, N, C) and indices (B, K): one kernel, no loop."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def split_apply(
    x: torch.Tensor,
    order: torch.Tensor,
    count: int,
    slow: Callable[[torch.Tensor], torch.Tensor],
    fast: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``slow`` on the first ``count`` locations of ``order``, ``fast`` on the rest, back in place.

    Each path copies its locations, whole rows of C values, into a dense (B, K, C) block (so its
    layers run on contiguous matrices), and its result rows are copied back: batched row indexing of
    the (B·N, C) token matrix, no loop over images, no per-element index tensors.

    Args:
        x: Tokens (B, N, C), row-major over the map.
        order: A permutation of the N locations per image (B, N), those for the slow path first.
        count: Locations on the slow path.
        slow, fast: Token-wise functions (B, K, C) → (B, K, C').

    Returns:
        (B, N, C'): ``slow`` or ``fast`` of every location, in the original order.
    """
    B, N, C = x.shape
    rows = x.reshape(B * N, C)
    flat = order + torch.arange(B, device=order.device).unsqueeze(1) * N  # row of each location in `rows`
    keep, drop = flat[:, :count].reshape(-1), flat[:, count:].reshape(-1)
    kept = slow(rows.index_select(0, keep).view(B, count, C))
    out = kept.new_empty(B * N, kept.shape[-1])
    out.index_copy_(0, keep, kept.reshape(-1, kept.shape[-1]))
    if count < N:
        dropped = fast(rows.index_select(0, drop).view(B, N - count, C))
        out.index_copy_(0, drop, dropped.reshape(-1, dropped.shape[-1]).to(out.dtype))
    return out.view(B, N, -1)


def blend(streams: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The slow stream where the mask keeps, the fast stream elsewhere (the reference's expression)."""
    slow, fast = streams
    return slow * mask + fast * (1 - mask)


class SpatialPruningStage(nn.Module):
    """Mixin for a backbone stage pruned with dynamic spatial sparsification (see the module docstring).

    After :meth:`convert` the stage holds ``score_predictor`` (one
    :class:`~dynvit.models.predictor.KeepPredictor` per pruning location) and its blocks from the first
    location on are ``pruned_block`` instances.
    """

    pruned_block: type[nn.Module]
    channels_last: bool
    blocks: nn.Sequential
    downsample: nn.Module
    score_predictor: nn.ModuleList

    @classmethod
    def convert(
        cls,
        stage: nn.Module,
        dim: int,
        keep_ratio: float,
        pruning_loc: Sequence[int],
        grid: tuple[int, int],
        predictor_eps: float = 1e-5,
    ) -> SpatialPruningStage:
        """Turn a built backbone stage into its pruned form in place (weights kept) and return it.

        Args:
            dim: Channels of the stage's map.
            keep_ratio: Base keep ratio ρ.
            pruning_loc: Blocks of the stage before which a predictor sits.
            grid: (rows, columns) of the stage's map at the model's input size, for validation and for
                the counts and masks reported at that size (other sizes work too).
            predictor_eps: Epsilon of the predictors' LayerNorm (1e-6 in the ConvNeXt reference).
        """
        validate_spatial_pruning(keep_ratio, pruning_loc, len(stage.blocks), grid[0] * grid[1])
        device = next(stage.parameters()).device
        for block in list(stage.blocks)[pruning_loc[0] :]:
            cls.pruned_block.convert(block)
        stage.__class__ = cls
        stage.pruning_loc = tuple(pruning_loc)
        stage.grid = tuple(grid)
        stage._keep_ratio = float(keep_ratio)
        stage.score_predictor = nn.ModuleList(KeepPredictor(dim, eps=predictor_eps) for _ in stage.pruning_loc)
        init_predictor(stage.score_predictor)
        return stage.to(device)

    # -- the schedule -----------------------------------------------------------------------------
    @property
    def keep_ratio(self) -> float:
        """Base keep ratio ρ; pruning stage s keeps ``int(N · (ρ − 0.2·s))`` locations. Settable."""
        return self._keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        validate_spatial_pruning(value, self.pruning_loc, len(self.blocks), self.num_locations)
        self._keep_ratio = float(value)

    @property
    def num_locations(self) -> int:
        """Locations of the stage's map at the model's input size."""
        return self.grid[0] * self.grid[1]

    @property
    def stage_keep_ratios(self) -> list[float]:
        """Targets of the ratio loss and shares kept at inference: ``[ρ, ρ − 0.2, ρ − 0.4]``."""
        return keep_schedule(self._keep_ratio, len(self.pruning_loc))

    def keep_counts(self, num_locations: int) -> list[int]:
        """Slow-path locations per pruning stage on a map of ``num_locations``; raises if one keeps none."""
        counts = keep_location_counts(num_locations, self._keep_ratio, len(self.pruning_loc))
        if counts[-1] < 1:
            raise ValueError(
                f"a stage-3 map of {num_locations} locations keeps none at keep_ratio {self._keep_ratio} "
                f"(pruning stage {len(counts)}): feed larger images or raise keep_ratio"
            )
        return counts

    @property
    def new_param_names(self) -> tuple[str, ...]:
        """Prefixes (within this stage) of the parameters the pruning adds: predictors and fast paths."""
        pruned = range(self.pruning_loc[0], len(self.blocks))
        fast = (f"blocks.{j}.{name}" for j in pruned for name in self.pruned_block.new_param_names)
        return ("score_predictor.", *fast)

    # -- layout -----------------------------------------------------------------------------------
    def map_size(self, x: torch.Tensor) -> tuple[int, int]:
        return tuple(x.shape[1:3]) if self.channels_last else tuple(x.shape[2:4])

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The map as tokens (B, N, C), row-major."""
        if self.channels_last:
            return x.reshape(x.shape[0], -1, x.shape[-1])
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])

    def map_mask(self, decision: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Decisions (B, N) shaped to broadcast over the map ``x``: (B, H, W, 1) or (B, 1, H, W)."""
        h, w = self.map_size(x)
        return decision.view(-1, h, w, 1) if self.channels_last else decision.view(-1, 1, h, w)

    # -- the two paths ----------------------------------------------------------------------------
    def run_streams(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Training path: blocks on two blended streams. Returns the blended map and the decisions (B, N)."""
        streams: tuple[torch.Tensor, torch.Tensor] | None = None
        mask = None
        decisions, stage = [], 0
        for i, block in enumerate(self.blocks):
            if stage < len(self.pruning_loc) and i == self.pruning_loc[stage]:
                # A predictor sees the map as the previous decision blends it (the plain map at first).
                current = x if streams is None else blend(streams, mask)
                scores = self.score_predictor[stage](self.tokens(current))
                # Hard 0/1 forward, soft gradient (straight-through); not multiplied by the previous
                # decision: every stage chooses among all locations.
                decision = F.gumbel_softmax(scores, hard=True)[..., 0]
                decisions.append(decision)
                mask = self.map_mask(decision, current)
                if streams is None:
                    streams = (x, x)
                stage += 1
            if streams is None:
                x = block(x)
            else:
                streams = block.forward_streams(*streams, mask)
        return blend(streams, mask), decisions

    def run_split(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Inference path: slow path on the top locations, fast path on the rest, dense map out.

        Returns the map and, per pruning stage, the boolean mask (B, N) of the locations that took the
        slow path.
        """
        h, w = self.map_size(x)
        counts = self.keep_counts(h * w)
        order, kept, stage = None, [], 0
        for i, block in enumerate(self.blocks):
            if stage < len(self.pruning_loc) and i == self.pruning_loc[stage]:
                order = rank_locations(self.score_predictor[stage](self.tokens(x)))
                count = counts[stage]
                top = order[:, :count]
                # A tensor source (not the scalar True), which torch.jit tracing (fvcore) accepts.
                kept.append(
                    torch.zeros_like(order, dtype=torch.bool).scatter_(1, top, torch.ones_like(top, dtype=torch.bool))
                )
                stage += 1
            x = block(x) if order is None else block.forward_split(x, order, count)
        return x, kept

    def forward_blocks(self, x: torch.Tensor, inference: bool | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The stage after its downsampling: :meth:`run_split` if ``inference`` (default: in eval mode),
        else :meth:`run_streams`. Returns the map and the masks (B, N) of every pruning stage."""
        inference = not self.training if inference is None else inference
        return self.run_split(x) if inference else self.run_streams(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Downsample, then the pruned blocks; the dense map comes out (what a backbone's forward expects)."""
        return self.forward_blocks(self.downsample(x))[0]

    @torch.no_grad()
    def start_predictors_at_target(self) -> None:
        """Start pruning stage s keeping each location with probability ``ρ − 0.2·s`` instead of 1/2."""
        for predictor, ratio in zip(self.score_predictor, self.stage_keep_ratios, strict=True):
            predictor.start_at(ratio)


class SpatialPruningStudent(nn.Module):
    """Mixin for a hierarchical student: the model-level API over its :class:`SpatialPruningStage`.

    The backbone class provides ``pruned_stage_name``, ``forward_pruned`` and ``distilled_map`` (see
    the module docstring) and keeps its own ``forward_head``, ``forward_features`` and
    ``forward_intermediates``, which prune through the converted stage.
    """

    pruned_stage_name: str

    @property
    def pruned_stage(self) -> SpatialPruningStage:
        return self.get_submodule(self.pruned_stage_name)

    def forward_pruned(self, x: torch.Tensor, inference: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image → features before the head, and the masks of the pruned stage's
        :meth:`~SpatialPruningStage.forward_blocks` (Gumbel decisions, or the kept locations if ``inference``)."""
        raise NotImplementedError

    def distilled_map(self, features: torch.Tensor) -> torch.Tensor:
        """The final feature map after the final norm, from :meth:`forward_pruned`'s features."""
        raise NotImplementedError

    # -- the schedule -----------------------------------------------------------------------------
    @property
    def keep_ratio(self) -> float:
        """Base keep ratio ρ; pruning stage s keeps ``int(N · (ρ − 0.2·s))`` of the N stage-3 locations.
        Settable, to evaluate the same weights at another ρ."""
        return self.pruned_stage.keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        self.pruned_stage.keep_ratio = value

    @property
    def pruning_loc(self) -> tuple[int, ...]:
        """Blocks of stage 3 before which a predictor sits."""
        return self.pruned_stage.pruning_loc

    @property
    def stage_keep_ratios(self) -> list[float]:
        """``[ρ, ρ − 0.2, ρ − 0.4]``: each pruning stage's share of the full stage-3 map."""
        return self.pruned_stage.stage_keep_ratios

    @property
    def stage_keep_counts(self) -> list[int]:
        """Locations on the slow path per pruning stage at the model's input size."""
        return self.pruned_stage.keep_counts(self.pruned_stage.num_locations)

    @property
    def num_locations(self) -> int:
        """Locations of the stage-3 map at the model's input size."""
        return self.pruned_stage.num_locations

    @property
    def mask_grid(self) -> tuple[int, int]:
        """(rows, columns) of the stage-3 map at the model's input size: the grid of the masks
        :meth:`predict_with_masks` returns for such images."""
        return self.pruned_stage.grid

    @property
    def new_param_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of what pruning adds (predictors, fast paths): the "new" parameters
        that train at the full learning rate and that a teacher checkpoint lacks."""
        return tuple(f"{self.pruned_stage_name}.{name}" for name in self.pruned_stage.new_param_names)

    def start_predictors_at_target(self) -> None:
        self.pruned_stage.start_predictors_at_target()

    # -- forwards ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> SpatialOutput | torch.Tensor:
        if not self.training:
            return super().forward(x)
        features, decisions = self.forward_pruned(x, inference=False)
        return SpatialOutput(self.forward_head(features), self.distilled_map(features), decisions)

    @torch.no_grad()
    def predict_with_masks(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits of the inference path plus, per pruning stage, the boolean mask (B, N) of the stage-3
        locations that took the slow path, row-major over the map (:attr:`mask_grid` at the model's
        input size).

        Always takes the inference path; dropout and drop-path follow the module's mode, so call it in
        ``eval()`` mode for inference numbers.
        """
        features, masks = self.forward_pruned(x, inference=True)
        return self.forward_head(features), masks
