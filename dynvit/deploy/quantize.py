"""Reduced-precision copies of a model for inference: bfloat16, or int8 Linear layers (torchao, torch.ao).

:func:`quantize` works on any model of this toolkit (teachers, DynamicViT students of every
backbone, the token reducers) because it only touches ``nn.Linear`` layers (int8) or casts the whole
model (bf16): a student prunes, gathers and ranks tokens as before.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from dynvit.deploy import hardware
from dynvit.measure.throughput import quiet_logs

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")
# Who quantizes int8 (see quantize): "auto" picks by device and CPU (int8_backend_for).
INT8_BACKENDS: tuple[str, ...] = ("auto", "torchao", "torch.ao")

# Layers int8 leaves in float32, by module-name pattern (``fnmatch`` on the whole name). The keep
# predictors decide which tokens a student keeps: their ranking must not move with quantization noise,
# and they cost < 5 % of the compute; a hierarchical student keeps them in its pruned stage
# (``stages.2.score_predictor.*``, ``layers.2.score_predictor.*``). The heads see one token (LV-ViT's
# aux head: every token, but only through a max); ConvNeXt's and Swin's are modules (``head.fc``); a distilled
# DeiT's second head, ``head_dist``, is a head too (timm's ``classifier`` names: ``head``, ``head_dist``,
# ``head.fc``, ``head_dist.linear``, ``aux_head``).
# Fast paths are quantized: like the MLPs they add to the map and choose nothing, so int8 noise there
# is as harmless as in the MLPs, and they run on every dropped location.
KEEP_FP32: tuple[str, ...] = ("*score_predictor.*", "head", "head.*", "head_dist", "head_dist.*", "aux_head")
# torch.ao's int8 weights are made (when quantized) and unpickled (when a saved module is loaded) through torch's
# quantized tensor creation functions, which torch warns are deprecated: not the user's to act on.
TORCH_AO_DEPRECATION = ".*quantized tensor creation functions.*"

# Layers whose projection weights are read directly by their parent instead of through the Linear's
# forward, which int8 weights cannot serve: quantizing them would fail at run time or silently
# leave them in float32.
_UNSUPPORTED = (nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


class QuantizationError(ValueError):
    """A model that cannot be prepared in the precision asked for."""


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ``ValueError`` listing them."""
    if precision not in PRECISIONS:
        close = difflib.get_close_matches(str(precision), PRECISIONS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown precision {precision!r}: choose from {list(PRECISIONS)}{hint}")
    return precision


def check_inference_ready(model: nn.Module, what: str) -> None:
    """Raise unless ``model`` is in eval mode: deployment copies freeze the inference path."""
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise QuantizationError(
            f"{what} needs a model in eval mode, but {training[0]!r} is in training mode (a student would "
            "mask instead of pruning, dropout would be on): call model.eval() first"
        )


def _quantized_layers(model: nn.Module) -> list[str]:
    """Names of layers that already hold quantized weights (torch.ao modules or torchao tensors)."""
    return [
        name
        for name, module in model.named_modules()
        if type(module).__module__.startswith("torch.ao.nn.quantized")
        or (isinstance(module, nn.Linear) and type(module.weight.data) is not torch.Tensor)
    ]


def _check_layers(model: nn.Module, precision: str) -> None:
    quantized = _quantized_layers(model)
    if quantized:
        raise QuantizationError(
            f"layer {quantized[0]!r} is already quantized ({len(quantized)} such layers): quantize the "
            "float32 model, not a quantized copy"
        )
    if precision != "int8":
        return
    # int8 replaces float32 Linear layers; on a bf16 copy its kernels get bf16 inputs and fail at the first call.
    if precision_of(model) != "fp32":
        raise QuantizationError(
            f"int8 quantizes float32 models; this one is {precision_of(model)}: quantize the float32 model"
        )
    for name, module in model.named_modules():
        if isinstance(module, _UNSUPPORTED):
            raise QuantizationError(
                f"int8 cannot quantize {name!r} ({type(module).__name__}): it reads its projection weights "
                "directly instead of calling its Linear layers; use bf16, or a timm Attention in its place"
            )
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise QuantizationError(f"{type(model).__name__} has no nn.Linear layer: int8 has nothing to quantize")


def check_int8_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`INT8_BACKENDS`, else a ``ValueError`` listing them."""
    if backend not in INT8_BACKENDS:
        raise ValueError(f"unknown int8 backend {backend!r}: choose from {list(INT8_BACKENDS)}")
    return backend


def int8_backend_for(device: torch.device | str, cpu: hardware.CpuInfo | None = None) -> str:
    """The int8 backend ``auto`` means for a model on ``device``: torchao off the CPU, and on CPUs
    whose x86 quantized engine is missing; ``torch.ao`` (fbgemm's dynamic int8 Linear) on x86 CPUs.

    fbgemm's kernel quantizes the activation inside the product, with AVX2 code as well as
    AVX-512/VNNI code; torchao's eager int8 runs the activation's quantization as separate kernels
    and its product is fast only with AVX-512 VNNI or AMX. Measured (docs/reference.md, "Which
    reduced-precision kernels run on which CPU"), fbgemm was the faster of the two on every CPU tried.
    """
    if torch.device(device).type != "cpu":
        return "torchao"
    cpu = cpu or hardware.detect_cpu()
    engines = torch.backends.quantized.supported_engines
    return "torch.ao" if cpu.is_x86 and "fbgemm" in engines else "torchao"


def quantize(
    model: nn.Module, precision: str, keep_fp32: Sequence[str] = KEEP_FP32, int8_backend: str = "auto"
) -> nn.Module:
    """A copy of an eval-mode ``model`` for inference in ``precision``; the model itself is not changed.

    - ``fp32``: a plain copy.
    - ``bf16``: every parameter and buffer in bfloat16; the copy takes bfloat16 images (cast yours
      with ``x.to(torch.bfloat16)``) and returns bfloat16 logits.
    - ``int8``: dynamic quantization of the ``nn.Linear`` layers: int8 weights per output channel,
      activations quantized to int8 per call, int8 matrix products. Everything else (the patch
      embedding, norms, attention's own products, token ranking and gathering) stays float32, as do
      the Linear layers named by ``keep_fp32``. ``int8_backend`` says whose kernels:

      - ``torchao``: ``Int8DynamicActivationInt8WeightConfig`` (activations per token), products in
        ``torch._int_mm``: oneDNN's with AVX-512 VNNI or AMX, a plain loop without (slower than
        float32 several times over); runs on a GPU too.
      - ``torch.ao``: ``torch.ao.quantization.quantize_dynamic`` (fbgemm on x86: activations per
        tensor, quantized inside the kernel, AVX2 and AVX-512 code); CPU only.
      - ``auto`` (default): :func:`int8_backend_for` the model's device and this CPU.

    On a CPU without the instructions that make the chosen kernels fast (bf16: AVX-512 BF16 or AMX;
    torchao's int8: AVX-512 VNNI or AMX) the copy is still made, after one :class:`~dynvit.deploy.hardware.SlowPrecisionWarning`
    naming what the CPU offers. :func:`dynvit.deploy.fastest` measures instead of guessing.

    Args:
        model: A model in eval mode (``model.eval()``).
        precision: One of :data:`PRECISIONS`.
        keep_fp32: ``fnmatch`` patterns of module names whose Linear layers int8 leaves in float32
            (by default the keep predictors and the heads: :data:`KEEP_FP32`).
        int8_backend: One of :data:`INT8_BACKENDS`.

    Raises:
        ValueError: an unknown precision or int8 backend, or ``torch.ao`` for a model off the CPU.
        QuantizationError: a model in training mode, one already quantized, or (int8) one not in float32,
            a layer int8 cannot quantize or no Linear layer at all.
    """
    check_precision(precision)
    check_int8_backend(int8_backend)
    check_inference_ready(model, f"quantize(model, {precision!r})")
    _check_layers(model, precision)
    device = next(model.parameters()).device
    on_cpu = device.type == "cpu"
    out = copy.deepcopy(model)
    if precision == "bf16":
        if on_cpu:
            hardware.warn_if_slow("bf16")
        return out.to(torch.bfloat16)
    if precision != "int8":
        return out

    def selected(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and not any(fnmatch.fnmatchcase(name, p) for p in keep_fp32)

    backend = int8_backend_for(device) if int8_backend == "auto" else int8_backend
    if backend == "torch.ao":
        if not on_cpu:
            raise ValueError(f"int8_backend 'torch.ao' runs on the CPU only; this model is on {device}: use 'torchao'")
        return _quantize_torch_ao(out, [name for name, m in out.named_modules() if selected(m, name)])
    if on_cpu:
        hardware.warn_if_slow("int8", instead="; int8_backend='torch.ao' (fbgemm) has AVX2 kernels")
    # torchao is imported here: importing it costs seconds and logs warnings nothing else needs.
    with quiet_logs("torch.utils._pytree", "torch.utils.cpp_extension"):
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    # set_inductor_config=False: it changes torch.compile's global settings, which a benchmark
    # that compiles other models must not inherit.
    quantize_(out, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False), filter_fn=selected)
    return out


def _quantize_torch_ao(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """``model`` with the Linear layers ``names`` replaced, in place, by torch.ao's dynamic int8 Linear."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    # torch.ao.quantization is deprecated in favour of torchao, whose eager int8 is the slower of the
    # two on CPUs (see int8_backend_for): its warnings are not the user's to act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=TORCH_AO_DEPRECATION)
        quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8, inplace=True)
    return model.eval()  # the new layers are built in training mode


def precision_of(model: nn.Module) -> str:
    """``int8`` if any Linear layer holds quantized weights, ``bf16`` for bfloat16 parameters, else ``fp32``."""
    if _quantized_layers(model):
        return "int8"
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return "bf16" if dtypes == {torch.bfloat16} else "fp32"
