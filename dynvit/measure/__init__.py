"""Measurement: pure functions (FLOPs, throughput, kept-token recall) and the callbacks that log them."""

from dynvit.measure.environment import environment
from dynvit.measure.flops import count_flops, count_params
from dynvit.measure.recall import kept_token_recall, stage_recall
from dynvit.measure.throughput import SpeedSettings, Speedup, measure_speedup, measure_throughput, median_interval

# The callbacks import Lightning (seconds); the pure measurements, and the timing subprocesses that
# import them, must not wait for it, so the callbacks load on first use.
_CALLBACKS = frozenset(
    {"FlopsCallback", "KeptTokensCallback", "ThroughputCallback", "kept_tokens_grid", "parse_dtype", "to_display"}
)


def __getattr__(name: str) -> object:
    if name in _CALLBACKS:
        from dynvit.measure import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FlopsCallback",
    "KeptTokensCallback",
    "SpeedSettings",
    "Speedup",
    "ThroughputCallback",
    "count_flops",
    "count_params",
    "environment",
    "kept_token_recall",
    "kept_tokens_grid",
    "measure_speedup",
    "measure_throughput",
    "median_interval",
    "parse_dtype",
    "stage_recall",
    "to_display",
]
