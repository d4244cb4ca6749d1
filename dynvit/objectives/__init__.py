"""Objectives: what a student is trained to minimise (DynamicViT's distillation loss, its hierarchical
version, token labeling)."""

from dynvit.objectives.dynamicvit import (
    DynamicViTLoss,
    LossTerms,
    classification_loss,
    keep_ratio_loss,
    logit_distillation_loss,
    token_distillation_loss,
)
from dynvit.objectives.spatial_pruning import SpatialPruningLoss, feature_map_distillation_loss, pruning_objective
from dynvit.objectives.token_labeling import TeacherAnnotator, TokenLabelingLoss, token_labeling_loss

__all__ = [
    "DynamicViTLoss",
    "LossTerms",
    "SpatialPruningLoss",
    "TeacherAnnotator",
    "TokenLabelingLoss",
    "classification_loss",
    "feature_map_distillation_loss",
    "keep_ratio_loss",
    "logit_distillation_loss",
    "pruning_objective",
    "token_distillation_loss",
    "token_labeling_loss",
]
