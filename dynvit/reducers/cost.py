"""GFLOPs of a reduced ViT at given token counts, from the same fvcore counter as ``count_flops``.

A block's FLOPs are a polynomial in its token count n: the attention half (norm, qkv, the two
attention matrix products, projection) is quadratic, the MLP half (norm, two linears) linear. So
fvcore counts each half of each block at n = 1, 2, 3 once, and the polynomials then give the cost
of any count exactly — e.g. for ATS, whose counts differ per image. The embedding and the head are
counted once; the final norm is linear in the tokens left. At the unreduced counts the total equals
``count_flops`` of the plain model. The reducers' own bookkeeping (ToMe's similarity matrix, the class
token's attention row, top-k, sorting) is not included: it is well under 1% on DeiT-S.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from dynvit.measure.flops import count_module_flops
from dynvit.measure.throughput import check_measurable, keep_rng
from dynvit.models.dynamic_vit import input_size
from dynvit.models.tokens import embed_tokens
from dynvit.reducers.base import ReducedViT


class _Call(nn.Module):
    """A function of some modules, as a module fvcore can trace."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], *modules: nn.Module) -> None:
        super().__init__()
        self.fn, self.parts = fn, nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _polynomial(counts: list[int]) -> list[float]:
    """Coefficients (c0, c1[, c2]) of the polynomial through f(1), f(2)[, f(3)]."""
    if len(counts) == 2:
        f1, f2 = counts
        return [2 * f1 - f2, f2 - f1]
    f1, f2, f3 = counts
    c2 = (f3 - 2 * f2 + f1) / 2
    c1 = f2 - f1 - 3 * c2
    return [f1 - c1 - c2, c1, c2]


def _evaluate(coeffs: list[float], n: torch.Tensor) -> torch.Tensor:
    return sum(c * n.double() ** p for p, c in enumerate(coeffs))


class TokenCost:
    """FLOPs of one image through a ViT as a function of its per-block token counts.

    Build once per model with :meth:`from_model`, then call it on counts (B, depth, 2) — the tokens
    in each block's attention and MLP, as ``ReducedViT.predict_with_counts`` returns them — to get
    GFLOPs per image (B,).
    """

    def __init__(self, fixed: float, attn: list[list[float]], mlp: list[list[float]], tail: list[float]) -> None:
        self.fixed, self.attn, self.mlp, self.tail = fixed, attn, mlp, tail

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: nn.Module) -> TokenCost:
        """Fit the per-block polynomials of a timm ViT (reduced or not) with fvcore."""
        check_measurable(model)
        param = next(model.parameters())
        dim = model.embed_dim

        def tokens(n: int) -> torch.Tensor:
            return torch.randn(1, n, dim, device=param.device, dtype=param.dtype)

        was_training = model.training
        model.eval()
        # The random tokens and image must not move the caller's random stream, as no measurement does.
        with keep_rng(param.device), contextlib.ExitStack() as restore:
            restore.callback(model.train, was_training)
            attn, mlp = [], []
            for b in model.blocks:
                half = _Call(lambda x, b=b: x + b.ls1(b.attn(b.norm1(x))), b)
                attn.append(_polynomial([count_module_flops(half, tokens(n)) for n in (1, 2, 3)]))
                half = _Call(lambda x, b=b: x + b.ls2(b.mlp(b.norm2(x))), b)
                mlp.append(_polynomial([count_module_flops(half, tokens(n)) for n in (1, 2)]))
            # The head reads its prefix tokens (a distilled DeiT two), so count it from that many tokens on
            # (at least one); the line through two counts extends to every count.
            head = _Call(lambda x: model.forward_head(model.norm(x)), model)
            first = max(model.num_prefix_tokens, 1)
            f1, f2 = (count_module_flops(head, tokens(n)) for n in (first, first + 1))
            tail = [f1 - (f2 - f1) * first, f2 - f1]
            # input_size reads in_chans, so stems whose proj is not one convolution (vit_digits) work too.
            image = torch.randn(1, *input_size(model), device=param.device, dtype=param.dtype)
            embed = _Call(lambda x: embed_tokens(model, x), model)
            fixed = count_module_flops(embed, image)
        return cls(fixed, attn, mlp, tail)

    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        """GFLOPs (B,) float64 of images whose blocks saw ``counts`` (B, depth, 2) tokens."""
        if counts.ndim != 3 or counts.shape[1:] != (len(self.attn), 2):
            raise ValueError(f"counts must be (B, {len(self.attn)}, 2), got {tuple(counts.shape)}")
        total = self.fixed + _evaluate(self.tail, counts[:, -1, 1])
        for i, (a, m) in enumerate(zip(self.attn, self.mlp, strict=True)):
            total = total + _evaluate(a, counts[:, i, 0]) + _evaluate(m, counts[:, i, 1])
        return total / 1e9


def realised_gflops(
    model: ReducedViT, x: torch.Tensor, cost: TokenCost | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """GFLOPs each image of x actually used, and its token counts (B, depth, 2).

    For fixed-count reducers every image costs the same; for ATS it is the cost of the image on its
    own (no batch padding).
    """
    cost = TokenCost.from_model(model) if cost is None else cost
    _, counts = model.predict_with_counts(x)
    return cost(counts), counts


__all__ = ["TokenCost", "realised_gflops"]
