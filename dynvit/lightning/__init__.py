"""LightningModules: what is computed for a teacher and for a pruned student."""

from dynvit.lightning.classifier import ClassifierModule
from dynvit.lightning.pruning import DynamicViTModule

__all__ = ["ClassifierModule", "DynamicViTModule"]
