"""Models: the DynamicViT student on timm, its parts, and how to build and load them."""

from dynvit.models.checkpoint import (
    CheckpointMismatch,
    LoadReport,
    UnreadableCheckpoint,
    load_checkpoint,
    load_weights,
    read_state_dict,
    save_atomic,
)
from dynvit.models.conv_stem import ConvStemPatchEmbed
from dynvit.models.dynamic_convnext import DynamicCNN, FastPathBlock, PrunedConvNeXtStage
from dynvit.models.dynamic_swin import DynamicSwin, FastMlpBlock, PrunedSwinStage
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
    FAMILIES,
    DataConfig,
    Family,
    create_student,
    create_teacher,
    data_config,
    default_pruning_loc,
    family_of,
    forward_with_tokens,
    register_family,
)
from dynvit.models.lvvit import DynamicLVViT, LVViT, LVViTOutput
from dynvit.models.masked_attention import MaskedAttention, MaskedBlock, masked_softmax
from dynvit.models.predictor import KeepPredictor
from dynvit.models.spatial_pruning import (
    SpatialOutput,
    SpatialPruningStage,
    SpatialPruningStudent,
    keep_location_counts,
    keep_schedule,
    split_apply,
    validate_spatial_pruning,
)
from dynvit.models.t2t_vit import DynamicT2TViT, T2TViT

__all__ = [
    "FAMILIES",
    "CheckpointMismatch",
    "ConvStemPatchEmbed",
    "DataConfig",
    "DynamicCNN",
    "DynamicLVViT",
    "DynamicSwin",
    "DynamicT2TViT",
    "DynamicViT",
    "DynamicViTDistilled",
    "Family",
    "FastMlpBlock",
    "FastPathBlock",
    "KeepPredictor",
    "LVViT",
    "LVViTOutput",
    "LoadReport",
    "MaskedAttention",
    "MaskedBlock",
    "PrunedConvNeXtStage",
    "PrunedSwinStage",
    "SpatialOutput",
    "SpatialPruningStage",
    "SpatialPruningStudent",
    "StudentOutput",
    "T2TViT",
    "TokenPruning",
    "UnreadableCheckpoint",
    "check_prunable",
    "create_student",
    "create_teacher",
    "data_config",
    "default_pruning_loc",
    "family_of",
    "forward_with_tokens",
    "keep_counts",
    "keep_location_counts",
    "keep_schedule",
    "load_checkpoint",
    "load_weights",
    "masked_softmax",
    "read_state_dict",
    "register_family",
    "save_atomic",
    "split_apply",
    "validate_pruning",
    "validate_spatial_pruning",
]
