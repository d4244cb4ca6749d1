"""LightningModules: what is computed for a teacher, a token-labelled LV-ViT, a pruned student
and any registered method fine-tuned."""

from dynvit.lightning.classifier import ClassifierModule
from dynvit.lightning.finetune import MethodFineTuning
from dynvit.lightning.pruning import DynamicViTModule
from dynvit.lightning.token_labeling import TokenLabelingModule

__all__ = ["ClassifierModule", "DynamicViTModule", "MethodFineTuning", "TokenLabelingModule"]
