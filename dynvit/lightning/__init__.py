"""LightningModules: what is computed for a teacher, a token-labelled LV-ViT, a pruned student, a DVT
cascade and any registered method fine-tuned."""

from dynvit.lightning.classifier import ClassifierModule
from dynvit.lightning.dvt import DVTModule
from dynvit.lightning.finetune import MethodFineTuning
from dynvit.lightning.pruning import DynamicViTModule
from dynvit.lightning.token_labeling import TokenLabelingModule

__all__ = ["ClassifierModule", "DVTModule", "DynamicViTModule", "MethodFineTuning", "TokenLabelingModule"]
