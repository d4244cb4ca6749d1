"""LightningModules: what is computed for a teacher, a token-labelled LV-ViT and a pruned student."""

from dynvit.lightning.classifier import ClassifierModule
from dynvit.lightning.dvt import DVTModule
from dynvit.lightning.pruning import DynamicViTModule
from dynvit.lightning.token_labeling import TokenLabelingModule

__all__ = ["ClassifierModule", "DVTModule", "DynamicViTModule", "TokenLabelingModule"]
