"""Random keep: the floor any learned or scored selection has to beat.

Before the same blocks and with the same token counts as DynamicViT at keep ratio ρ
(``int(N · ρ^s)`` patch tokens at stage s, :func:`~dynvit.models.dynamic_vit.keep_counts`), keep
patch tokens chosen uniformly at random. In eval the choice comes from a generator seeded afresh on
every call, so a model evaluated twice gives the same logits; in training it draws from torch's
global generator, so every step sees a new subset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dynvit.methods import Knob, Method, locations, register
from dynvit.models.dynamic_vit import keep_counts, validate_pruning
from dynvit.reducers.base import ReducedViT, TokenState


class RandomKeepViT(ReducedViT):
    """A timm ViT keeping random patch tokens before ``pruning_loc`` blocks, in DynamicViT's numbers.

    Build with ``apply_reducer(vit, "random", keep_ratio=0.7)``.
    """

    method = "random"

    def configure(self, keep_ratio: float = 0.7, pruning_loc: Sequence[int] | None = None, seed: int = 0) -> None:
        """Args:
        keep_ratio: DynamicViT's ρ: stage s keeps ``int(N · ρ^s)`` of the N patch tokens.
        pruning_loc: Blocks before which tokens are dropped; DynamicViT's default by default.
        seed: Seed of the eval-mode generator.
        """
        loc = self.default_loc() if pruning_loc is None else tuple(pruning_loc)
        validate_pruning(keep_ratio, loc, len(self.blocks), self.num_patches)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.keep_ratio, self.pruning_loc, self.seed = float(keep_ratio), loc, seed
        self.keep_counts = keep_counts(self.num_patches, self.keep_ratio, len(loc))

    def token_schedule(self) -> list[tuple[int, int]]:
        counts, n = [], self.num_patches
        for i in range(len(self.blocks)):
            if i in self.pruning_loc:
                n = self.keep_counts[self.pruning_loc.index(i)]
            counts.append((n + self.num_prefix_tokens, n + self.num_prefix_tokens))
        return counts

    def start(self, state: TokenState) -> None:
        # Eval draws from a generator seeded afresh on every run; training from torch's global one.
        state.generator = None if self.training else torch.Generator(device=state.index.device).manual_seed(self.seed)

    def before_block(self, i: int, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        if i not in self.pruning_loc:
            return x
        k, n = self.keep_counts[self.pruning_loc.index(i)], x.shape[1] - self.num_prefix_tokens
        # The k largest of n uniform draws are a uniform random k-subset.
        draws = torch.rand(x.shape[0], n, generator=state.generator, device=x.device)
        x = state.select(x, draws.topk(k, dim=1).indices.sort(dim=1).values)
        state.mark_stage()
        return x


register(
    Method(
        name="random",
        summary="keep uniformly random tokens in DynamicViT's counts and blocks: the floor to beat",
        learned=False,
        build=RandomKeepViT.from_vit,
        knob=Knob("keep_ratio", 0.0, 1.0),
        cost="keep_ratio",
        at_stages=locations("pruning_loc"),
        reports=frozenset({"counts", "masks"}),
        onnx="it draws random numbers at inference (a generator seeded on every call), which the exporter cannot trace",
        released={"keep 0.7": {"keep_ratio": 0.7}},
    )
)

__all__ = ["RandomKeepViT"]
