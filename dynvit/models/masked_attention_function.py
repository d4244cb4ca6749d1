"""DynamicViT's masked attention as one autograd Function that recomputes its weights in backward.

The plain formula (:func:`~dynvit.models.masked_attention.masked_softmax` followed by a matmul) lets
autograd keep several float32 (B, H, N, N) tensors per block alive until backward: the logits, the
exponentials, the mask, the normalised weights. :func:`masked_attention` computes the same numbers
but saves only q, k, v, the keep mask and three (B, H, N) row statistics, and rebuilds the weights
query chunk by query chunk in backward, the way FlashAttention does for the ordinary softmax.

Gradient derivation (per batch b, head h; i indexes queries, j keys; ``g_ij = dO_i · v_j``)::

    s_ij = scale q_i·k_j,   m_i = max_j s_ij,   e_ij = exp(s_ij - m_i)
    M_ij = keep_j + (1 - keep_j) δ_ij,   w_ij = e_ij M_ij,   D_i = Σ_j w_ij + eps
    p_ij = (w_ij + eps/N) / D_i,   O_i = Σ_j p_ij v_j

    dv_j     = Σ_i p_ij dO_i
    ∂L/∂w_ij = (g_ij - Δ_i) / D_i =: t_ij     with Δ_i = Σ_j p_ij g_ij  (= dO_i·O_i, eps terms included)
    ∂L/∂s_ij = w_ij t_ij  (+ ∂L/∂m_i at j = argmax_j s_ij)
    ∂L/∂m_i  = -Σ_j w_ij t_ij = -(eps / D_i) (Δ_i - Σ_j g_ij / N)
    ∂L/∂keep_j = Σ_h Σ_{i≠j} e_ij t_ij
    dq_i = scale Σ_j ∂L/∂s_ij k_j,   dk_j = scale Σ_i ∂L/∂s_ij q_i

Without eps the row max would cancel exactly; with it p depends on m_i, and the term is not
negligible: when every key a query may see scores far below its (masked-out) row maximum, ``D_i``
shrinks towards eps and the row tends to the uniform ``1/N``. So the max term is kept, in the
closed form above (summing ``w_ij t_ij`` directly would cancel catastrophically). Like
``torch.max``, the max's gradient goes to one arg-max key; ``amax`` in the plain formula splits it
over exact ties, which differs only on tied rows and then by that eps-sized term.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

# The reference's smoothing constant; re-exported by ``dynvit.models.masked_attention``.
MASK_EPS = 1e-6
# Elements of one (B, H, chunk, N) temporary; 2**25 float32 is 128 MiB. Bounds the transient
# memory of forward and backward; tiny models fit in one chunk and pay no loop overhead.
CHUNK_ELEMENTS = 2**25
KEEP_GRADIENTS = ("tangent", "secant")


def check_keep_gradient(mode: str) -> None:
    """Raise ``ValueError`` unless ``mode`` names a keep gradient (:data:`KEEP_GRADIENTS`)."""
    if mode not in KEEP_GRADIENTS:
        raise ValueError(f"keep_gradient must be one of {KEEP_GRADIENTS}, got {mode!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 for half inputs (the reference precision); float64 stays float64 for gradcheck.
    return torch.promote_types(dtype, torch.float32)


def _chunk_bounds(num_rows: int, rows_per_chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + rows_per_chunk, num_rows)) for start in range(0, num_rows, rows_per_chunk)]


class MaskedAttentionFunction(torch.autograd.Function):
    """Autograd Function behind :func:`masked_attention`; call that instead of ``apply``."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        keep: torch.Tensor,
        scale: float,
        eps: float,
        chunk_size: int,
        secant: bool,
    ) -> torch.Tensor:
        B, H, N, _ = q.shape
        ct = _compute_dtype(q.dtype)
        # Autocast would run the matmuls below in half precision; the reference formula is float32.
        with torch.autocast(q.device.type, enabled=False):
            qf, kf, vf, keepf = q.to(ct), k.to(ct), v.to(ct), keep.to(ct)
            kt = kf.transpose(-2, -1)
            keep_b = keepf[:, None, None, :]
            eye = torch.eye(N, dtype=ct, device=q.device)
            out = q.new_empty(B, H, N, v.shape[-1], dtype=ct)
            rowmax = q.new_empty(B, H, N, 1, dtype=ct)
            denom = q.new_empty(B, H, N, 1, dtype=ct)
            argmax = q.new_empty(B, H, N, 1, dtype=torch.long)
            for start, stop in _chunk_bounds(N, chunk_size):
                s = (qf[:, :, start:stop] @ kt) * scale
                m, idx = s.max(dim=-1, keepdim=True)
                allowed = keep_b + (1.0 - keep_b) * eye[start:stop]
                w = (s - m).exp_().mul_(allowed)
                d = w.sum(dim=-1, keepdim=True) + eps
                out[:, :, start:stop] = ((w + eps / N) / d) @ vf
                rowmax[:, :, start:stop], denom[:, :, start:stop], argmax[:, :, start:stop] = m, d, idx
        ctx.save_for_backward(q, k, v, keep, rowmax, denom, argmax)
        ctx.scale, ctx.eps, ctx.chunk_size, ctx.secant = scale, eps, chunk_size, secant
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, keep, rowmax, denom, argmax = ctx.saved_tensors
        scale, eps = ctx.scale, ctx.eps
        B, H, N, _ = q.shape
        ct = _compute_dtype(q.dtype)
        with torch.autocast(q.device.type, enabled=False):
            qf, kf, vf, keepf, dof = q.to(ct), k.to(ct), v.to(ct), keep.to(ct), grad_out.to(ct)
            kt, vt = kf.transpose(-2, -1), vf.transpose(-2, -1)
            keep_b = keepf[:, None, None, :]
            eye = torch.eye(N, dtype=ct, device=q.device)
            dq, dk, dv = torch.empty_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
            dkeep = torch.zeros_like(keepf)
            for start, stop in _chunk_bounds(N, ctx.chunk_size):
                rows = slice(start, stop)
                q_c, do_c, d = qf[:, :, rows], dof[:, :, rows], denom[:, :, rows]
                e = ((q_c @ kt) * scale - rowmax[:, :, rows]).exp_()
                w = e * (keep_b + (1.0 - keep_b) * eye[rows])
                p = (w + eps / N) / d
                dv += p.transpose(-2, -1) @ do_c
                g = do_c @ vt
                delta = (g * p).sum(dim=-1, keepdim=True)
                t = (g - delta) / d
                # dL/dm in closed form (see module docstring), routed to the arg-max key.
                dm = -(eps / d) * (delta - g.mean(dim=-1, keepdim=True))
                ds = (w * t).scatter_add_(-1, argmax[:, :, rows], dm)
                dq[:, :, rows] = (ds @ kf) * scale
                dk += (ds.transpose(-2, -1) @ q_c) * scale
                if ctx.needs_input_grad[3]:
                    # keep_j does not gate the diagonal (a token always sees itself): drop i = j.
                    if ctx.secant:
                        # Dropped key j: the slope of the line to keep_j = 1, i.e. D_i grown by e_ij.
                        t = t * d / (d + e * (1.0 - keep_b))
                    et = e.mul_(t)
                    dkeep += et.sum(dim=(1, 2))
                    dkeep[:, rows] -= torch.diagonal(et[..., rows], dim1=-2, dim2=-1).sum(dim=1)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dkeep.to(keep.dtype), None, None, None, None


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
    eps: float = MASK_EPS,
    chunk_size: int | None = None,
    keep_gradient: str = "tangent",
) -> torch.Tensor:
    """DynamicViT masked attention ``masked_softmax(scale q kᵀ, keep) @ v`` without N×N activations.

    Query i sees key j only if ``keep[j] = 1`` or ``j = i``; the weights are
    ``(exp(s - rowmax) M + eps/N) / (Σ exp(s - rowmax) M + eps)`` computed in float32 (float64 for
    float64 inputs) whatever the input dtype, also under autocast. Gradients reach q, k, v and the
    keep mask; backward recomputes the weights from the saved row statistics.

    Args:
        q: Queries (B, H, N, d).
        k: Keys (B, H, N, d).
        v: Values (B, H, N, d_v).
        keep: Keep mask (B, N) in [0, 1], shared by all heads; differentiable.
        scale: Logit scale, usually ``d ** -0.5``.
        eps: The reference's smoothing constant.
        chunk_size: Queries processed at a time; by default as many as keep one (B, H, chunk, N)
            temporary within ``CHUNK_ELEMENTS``.
        keep_gradient: ``"tangent"``, the derivative at the given mask (the reference), or ``"secant"``:
            for a dropped key j, ``e_ij t_ij`` with ``D_i`` replaced by ``D_i + e_ij``, the slope to
            keep_j = 1 (see :func:`~dynvit.models.masked_attention.set_keep_gradient`).

    Returns:
        The attention output (B, H, N, d_v) in the dtype of ``q``.
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k, v must be (B, H, N, d) with matching B, H, N (and d for q, k); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, N, _ = q.shape
    if keep.shape != (B, N):
        raise ValueError(f"keep must be (B, N) = ({B}, {N}) to match q; got {tuple(keep.shape)}")
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // (B * H * N))
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of queries, got {chunk_size}")
    check_keep_gradient(keep_gradient)
    secant = keep_gradient == "secant"
    return MaskedAttentionFunction.apply(q, k, v, keep, float(scale), float(eps), int(chunk_size), secant)


__all__ = [
    "CHUNK_ELEMENTS",
    "KEEP_GRADIENTS",
    "MASK_EPS",
    "MaskedAttentionFunction",
    "check_keep_gradient",
    "masked_attention",
]
