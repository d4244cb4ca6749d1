"""Measurement: pure functions (FLOPs, throughput, kept-token recall) and the callbacks that log them."""

from dynvit.measure.flops import count_flops, count_params
from dynvit.measure.throughput import measure_throughput

__all__ = ["count_flops", "count_params", "measure_throughput"]
