"""dynvit: token pruning for vision transformers (DynamicViT and peers), measured end to end."""

from dynvit.deploy import export_onnx, quantize
from dynvit.measure import count_flops, count_params, environment, measure_speedup, measure_throughput
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


def __getattr__(name: str) -> object:
    # The reducers load on first use: `import dynvit` stays what every user needs.
    if name == "create_reduced":
        from dynvit.reducers import create_reduced

        return create_reduced
    if name == "create_dvt":
        from dynvit.models.dvt import create_dvt

        return create_dvt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DynamicCNN",
    "DynamicSwin",
    "DynamicViT",
    "SpatialOutput",
    "StudentOutput",
    "count_flops",
    "count_params",
    "create_dvt",
    "create_reduced",
    "create_student",
    "create_teacher",
    "environment",
    "export_onnx",
    "forward_with_tokens",
    "load_checkpoint",
    "measure_speedup",
    "measure_throughput",
    "quantize",
]
