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
from dynvit.models.dynamic_vit import (
    DynamicViT,
    DynamicViTDistilled,
    StudentOutput,
    TokenPruning,
    check_prunable,
    keep_counts,
    validate_pruning,
)
from dynvit.models.factory import (
    DataConfig,
    create_student,
    create_teacher,
    data_config,
    default_pruning_loc,
    forward_with_tokens,
)
from dynvit.models.lvvit import DynamicLVViT, LVViT, LVViTOutput
from dynvit.models.masked_attention import MaskedAttention, MaskedBlock, masked_softmax
from dynvit.models.predictor import KeepPredictor
from dynvit.models.t2t_vit import DynamicT2TViT, T2TViT

__all__ = [
    "CheckpointMismatch",
    "ConvStemPatchEmbed",
    "DataConfig",
    "DynamicLVViT",
    "DynamicT2TViT",
    "DynamicViT",
    "DynamicViTDistilled",
    "KeepPredictor",
    "LVViT",
    "LVViTOutput",
    "LoadReport",
    "MaskedAttention",
    "MaskedBlock",
    "StudentOutput",
    "T2TViT",
    "TokenPruning",
    "check_prunable",
    "create_student",
    "create_teacher",
    "data_config",
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
