"""The objective of hierarchical students (dynamic spatial sparsification of ConvNeXt and Swin).

``CE + 10 · mean_s(mean_b(kept share_s − ratio_s)²) + 0.5 · KL(logits) + 0.5 · MSE(final maps)``, with
the reductions of the reference (docs/reference.md, "Dynamic spatial sparsification"): the kept
share is the mean of a stage's hard decisions over all stage-3 locations, the KL is the batch mean
on log-softmaxes with a log target, and the MSE is the mean over every element of the final feature
map after the final norm (before pooling), all locations counted, none masked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dynvit.models.spatial_pruning import SpatialOutput, SpatialPruningStudent
from dynvit.objectives.dynamicvit import (
    DynamicViTLoss,
    LossTerms,
    classification_loss,
    keep_ratio_loss,
    logit_distillation_loss,
)


def feature_map_distillation_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element of the two final feature maps (same layout)."""
    return F.mse_loss(student_map, teacher_map.to(student_map.dtype))


class SpatialPruningLoss(nn.Module):
    """``CE + ratio_weight·ratio + distill_weight·KL(logits) + token_weight·MSE(final maps)``.

    Args:
        ratio_weight: Weight of the keep-ratio MSE (10.0 in the reference).
        distill_weight: Weight of the logit KL to the teacher (0.5).
        token_weight: Weight of the feature-map MSE (0.5); 0 switches it off. Named as in
            :class:`~dynvit.objectives.dynamicvit.DynamicViTLoss`, whose token term it replaces.
        label_smoothing: For hard targets; mixup/cutmix targets arrive already smoothed.
    """

    def __init__(
        self,
        ratio_weight: float = 10.0,
        distill_weight: float = 0.5,
        token_weight: float = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.ratio_weight = ratio_weight
        self.distill_weight = distill_weight
        self.token_weight = token_weight
        self.label_smoothing = label_smoothing

    def forward(
        self,
        out: SpatialOutput,
        targets: torch.Tensor,
        keep_targets: Sequence[float],
        teacher_logits: torch.Tensor,
        teacher_features: torch.Tensor,
    ) -> LossTerms:
        """Args: the student's training output, class targets (indices or soft), the stage keep
        ratios ``[ρ, ρ − 0.2, …]``, and the teacher's logits and final feature map."""
        cls = classification_loss(out.logits, targets, self.label_smoothing)
        ratio = keep_ratio_loss(out.decisions, keep_targets)
        distill = logit_distillation_loss(out.logits, teacher_logits)
        token = (
            feature_map_distillation_loss(out.features, teacher_features) if self.token_weight else cls.new_zeros(())
        )
        total = cls + self.ratio_weight * ratio + self.distill_weight * distill + self.token_weight * token
        return LossTerms(total, cls, ratio, distill, token)


def pruning_objective(
    student: nn.Module,
    ratio_weight: float | None = None,
    distill_weight: float = 0.5,
    token_weight: float = 0.5,
    label_smoothing: float = 0.0,
) -> DynamicViTLoss | SpatialPruningLoss:
    """The loss a student trains with: :class:`SpatialPruningLoss` for hierarchical students,
    :class:`~dynvit.objectives.dynamicvit.DynamicViTLoss` for token-pruned ViTs.

    Args:
        ratio_weight: None takes the objective's reference weight (10.0 hierarchical, 2.0 ViT).
    """
    objective = SpatialPruningLoss if isinstance(student, SpatialPruningStudent) else DynamicViTLoss
    weights = dict(distill_weight=distill_weight, token_weight=token_weight, label_smoothing=label_smoothing)
    if ratio_weight is not None:
        weights["ratio_weight"] = ratio_weight
    return objective(**weights)
