"""Deployment: reduced-precision copies for CPU inference (:func:`quantize`) and ONNX export (:func:`export_onnx`)."""

from dynvit.deploy.onnx import ExportError, compare_onnx, export_onnx, onnx_session, run_onnx
from dynvit.deploy.quantize import PRECISIONS, QuantizationError, check_precision, quantize

__all__ = [
    "PRECISIONS",
    "ExportError",
    "QuantizationError",
    "check_precision",
    "compare_onnx",
    "export_onnx",
    "onnx_session",
    "quantize",
    "run_onnx",
]
