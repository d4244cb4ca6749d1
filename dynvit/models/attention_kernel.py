"""Which kernel runs a softmax attention: PyTorch's fused ``F.scaled_dot_product_attention`` or the explicit
math ``softmax(q kᵀ · scale + bias) v``, chosen per shape.

On the CPU, SDPA runs its flash kernel, whose speed is erratic in the sequence length at small head
dimensions: on a 2-core AVX2 EPYC at head dim 32, an attention call took 1.04 ms at 65 tokens, 1.31 ms at
58 and 1.24 ms at 47, where the math path took 0.63 ms. Which one wins depends on the CPU, the thread count and the
shape (docs/reference.md, "Attention kernel"), so no fixed rule is used: ``"auto"``
(the default) times both kernels on the first call of each (shapes, dtype, device, threads) and caches
the winner, as ``torch.backends.cudnn.benchmark`` does for convolutions. Everything else keeps SDPA:
other devices (where SDPA's own dispatcher already picks per shape), calls that need gradients or
dropout, traced, compiled and exported graphs (the choice is a Python branch, and the graph should
stay one portable op), and attention matrices too large to materialise.

The kernel of every attention that dynvit's pruned and reduced ViTs run passes through :func:`attend`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

KERNELS = ("auto", "sdpa", "math")
# The math path materialises (B, H, N, M) scores: above this many bytes it is never tried.
MAX_MATH_BYTES = 64 * 2**20
# Math must beat SDPA by this factor to be chosen, so that timing noise does not flip equal kernels.
MATH_MARGIN = 0.95
# ... and by this many seconds a call: math is five dispatched ops to SDPA's one, and inside a forward each
# costs more than in the timing loop (digits ViT at batch 1, 2-core EPYC: a block ran 2-13 µs slower on
# math at 22-65 tokens where the loop timed math 6 µs faster to 3 µs slower; docs/reference.md).
MATH_MIN_SAVING_S = 10e-6
# Timed calls per kernel (alternating, after one untimed call each); the fastest counts.
ROUNDS = 5

_chosen: dict[tuple, str] = {}


def check_kernel(kernel: str) -> str:
    """``kernel`` if it names a kernel setting, else ``ValueError`` listing them."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {list(KERNELS)}, got {kernel!r}")
    return kernel


_kernel = check_kernel(os.environ.get("DYNVIT_ATTENTION_KERNEL", "auto"))


def set_attention_kernel(kernel: str) -> None:
    """Use ``kernel`` for every :func:`attend` from now on: ``"auto"`` (measured per shape), ``"sdpa"`` or ``"math"``.

    The starting setting comes from the environment variable ``DYNVIT_ATTENTION_KERNEL`` (``auto`` if unset).
    """
    global _kernel
    _kernel = check_kernel(kernel)


def attention_kernel() -> str:
    """The current kernel setting (see :func:`set_attention_kernel`)."""
    return check_kernel(_kernel)


@contextlib.contextmanager
def use_attention_kernel(kernel: str) -> Iterator[None]:
    """:func:`set_attention_kernel` inside the ``with``; the previous setting after it."""
    previous = _kernel
    set_attention_kernel(kernel)
    try:
        yield
    finally:
        set_attention_kernel(previous)


def chosen_kernels() -> dict[tuple, str]:
    """The kernels ``"auto"`` has chosen so far, by (q shape, k shape, bias shape, dtype, device, threads)."""
    return dict(_chosen)


def clear_chosen_kernels() -> None:
    """Forget every measured choice, so the next call of each shape measures again."""
    _chosen.clear()


def math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``softmax(q kᵀ · scale + bias) v`` for (B, H, N, D) queries and (B, H, M, D) keys and values; the softmax
    runs in float32 at least, as SDPA's kernels accumulate."""
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    weights = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    return weights.to(v.dtype) @ v


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


_KERNEL_FUNCTIONS = {"sdpa": _sdpa, "math": math_attention}


def _measurable(q_shape: torch.Size, keys: int, dtype: torch.dtype, device: torch.device, needs_grad: bool) -> bool:
    """Whether ``"auto"`` may time a call: eager CPU inference whose (q_shape[:-1], keys) scores are small enough."""
    if (
        device.type != "cpu"
        or needs_grad
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
    ):
        return False
    return q_shape[:-1].numel() * keys * torch.promote_types(dtype, torch.float32).itemsize <= MAX_MATH_BYTES


def _measure(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None) -> str:
    """Time both kernels on these very inputs, alternating, and name the faster (SDPA unless math clearly wins)."""
    best = dict.fromkeys(_KERNEL_FUNCTIONS, float("inf"))
    for function in _KERNEL_FUNCTIONS.values():
        function(q, k, v, scale, bias)  # untimed: first-call set-up
    for _ in range(ROUNDS):
        for kernel, function in _KERNEL_FUNCTIONS.items():
            start = time.perf_counter()
            function(q, k, v, scale, bias)
            best[kernel] = min(best[kernel], time.perf_counter() - start)
    clearly_faster = best["math"] < MATH_MARGIN * best["sdpa"] and best["sdpa"] - best["math"] > MATH_MIN_SAVING_S
    return "math" if clearly_faster else "sdpa"


def _choice_key(
    q_shape: torch.Size, k_shape: torch.Size, dtype: torch.dtype, device: torch.device, bias: torch.Tensor | None
) -> tuple:
    bias_key = None if bias is None else (tuple(bias.shape), bias.dtype)
    return (tuple(q_shape), tuple(k_shape), bias_key, dtype, device, torch.get_num_threads())


def planned_kernel(
    q_shape: torch.Size,
    k_shape: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
    needs_grad: bool,
    bias: torch.Tensor | None = None,
) -> str | None:
    """The kernel :func:`attend` runs for queries and keys of these shapes under the current setting, or None
    where ``"auto"`` has yet to measure them. From shapes alone, so an attention layer can know it before
    computing its queries (:class:`~dynvit.models.masked_attention.KernelAttention` then runs timm's own code
    for SDPA)."""
    if _kernel == "sdpa" or not _measurable(q_shape, k_shape[-2], dtype, device, needs_grad):
        return "sdpa"
    if _kernel == "math":
        return "math"
    return _chosen.get(_choice_key(q_shape, k_shape, dtype, device, bias))


def kernel_for(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> str:
    """The kernel :func:`attend` runs for these inputs under the current setting, measuring it first if
    ``"auto"`` has not seen this shape yet."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias))
    kernel = planned_kernel(q.shape, k.shape, q.dtype, q.device, needs_grad, bias)
    if kernel is None:
        kernel = _chosen[_choice_key(q.shape, k.shape, q.dtype, q.device, bias)] = _measure(q, k, v, scale, bias)
    return kernel


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention (B, H, N, D) of queries q, keys and values k, v, with an additive ``bias``
    broadcastable to (B, H, N, M), by the kernel :func:`kernel_for` picks; with dropout always SDPA.

    Args:
        scale: Multiplies the logits ``q kᵀ`` (timm's ``Attention.scale``, ``head_dim ** -0.5``).
        bias: A float bias in q's dtype, e.g. ToMe's ``log(size)`` per key, or None.
        dropout_p: Attention dropout (training only).
    """
    if dropout_p > 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    return _KERNEL_FUNCTIONS[kernel_for(q, k, v, scale, bias)](q, k, v, scale, bias)


__all__ = [
    "KERNELS",
    "attend",
    "attention_kernel",
    "check_kernel",
    "chosen_kernels",
    "clear_chosen_kernels",
    "kernel_for",
    "math_attention",
    "planned_kernel",
    "set_attention_kernel",
    "use_attention_kernel",
]
