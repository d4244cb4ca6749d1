"""What every token-reducing model offers, as Protocols instead of ``hasattr`` checks.

:class:`TokenReducingModel` is met by every model a registered method builds (a reducer, a DynamicViT
student); the capability protocols say what else a model can report, and are checked with
``isinstance`` (they are ``runtime_checkable``). The registry (:mod:`dynvit.methods`) records which of
them each method offers; the contract test checks that record against the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from dynvit import methods


@runtime_checkable
class TokenReducingModel(Protocol):
    """A classifier that runs on fewer tokens than it was given, and says how many.

    Attributes:
        method: The registry name of the method that built it (``dynvit.methods.get(model.method)``).
        num_prefix_tokens: Tokens in front that are never reduced (class, distillation, register tokens).
    """

    method: str
    num_prefix_tokens: int

    def predict_with_counts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode logits (B, classes) and the real tokens (B, depth, 2), prefix tokens included, that
        entered every block's attention and MLP."""
        ...

    def token_schedule(self) -> list[tuple[int, int]] | None:
        """The (attention, MLP) token counts of every block when they do not depend on the image, else None."""
        ...


@runtime_checkable
class EarlyExiting(Protocol):
    """A cascade of exits on ever more tokens that answers each image at the first exit confident enough (DVT).

    Its ``predict_with_counts`` counts tokens per block of every exit in turn, 0 in the exits an image never
    reached, and an image costs what the exits it ran cost, so its mean cost comes from :meth:`mean_exit_cost`
    rather than from per-block token counts priced on the teacher.

    Attributes:
        num_exits: Exits in the cascade.
        tokens_per_exit: Tokens each exit's blocks run on, prefix tokens included, coarsest first.
    """

    num_exits: int
    tokens_per_exit: list[int]

    def exit_gflops(self) -> list[float]:
        """GFLOPs of one image that leaves at each exit, everything it ran included."""
        ...

    def predict_early_exit(self, x: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, classes) and the exit (B,) each image left at, at ``thresholds``."""
        ...

    def mean_exit_cost(self, images: Iterable[torch.Tensor]) -> tuple[float, float]:
        """Mean GFLOPs and mean patch tokens of the exit left at, per image of ``images``, at the set thresholds."""
        ...

    def leaving_shares(self, images: Iterable[torch.Tensor]) -> list[float]:
        """The share of ``images`` leaving at each exit at the set thresholds."""
        ...


@runtime_checkable
class MaskReporting(Protocol):
    """A model that can say which original patches are still tokens of their own after each stage."""

    def predict_with_masks(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Eval-mode logits and, per stage, a bool mask (B, N) over the original patches."""
        ...


@runtime_checkable
class SourceReporting(Protocol):
    """A model whose tokens stand for sets of original patches (mergers)."""

    def predict_with_sources(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode logits and which original patches (B, M, N) bool each final non-prefix token stands for."""
        ...


@runtime_checkable
class BlockSourceReporting(Protocol):
    """A merger that can say what its tokens stand for after every block, not only the last (pictures of merges)."""

    def predict_with_block_sources(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Eval-mode logits and, per block, which original patches (B, M_i, N) bool each non-prefix token
        entering its MLP stands for."""
        ...


@runtime_checkable
class AssignmentReporting(Protocol):
    """A model that assigns tokens to clusters (clustering methods)."""

    def predict_with_assignments(self, x: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Eval-mode logits and, per stage, where each input patch token went: ``{"centres": (B, K),
        "assignment": (B, n)}`` for a hard clustering (the output token of each input token), ``{"weights":
        (B, K, n)}`` for a soft one (how much of input token j makes output token k)."""
        ...


@runtime_checkable
class DensePredicting(Protocol):
    """A ViT with a dense head besides its classifier (LV-ViT's auxiliary head): a class prediction per patch."""

    def forward_dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (B, classes) and per-patch class logits (B, N, classes)."""
        ...


@runtime_checkable
class DenseDistilling(Protocol):
    """A student distilled on its teacher's dense predictions rather than its features.

    Attributes:
        token_distill: How the loss compares them (``"kl"``).
    """

    token_distill: str


# The protocol behind each report a method can declare (dynvit.methods.REPORTS).
REPORT_PROTOCOLS: dict[str, type] = {
    "counts": TokenReducingModel,
    "masks": MaskReporting,
    "sources": SourceReporting,
    "assignments": AssignmentReporting,
    "exits": EarlyExiting,
}


def reports(model: nn.Module) -> frozenset[str]:
    """What ``model`` reports (:data:`dynvit.methods.REPORTS`): its registered method's declared reports, else
    those whose protocol it meets. A reducer that tracks no original patches (a learned merger's new tokens)
    offers ``predict_with_masks`` but does not declare masks, and is not scored on them."""
    method = methods.of(model)
    if method is not None:
        return method.reports
    return frozenset(name for name, protocol in REPORT_PROTOCOLS.items() if isinstance(model, protocol))


__all__ = [
    "REPORT_PROTOCOLS",
    "AssignmentReporting",
    "BlockSourceReporting",
    "DenseDistilling",
    "DensePredicting",
    "EarlyExiting",
    "MaskReporting",
    "SourceReporting",
    "TokenReducingModel",
    "reports",
]
