"""ONNX export of an eval-mode model, checked in onnxruntime, and onnxruntime sessions to run it.

A pruned student exports as the graph it runs at inference: keep predictors, ``topk`` and ``gather``
with the token counts its keep ratio fixes (``int(N · ρ^s)`` at stage s), and a dynamic batch size.
Export goes through ``torch.onnx.export(..., dynamo=True)`` (``torch.export``, then ONNX).

What cannot be exported is refused with :class:`ExportError`: models whose token counts depend on
the image (ATS: a data-dependent shape), that draw random numbers at inference (random keep), or use
an op the exporter cannot decompose (ToMe's merge, on torch 2.15).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dynvit.deploy.quantize import QuantizationError, check_inference_ready, precision_of
from dynvit.measure.throughput import quiet_logs, random_images

INPUT, OUTPUT = "images", "logits"
# Largest |onnxruntime − eager| / max |eager| accepted by the export check (float32 rounding of a
# different kernel order is ~1e-6).
TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """A model the ONNX exporter cannot turn into a graph, or whose graph disagrees with eager PyTorch."""


def _summary(error: BaseException) -> str:
    """The exporter's own one-line cause ("## Exception summary" of torch.onnx's report), else the message."""
    text = str(error)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:400] if lines else type(error).__name__


def export_onnx(
    model: nn.Module,
    path: str | Path,
    images: torch.Tensor | None = None,
    opset: int | None = None,
    check: bool = True,
) -> Path:
    """Write an ONNX file of the eval-mode ``model`` with a dynamic batch size; return its path.

    Args:
        model: A float32 model in eval mode (a teacher, a student, a reducer); it is not changed.
        path: The ``.onnx`` file to write (its folder is created).
        images: Example images to trace with and to check onnxruntime against eager PyTorch on
            (real validation images are the better check); by default two random images.
        opset: ONNX opset; by default the exporter's.
        check: Run ``images`` through onnxruntime and require the logits within :data:`TOLERANCE`
            (relative to the largest eager logit) of eager PyTorch's; the file is removed otherwise.

    Raises:
        QuantizationError: a model in training mode or not in float32 (export the float32 model;
            ``onnxruntime.quantization`` quantizes the exported file).
        ExportError: an op the exporter cannot handle, or onnxruntime disagreeing with eager.
    """
    check_inference_ready(model, "export_onnx")
    if precision_of(model) != "fp32":
        raise QuantizationError(
            f"export_onnx exports float32 models; this one is {precision_of(model)}: export the float32 "
            "model (onnxruntime.quantization can quantize the exported file)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    x = random_images(model, 2) if images is None else images
    x = x.to(device, torch.float32)
    # The batch size is symbolic; the token counts are constants of the keep ratio. A batch of one
    # would be specialised to 1 by torch.export, so tracing needs two images or more.
    if x.shape[0] < 2:
        x = x.expand(2, *x.shape[1:]).contiguous()
    batch = torch.export.Dim("batch")
    try:
        # The exporter prints its progress and warns about every decomposition it makes.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                external_data=False,
            )
    except Exception as e:
        path.unlink(missing_ok=True)
        raise ExportError(f"{type(model).__name__} cannot be exported to ONNX: {_summary(e)}") from e
    if check:
        difference = compare_onnx(model, path, x)
        if not difference <= TOLERANCE:
            path.unlink(missing_ok=True)
            raise ExportError(
                f"onnxruntime's logits differ from eager PyTorch's by {difference:.2e} (relative) on the check "
                f"images, above {TOLERANCE:g}: the exported graph does not compute what {type(model).__name__} does"
            )
    return path


def quantize_onnx(path: str | Path, out: str | Path | None = None) -> Path:
    """onnxruntime's dynamic int8 quantization of an exported file: int8 weights, activations quantized
    per call (``MatMulInteger``); written to ``out``, by default ``<stem>.int8.onnx`` beside it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    out = Path(out) if out is not None else path.with_name(f"{path.stem}.int8.onnx")
    with quiet_logs(""):  # it advises its pre-processing step on the root logger every time
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    return out


def onnx_session(path: str | Path, threads: int | None = None, spin: bool = False):
    """An onnxruntime CPU ``InferenceSession`` of ``path`` using ``threads`` intra-op threads (torch's by default).

    Args:
        spin: Let the intra-op threads spin-wait for work after each run (onnxruntime's default).
            Off by default: a spinning pool keeps the cores busy after ``run`` returns, which slowed
            the eager model timed next in a pair by ~10 % on 2 cores and widened the intervals of
            every row (BENCHMARKS.md, "Deploy"). A process that runs nothing but onnxruntime may
            turn it on for lower latency on small models.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, images: torch.Tensor) -> torch.Tensor:
    """Logits of ``images`` (B, C, H, W) from an onnxruntime session of an exported model."""
    (logits,) = session.run([OUTPUT], {INPUT: images.detach().cpu().float().numpy()})
    return torch.from_numpy(np.asarray(logits))


def compare_onnx(model: nn.Module, path: str | Path, images: torch.Tensor) -> float:
    """max |onnxruntime − eager| / max |eager| over the logits of ``images``."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        eager = model(images.to(device, torch.float32)).float().cpu()
    ort_logits = run_onnx(onnx_session(path), images)
    return ((ort_logits - eager).abs().max() / eager.abs().max().clamp_min(1e-12)).item()
