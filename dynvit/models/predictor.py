"""The keep predictor: where DynamicViT decides which patch tokens to keep."""

from __future__ import annotations

import math

import torch
from torch import nn


class KeepPredictor(nn.Module):
    """Scores every patch token with log-probabilities of (keep, drop).

    Each token's score sees its own features (the first half of the hidden channels) and a global
    context: the mean of the second half over the tokens still kept. Parameter names follow the
    released DynamicViT checkpoints (``in_conv.{0,1}``, ``out_conv.{0,2,4}``) so they load as they are.
    The hierarchical students (ConvNeXt, Swin) score the locations of a feature map with the same
    module, their context being the mean over every location.

    Args:
        embed_dim: Token width C of the backbone.
        eps: Epsilon of the input LayerNorm: PyTorch's 1e-5 in the ViT and Swin references, 1e-6 in
            the ConvNeXt one.
    """

    def __init__(self, embed_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim, eps=eps), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2),
            nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4),
            nn.GELU(),
            nn.Linear(embed_dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    @torch.no_grad()
    def start_at(self, keep_prob: float) -> None:
        """Set the output bias so that a predictor whose last layer outputs ~0 keeps each token with
        probability ``keep_prob`` (in (0, 1]) instead of 1/2. Only the bias changes, so the learned
        scores and released checkpoints are untouched."""
        if not 0.0 < keep_prob <= 1.0:
            raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob}")
        # log(1 - p) is -inf at p = 1; a finite floor keeps the logits (and their gradients) finite.
        drop = math.log(max(1.0 - keep_prob, 1e-6))
        self.out_conv[-2].bias.copy_(torch.tensor([math.log(keep_prob), drop]))

    def keep_log_odds(self, x: torch.Tensor, num_prefix: int = 0) -> torch.Tensor:
        """Inference scores: the log-odds of keeping (B, N - P) each token of x (B, N, C) after its first
        ``num_prefix`` P, every one of them kept so far (the context is their plain mean).

        The log-odds rank tokens as ``log p(keep)`` does without its rounding: ``log p(keep)`` rounds to
        exactly 0 in float32 once the odds pass ~e^17, where a predictor trained to keep nearly everything
        would tie on every token. They are the difference of :meth:`forward`'s two outputs (the ranking key
        the released code's order is tested against). The first layers run on the whole of x, prefix
        included: one extra row each, where slicing the prefix off first would copy every token.
        """
        h = self.in_conv(x)
        half = h.shape[-1] // 2
        local = h[:, num_prefix:, :half]
        context = h[:, num_prefix:, half:].mean(dim=1, keepdim=True)
        scores = self.out_conv(torch.cat([local, context.expand_as(local)], dim=-1))
        return scores[..., 0] - scores[..., 1]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args: tokens ``x`` (B, N, C) and the current keep mask (B, N, 1), or None for a context
        over every token. Returns (B, N, 2)."""
        h = self.in_conv(x)
        half = h.shape[-1] // 2
        local, context = h[..., :half], h[..., half:]
        if mask is None:
            context = context.mean(dim=1, keepdim=True)
        else:
            # The clamp keeps a stage whose tokens were all dropped finite (the mean of nothing is 0 here).
            kept = mask.sum(dim=1, keepdim=True).clamp_min(1e-6)
            context = (context * mask).sum(dim=1, keepdim=True) / kept
        return self.out_conv(torch.cat([local, context.expand_as(local)], dim=-1))
