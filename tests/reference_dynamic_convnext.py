"""An independent re-implementation of the reference DynamicCNN (dynamic spatial sparsification of
ConvNeXt), for tests only.

Written from the method description and checkpoint layout in docs/reference.md, in plain torch: it
imports neither timm nor dynvit, so the equivalence tests compare two separate implementations.
Parameter names are those of the released checkpoints and of FB's ConvNeXt (``downsample_layers.*``,
``stages.{i}.{j}.{dwconv, norm, pwconv1, pwconv2, gamma, fast_path.*, fast_path_gamma}``, ``norm``,
``head``, ``score_predictor.{s}.{in_conv, out_conv}`` with 1×1 convolutions), so its ``state_dict()``
is a released-checkpoint stand-in. Inference selects locations with per-image advanced indexing
(not the gather/scatter of dynvit); training takes its Gumbel noise as an argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map, written out (the reference's own)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Block(nn.Module):
    def __init__(self, dim: int, fast_path: bool) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))
        if fast_path:
            self.fast_path = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, dim))
            self.fast_path_gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def mlp(self, t: torch.Tensor) -> torch.Tensor:
        return self.gamma * self.pwconv2(F.gelu(self.pwconv1(self.norm(t))))

    def fast(self, t: torch.Tensor) -> torch.Tensor:
        return self.fast_path_gamma * self.fast_path(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.dwconv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_streams(self, x1: torch.Tensor, x2: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.dwconv(x1 * m + x2 * (1 - m))
        s1 = (y * m + x1 * (1 - m)).permute(0, 2, 3, 1)
        s2 = (y * (1 - m) + x2 * m).permute(0, 2, 3, 1)
        return x1 + self.mlp(s1).permute(0, 3, 1, 2), x2 + self.fast(s2).permute(0, 3, 1, 2)

    def forward_indexed(self, x: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = self.dwconv(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        rows = torch.arange(B)[:, None]
        out = torch.zeros_like(tokens)
        out[rows, keep] = self.mlp(tokens[rows, keep])
        out[rows, drop] = self.fast(tokens[rows, drop])
        return x + out.reshape(B, H, W, C).permute(0, 3, 1, 2)


class Predictor(nn.Module):
    """Scores (B, 2, H, W) as log-probabilities, channel 0 "keep"; 1×1 convolutions as released."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(ChannelsFirstLayerNorm(dim), nn.Conv2d(dim, dim, 1), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Conv2d(dim, dim // 2, 1),
            nn.GELU(),
            nn.Conv2d(dim // 2, dim // 4, 1),
            nn.GELU(),
            nn.Conv2d(dim // 4, 2, 1),
            nn.LogSoftmax(dim=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(x)
        half = h.shape[1] // 2
        context = h[:, half:].mean(dim=(2, 3), keepdim=True).expand(-1, -1, *h.shape[2:])
        return self.out_conv(torch.cat([h[:, :half], context], dim=1))


class DynamicCNNReference(nn.Module):
    """Reference DynamicCNN; ``pruning_loc=None`` builds the plain ConvNeXt (FB teacher layout)."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        pruning_loc: Sequence[int] | None = (1, 2, 3),
    ) -> None:
        super().__init__()
        self.pruning_loc = None if pruning_loc is None else tuple(pruning_loc)
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), ChannelsFirstLayerNorm(dims[0]))]
            + [
                nn.Sequential(ChannelsFirstLayerNorm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2))
                for i in range(3)
            ]
        )
        first = None if pruning_loc is None else pruning_loc[0]
        self.stages = nn.ModuleList(
            nn.Sequential(*[Block(dims[i], i == 2 and first is not None and j >= first) for j in range(depths[i])])
            for i in range(4)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        if pruning_loc is not None:
            self.score_predictor = nn.ModuleList(Predictor(dims[2]) for _ in pruning_loc)

    def forward(
        self, x: torch.Tensor, keep_ratio: float = 0.7, gumbel_noise: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Eval: logits. Training (pass ``gumbel_noise``, one (B, 2, H, W) sample per predictor):
        logits, the final map after the final norm (B, H, W, C), and the decisions (B, 1, H, W)."""
        training = gumbel_noise is not None
        for i in range(2):
            x = self.stages[i](self.downsample_layers[i](x))
        x = self.downsample_layers[2](x)
        ratios = [keep_ratio - 0.2 * s for s in range(len(self.pruning_loc or ()))]
        streams, mask, split, decisions = None, None, None, []
        for j, block in enumerate(self.stages[2]):
            if self.pruning_loc is not None and j in self.pruning_loc:
                s = self.pruning_loc.index(j)
                current = x if streams is None else streams[0] * mask + streams[1] * (1 - mask)
                scores = self.score_predictor[s](current)
                if training:
                    soft = (scores + gumbel_noise[s]).softmax(dim=1)
                    hard = F.one_hot(soft.argmax(dim=1), 2).permute(0, 3, 1, 2).to(soft.dtype)
                    mask = (hard - soft.detach() + soft)[:, :1]
                    decisions.append(mask)
                    if streams is None:
                        streams = (x, x)
                else:
                    n = scores.shape[2] * scores.shape[3]
                    order = torch.argsort(scores[:, 0].reshape(x.shape[0], n), dim=1, descending=True)
                    count = int(n * ratios[s])
                    split = (order[:, :count], order[:, count:])
            if streams is not None:
                streams = block.forward_streams(*streams, mask)
            elif split is not None:
                x = block.forward_indexed(x, *split)
            else:
                x = block(x)
        if streams is not None:
            x = streams[0] * mask + streams[1] * (1 - mask)
        x = self.stages[3](self.downsample_layers[3](x))
        logits = self.head(self.norm(x.mean(dim=(2, 3))))
        if training:
            return logits, self.norm(x.permute(0, 2, 3, 1)), decisions
        return logits
