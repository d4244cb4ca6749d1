"""An independent re-implementation of the reference DynamicSwin (dynamic spatial sparsification of
Swin), for tests only.

Written from the method description and checkpoint layout in docs/reference.md, in plain torch: it
imports neither timm nor dynvit, so the equivalence tests compare two separate implementations.
Parameter and buffer names are those of MSRA's Swin and of the released DynamicSwin files
(``patch_embed.{proj, norm}``, ``layers.{i}.blocks.{j}.{norm1, attn.{relative_position_bias_table,
relative_position_index, qkv, proj}, norm2, mlp.{fc1, fc2}, attn_mask, fastmlp.fc1.{0, 1}}``,
``layers.{i}.downsample.{norm, reduction}`` at the *end* of stages 1-3, ``layers.2.score_predictor``,
``norm``, ``head``), so its ``state_dict()`` is a released-checkpoint stand-in. Windows are written
with unfold-style reshapes of our own; inference selects locations with per-image advanced indexing
(not the gather/scatter of dynvit); training takes its Gumbel noise as an argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def to_windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) → (B · windows, w·w, C), windows in row-major order."""
    B, H, W, C = x.shape
    return x.view(B, H // w, w, W // w, w, C).transpose(2, 3).reshape(-1, w * w, C)


def from_windows(windows: torch.Tensor, w: int, H: int, W: int) -> torch.Tensor:
    C = windows.shape[-1]
    return windows.view(-1, H // w, W // w, w, w, C).transpose(2, 3).reshape(-1, H, W, C)


def shift_mask(H: int, W: int, w: int, shift: int) -> torch.Tensor:
    """(windows, w·w, w·w): 0 between locations of the same region of the rolled map, −100 otherwise."""
    region = torch.zeros(H, W)
    cuts = ((0, H - w), (H - w, H - shift), (H - shift, H)), ((0, W - w), (W - w, W - shift), (W - shift, W))
    for a, (h0, h1) in enumerate(cuts[0]):
        for b, (w0, w1) in enumerate(cuts[1]):
            region[h0:h1, w0:w1] = 3 * a + b
    ids = to_windows(region.view(1, H, W, 1), w).squeeze(-1)
    return torch.where(ids[:, None, :] == ids[:, :, None], 0.0, -100.0)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, w: int) -> None:
        super().__init__()
        self.heads = heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * w - 1) ** 2, heads))
        rows, cols = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
        dr = rows.flatten()[:, None] - rows.flatten()[None, :] + w - 1
        dc = cols.flatten()[:, None] - cols.flatten()[None, :] + w - 1
        self.register_buffer("relative_position_index", dr * (2 * w - 1) + dc)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        Bw, n, C = x.shape
        q, k, v = self.qkv(x).view(Bw, n, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        logits = (q * (C // self.heads) ** -0.5) @ k.transpose(-2, -1)
        logits = logits + self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)
        if mask is not None:
            logits = (logits.view(-1, mask.shape[0], self.heads, n, n) + mask[None, :, None]).view(Bw, self.heads, n, n)
        return self.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(Bw, n, C))


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class FastMlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(x)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, resolution: int, window: int, shifted: bool, fast: bool) -> None:
        super().__init__()
        # A map no larger than the window is one window, never shifted (MSRA's rule).
        self.window = min(window, resolution)
        self.shift = self.window // 2 if shifted and resolution > window else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, self.window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)
        if fast:
            self.fastmlp = FastMlp(dim)
        self.register_buffer(
            "attn_mask", shift_mask(resolution, resolution, self.window, self.shift) if self.shift else None
        )

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) plus window attention of its norm."""
        B, H, W, C = x.shape
        t = torch.roll(self.norm1(x), (-self.shift, -self.shift), (1, 2))
        t = from_windows(self.attn(to_windows(t, self.window), self.attn_mask), self.window, H, W)
        return x + torch.roll(t, (self.shift, self.shift), (1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attend(x)
        return x + self.mlp(self.norm2(x))

    def forward_streams(self, x1: torch.Tensor, x2: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.attend(x1 * m + x2 * (1 - m))
        return y + self.mlp(self.norm2(y * m + x1 * (1 - m))), y + self.fastmlp(y * (1 - m) + x2 * m)

    def forward_indexed(self, x: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        y = self.attend(x)
        B, H, W, C = y.shape
        tokens = y.reshape(B, H * W, C)
        rows = torch.arange(B)[:, None]
        out = torch.zeros_like(tokens)
        out[rows, keep] = self.mlp(self.norm2(tokens[rows, keep]))
        out[rows, drop] = self.fastmlp(tokens[rows, drop])
        return (tokens + out).view(B, H, W, C)


class PatchMerging(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # MSRA's order of a 2×2 neighbourhood: (0,0), (1,0), (0,1), (1,1) as (row, column).
        parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
        return self.reduction(self.norm(torch.cat(parts, dim=-1)))


class Predictor(nn.Module):
    """Scores (B, N, 2) as log-probabilities, channel 0 "keep"; context = mean over every location."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(x)
        half = h.shape[-1] // 2
        context = h[..., half:].mean(dim=1, keepdim=True).expand(-1, h.shape[1], -1)
        return self.out_conv(torch.cat([h[..., :half], context], dim=-1))


class Stage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, resolution: int, window: int, first_fast: int | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, heads, resolution, window, j % 2 == 1, first_fast is not None and j >= first_fast)
            for j in range(depth)
        )


class DynamicSwinReference(nn.Module):
    """Reference DynamicSwin; ``pruning_loc=None`` builds the plain Swin (MSRA teacher layout)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        pruning_loc: Sequence[int] | None = (1, 2, 3),
    ) -> None:
        super().__init__()
        self.pruning_loc = None if pruning_loc is None else tuple(pruning_loc)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            dim, resolution = embed_dim * 2**i, img_size // patch_size // 2**i
            first = self.pruning_loc[0] if i == 2 and self.pruning_loc else None
            stage = Stage(dim, depth, num_heads[i], resolution, window_size, first)
            if i < 3:
                stage.downsample = PatchMerging(dim)
            if first is not None:
                stage.score_predictor = nn.ModuleList(Predictor(dim) for _ in self.pruning_loc)
            self.layers.append(stage)
        self.norm = nn.LayerNorm(embed_dim * 8)
        self.head = nn.Linear(embed_dim * 8, num_classes)

    def forward(
        self, x: torch.Tensor, keep_ratio: float = 0.7, gumbel_noise: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Eval: logits. Training (pass ``gumbel_noise``, one (B, N, 2) sample per predictor): logits,
        the final map after the final norm (B, H·W, C), and the decisions (B, N, 1)."""
        training = gumbel_noise is not None
        x = self.patch_embed.norm(self.patch_embed.proj(x).permute(0, 2, 3, 1))
        decisions = []
        for i, stage in enumerate(self.layers):
            if i == 2 and self.pruning_loc is not None:
                x, decisions = self.pruned_stage(stage, x, keep_ratio, gumbel_noise)
            else:
                for block in stage.blocks:
                    x = block(x)
            if i < 3:
                x = stage.downsample(x)
        featmap = self.norm(x.flatten(1, 2))
        logits = self.head(featmap.mean(dim=1))
        return (logits, featmap, decisions) if training else logits

    def pruned_stage(
        self, stage: Stage, x: torch.Tensor, keep_ratio: float, gumbel_noise: Sequence[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        B, H, W, C = x.shape
        ratios = [keep_ratio - 0.2 * s for s in range(len(self.pruning_loc))]
        streams, mask, split, decisions = None, None, None, []
        for j, block in enumerate(stage.blocks):
            if j in self.pruning_loc:
                s = self.pruning_loc.index(j)
                current = x if streams is None else streams[0] * mask + streams[1] * (1 - mask)
                scores = stage.score_predictor[s](current.reshape(B, H * W, C))
                if gumbel_noise is not None:
                    soft = (scores + gumbel_noise[s]).softmax(dim=-1)
                    hard = F.one_hot(soft.argmax(dim=-1), 2).to(soft.dtype)
                    decision = (hard - soft.detach() + soft)[..., :1]
                    decisions.append(decision)
                    mask = decision.view(B, H, W, 1)
                    if streams is None:
                        streams = (x, x)
                else:
                    order = torch.argsort(scores[..., 0], dim=1, descending=True)
                    count = int(H * W * ratios[s])
                    split = (order[:, :count], order[:, count:])
            if streams is not None:
                streams = block.forward_streams(*streams, mask)
            elif split is not None:
                x = block.forward_indexed(x, *split)
            else:
                x = block(x)
        if streams is not None:
            x = streams[0] * mask + streams[1] * (1 - mask)
        return x, decisions
