"""Deployment: reduced-precision copies for CPU inference (:func:`quantize`), ONNX export (:func:`export_onnx`),
and the fastest way to run a model on this machine, measured (:func:`fastest`)."""

from dynvit.deploy.fastest import (
    Choice,
    DeployPath,
    Tolerance,
    candidate_paths,
    fastest,
    load_deployed,
    speedup_over,
)
from dynvit.deploy.hardware import CpuInfo, SlowPrecisionWarning, detect_cpu
from dynvit.deploy.onnx import ExportError, compare_onnx, export_onnx, onnx_session, quantize_onnx, run_onnx
from dynvit.deploy.quantize import INT8_BACKENDS, PRECISIONS, QuantizationError, check_precision, quantize

__all__ = [
    "INT8_BACKENDS",
    "PRECISIONS",
    "Choice",
    "CpuInfo",
    "DeployPath",
    "ExportError",
    "QuantizationError",
    "SlowPrecisionWarning",
    "Tolerance",
    "candidate_paths",
    "check_precision",
    "compare_onnx",
    "detect_cpu",
    "export_onnx",
    "fastest",
    "load_deployed",
    "onnx_session",
    "quantize",
    "quantize_onnx",
    "run_onnx",
    "speedup_over",
]
