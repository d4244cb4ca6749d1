"""ONNX export of an eval-mode model, checked in onnxruntime, and onnxruntime sessions to run it.

A pruned student exports as the graph it runs at inference: keep predictors, ``topk`` and ``gather``
with the token counts its keep ratio fixes (``int(N · ρ^s)`` at stage s), and a dynamic batch size.
Export goes through ``torch.onnx.export(..., dynamo=True)`` (``torch.export``, then ONNX).

What cannot be exported is refused with :class:`ExportError`: a registered method whose entry says why
(``dynvit.methods``: ATS's data-dependent shape, random keep's draws at inference, ToMe's merge) is refused
with that reason before any tracing; any other model the exporter fails on, with the exporter's own cause.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from dynvit import methods
from dynvit.deploy.quantize import QuantizationError, check_inference_ready, precision_of
from dynvit.files import staged
from dynvit.measure.throughput import quiet_logs, random_images

INPUT, OUTPUT = "images", "logits"
# Largest |onnxruntime − eager| / max |eager| accepted by the export check (float32 rounding of a
# different kernel order is ~1e-6).
TOLERANCE = 1e-4
# Keys of a top-k this close (relative to the image's largest |key|, at least 1) tie at its cut: either
# choice is valid. Another kernel order moves keep scores by ~1e-7; a freshly initialised keep
# predictor scores tokens 0 to ~1e-6 apart, a trained one far more.
TIE_TOLERANCE = 1e-5


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
    tolerance: float = TOLERANCE,
) -> Path:
    """Write an ONNX file of the eval-mode ``model`` with a dynamic batch size; return its path.

    Args:
        model: A float32 model in eval mode (a teacher, a student, a reducer); it is not changed.
        path: The ``.onnx`` file to write (its folder is created).
        images: Example images to trace with and to check onnxruntime against eager PyTorch on
            (real validation images are the better check); by default two random images.
        opset: ONNX opset; by default the exporter's.
        check: Run ``images`` through onnxruntime and require each image's logits within ``tolerance``
            (relative to the largest eager logit) of eager PyTorch's, or a tie at a top-k cut to explain
            the difference (:func:`check_onnx`). The file is written through a temporary one, so a failed
            export or check leaves ``path`` as it was.
        tolerance: The largest relative logit difference the check accepts.

    Raises:
        QuantizationError: a model in training mode or not in float32 (export the float32 model;
            ``onnxruntime.quantization`` quantizes the exported file).
        ExportError: an op the exporter cannot handle, or onnxruntime disagreeing with eager beyond a tie.
    """
    check_inference_ready(model, "export_onnx")
    method = methods.of(model)
    if method is not None and method.onnx is not None:
        raise ExportError(
            f"{type(model).__name__} cannot be exported to ONNX: {method.onnx} ({method.name}'s registry entry)"
        )
    if precision_of(model) != "fp32":
        raise QuantizationError(
            f"export_onnx exports float32 models; this one is {precision_of(model)}: export the float32 "
            "model (onnxruntime.quantization can quantize the exported file)"
        )
    path = Path(path)
    device = next(model.parameters()).device
    x = random_images(model, 2) if images is None else images
    x = x.to(device, torch.float32)
    # The batch size is symbolic; the token counts are constants of the keep ratio. A batch of one
    # would be specialised to 1 by torch.export, so tracing needs two images or more.
    if x.shape[0] < 2:
        x = x.expand(2, *x.shape[1:]).contiguous()
    batch = torch.export.Dim("batch")
    with staged(path) as staging:
        try:
            # The exporter prints its progress and warns about every decomposition it makes.
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    (x,),
                    str(staging),
                    dynamo=True,
                    input_names=[INPUT],
                    output_names=[OUTPUT],
                    dynamic_shapes=({0: batch},),
                    opset_version=opset,
                    external_data=False,
                )
        except Exception as e:
            raise ExportError(f"{type(model).__name__} cannot be exported to ONNX: {_summary(e)}") from e
        if check:
            check_onnx(model, staging, x, tolerance)
    return path


def quantize_onnx(path: str | Path, out: str | Path | None = None, reduce_range: bool = False) -> Path:
    """onnxruntime's dynamic int8 quantization of an exported file: int8 weights, activations quantized
    per call (``MatMulInteger``); written to ``out``, by default ``<stem>.int8.onnx`` beside it.

    Args:
        reduce_range: Quantize the weights to 7 bits, as onnxruntime advises on x86 CPUs without VNNI or
            AMX (:attr:`~dynvit.deploy.hardware.CpuInfo.int8_dot_product`), where its unsigned × signed
            8-bit products go through ``vpmaddubsw``, whose int16 pair sums can saturate. It costs
            precision, so :func:`~dynvit.deploy.fastest` tries both there.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    out = Path(out) if out is not None else path.with_name(f"{path.stem}.int8.onnx")
    with quiet_logs(""):  # it advises its pre-processing step on the root logger every time
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, reduce_range=reduce_range)
    return out


@dataclass(frozen=True)
class Tie:
    """An image for which onnxruntime kept other tokens than eager PyTorch where the keys tie at the cut.

    Attributes:
        image: The image's index among the check images.
        selection: Which top-k of the network (0: the first one run).
        selections: How many top-k selections the network runs.
        gap: The largest difference, under eager PyTorch's keys, between a key onnxruntime chose and the
            key eager PyTorch chose in its place.
    """

    image: int
    selection: int
    selections: int
    gap: float

    def __str__(self) -> str:
        return (
            f"tie at the top-k cut in image {self.image} (top-k {self.selection + 1} of {self.selections}, "
            f"gap {self.gap:.1e}): both choices valid"
        )


@dataclass(frozen=True)
class OnnxCheck:
    """What :func:`check_onnx` found: onnxruntime's logits against eager PyTorch's, image by image.

    Attributes:
        images: Check images.
        difference: Largest relative logit difference over the images where both runtimes kept the same
            tokens (every image but the ties).
        tolerance: The largest accepted.
        ties: Images where the runtimes kept different tokens whose keys tie at a top-k cut.
    """

    images: int
    difference: float
    tolerance: float
    ties: tuple[Tie, ...] = ()

    def __str__(self) -> str:
        text = (
            f"checked in onnxruntime against eager PyTorch on {self.images} images: logits agree to "
            f"{self.difference:.1e} (relative)"
        )
        if self.ties:
            text += f" on {self.images - len(self.ties)}; " + "; ".join(map(str, self.ties))
        return text


def check_onnx(model: nn.Module, path: str | Path, images: torch.Tensor, tolerance: float = TOLERANCE) -> OnnxCheck:
    """Check an exported ``model`` in onnxruntime: the logits of every image within ``tolerance`` (relative to
    the largest eager logit) of eager PyTorch's, or a tie at a top-k cut.

    Both runtimes break exact ties alike (equal keys in index order), but keys within float32 rounding of
    each other can still fall either way, since the two runtimes compute them in different orders; the
    network then keeps different tokens and its logits differ legitimately. So an image whose logits
    disagree is looked into: the keys and indices of every top-k (``TopK``) in the graph are read from
    onnxruntime and compared with eager PyTorch's top-k and sorts, in order. At the first selection where the
    two differ, the keys must agree and the two choices be worth the same under eager's keys, both within
    :data:`TIE_TOLERANCE`: a tie, reported. Anything else is an error.

    Args:
        model: The eval-mode float32 model that was exported.
        path: Its ``.onnx`` file.
        images: Check images (B, C, H, W).
        tolerance: Largest accepted ``max |onnxruntime − eager| / max |eager|`` of an image's logits.

    Returns:
        What was found: the largest difference, and the ties.

    Raises:
        ExportError: an image whose logits differ beyond ``tolerance`` with no tie to explain it.
    """
    device = next(model.parameters()).device
    with torch.inference_mode():
        eager = model(images.to(device, torch.float32)).float().cpu()
    try:
        ort = run_onnx(onnx_session(path), images)
    except Exception as e:  # onnxruntime's own exception types (Fail, InvalidGraph, ...) share no base but Exception
        raise ExportError(
            f"onnxruntime cannot run the graph exported from {type(model).__name__}: {_summary(e)}"
        ) from e
    per_image = (ort - eager).flatten(1).abs().amax(1) / eager.abs().max().clamp_min(1e-12)
    differing = [i for i, d in enumerate(per_image.tolist()) if not d <= tolerance]
    ties, errors = [], []
    if differing:
        eager_selections = _eager_selections(model, images)
        ort_selections = _onnxruntime_selections(path, images)
        for i in differing:
            found = _tie(i, eager_selections, ort_selections)
            if isinstance(found, Tie):
                ties.append(found)
            else:
                errors.append(f"image {i}: logits differ by {per_image[i]:.2e} (relative); {found}")
    if errors:
        raise ExportError(
            f"onnxruntime's logits differ from eager PyTorch's above {tolerance:g} (relative) on "
            f"{len(errors)} of {len(images)} check images, with no tie at a top-k cut to explain it: the exported "
            f"graph does not compute what {type(model).__name__} does. " + "; ".join(errors + [str(t) for t in ties])
        )
    agreeing = [d for i, d in enumerate(per_image.tolist()) if i not in differing]
    return OnnxCheck(len(images), max(agreeing, default=0.0), tolerance, tuple(ties))


class _SelectionRecorder(TorchFunctionMode):
    """Records the keys and the resulting indices of every top-k or sort run under it, in call order."""

    _INDICES = frozenset({torch.argsort, torch.Tensor.argsort})
    _SELECTIONS = {torch.topk, torch.Tensor.topk, torch.sort, torch.Tensor.sort, *_INDICES}

    def __init__(self) -> None:
        super().__init__()
        self.selections: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in self._SELECTIONS:
            self.selections.append((args[0], out if func in self._INDICES else out[1]))
        return out


def _eager_selections(model: nn.Module, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and indices of each top-k or sort eager PyTorch runs on ``images``, in call order."""
    device = next(model.parameters()).device
    recorder = _SelectionRecorder()
    with torch.inference_mode(), recorder:
        model(images.to(device, torch.float32))
    return [(keys.float().cpu(), indices.cpu()) for keys, indices in recorder.selections]


def _onnxruntime_selections(path: str | Path, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and indices of each ``TopK`` of the graph in ``path`` on ``images``, in graph order: the graph
    with those tensors added to its outputs, run in onnxruntime."""
    import onnx

    graph = onnx.load(str(path))
    top_ks = [node for node in graph.graph.node if node.op_type == "TopK"]
    for node in top_ks:
        graph.graph.output.extend(
            [
                onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None),
                onnx.helper.make_tensor_value_info(node.output[1], onnx.TensorProto.INT64, None),
            ]
        )
    names = [name for node in top_ks for name in (node.input[0], node.output[1])]
    outputs = onnx_session(graph.SerializeToString()).run(names, {INPUT: images.detach().cpu().float().numpy()})
    tensors = [torch.from_numpy(np.asarray(t)) for t in outputs]
    return list(zip(tensors[::2], tensors[1::2], strict=True))


def _tie(
    image: int,
    eager: list[tuple[torch.Tensor, torch.Tensor]],
    ort: list[tuple[torch.Tensor, torch.Tensor]],
) -> Tie | str:
    """The tie at the first top-k where the runtimes chose differently for ``image``, or why there is none."""
    if len(eager) != len(ort):
        return f"cannot match its {len(eager)} eager top-k/sorts to the graph's {len(ort)} TopK"
    for j, ((e_keys, e_indices), (o_keys, o_indices)) in enumerate(zip(eager, ort, strict=True)):
        e_keys, e_indices, o_keys, o_indices = e_keys[image], e_indices[image], o_keys[image], o_indices[image]
        k = o_indices.shape[-1]
        if e_keys.shape != o_keys.shape or e_keys.dim() != 1 or e_indices.shape[-1] < k:
            shapes = f"{tuple(o_keys.shape)} in the graph, {tuple(e_keys.shape)} in eager"
            return f"cannot compare its top-k {j + 1}, whose keys have shape {shapes}"
        e_indices = e_indices[:k]
        if torch.equal(e_indices, o_indices):
            continue
        allowed = TIE_TOLERANCE * max(1.0, e_keys.abs().max().item())
        keys_differ = (o_keys - e_keys).abs().max().item()
        gap = (e_keys[o_indices] - e_keys[e_indices]).abs().max().item()
        if keys_differ > allowed:
            return f"the keys of top-k {j + 1} differ by {keys_differ:.1e}, above {allowed:.0e}"
        if gap > allowed:
            return (
                f"top-k {j + 1} kept other tokens, whose keys differ by {gap:.1e} from eager's choice, "
                f"above {allowed:.0e}"
            )
        return Tie(image, j, len(eager), gap)
    return "both kept the same tokens"


def onnx_session(path: str | Path | bytes, threads: int | None = None, spin: bool = False):
    """An onnxruntime CPU ``InferenceSession`` of ``path`` (or a serialised model) using ``threads`` intra-op
    threads (torch's by default).

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
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


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


class OnnxRuntimeModel(nn.Module):
    """An onnxruntime session behind a module's call, so it is scored like any eager model."""

    def __init__(self, session) -> None:
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_onnx(self.session, x)
