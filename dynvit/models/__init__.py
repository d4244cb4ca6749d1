"""Models: the DynamicViT student on timm, its parts, and how to build and load them."""

from dynvit.models.checkpoint import (
    CheckpointMismatch,
    LoadReport,
    load_checkpoint,
    load_weights,
    read_state_dict,
    save_atomic,
)
from dynvit.models.conv_stem import ConvStemPatchEmbed
from dynvit.models.dynamic_vit import DynamicViT, StudentOutput, TokenPruning, keep_counts, validate_pruning
from dynvit.models.factory import create_student, create_teacher, default_pruning_loc, forward_with_tokens
from dynvit.models.masked_attention import MaskedAttention, MaskedBlock, masked_softmax
from dynvit.models.predictor import KeepPredictor

__all__ = [
    "CheckpointMismatch",
    "ConvStemPatchEmbed",
    "DynamicViT",
    "KeepPredictor",
    "LoadReport",
    "MaskedAttention",
    "MaskedBlock",
    "StudentOutput",
    "TokenPruning",
    "create_student",
    "create_teacher",
    "default_pruning_loc",
    "forward_with_tokens",
    "keep_counts",
    "load_checkpoint",
    "load_weights",
    "masked_softmax",
    "read_state_dict",
    "save_atomic",
    "validate_pruning",
]
