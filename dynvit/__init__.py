"""dynvit: token pruning for vision transformers (DynamicViT and peers), measured end to end."""

from dynvit.measure import count_flops, count_params, measure_throughput
from dynvit.models import (
    DynamicCNN,
    DynamicSwin,
    DynamicViT,
    SpatialOutput,
    StudentOutput,
    create_student,
    create_teacher,
    forward_with_tokens,
    load_checkpoint,
)

__all__ = [
    "DynamicCNN",
    "DynamicSwin",
    "DynamicViT",
    "SpatialOutput",
    "StudentOutput",
    "count_flops",
    "count_params",
    "create_student",
    "create_teacher",
    "forward_with_tokens",
    "load_checkpoint",
    "measure_throughput",
]
