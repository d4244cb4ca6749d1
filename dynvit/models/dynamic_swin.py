"""DynamicSwin: dynamic spatial sparsification of timm's ``SwinTransformer`` (Rao et al., TPAMI 2023).

Stage 3 keeps its full map: (shifted) window attention runs on every location, then each location
takes either the block's own MLP (the slow path, kept locations) or a small fast path (dropped
ones). The map's shape never changes, so stage 4, the head and dense consumers see a full map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, SwinTransformerStage
from torch import nn

from dynvit.models.dynamic_vit import init_predictor
from dynvit.models.predictor import KeepPredictor


class FastMlp(nn.Module):
    """The fast path of a pruned Swin block: LayerNorm + Linear (C→C), no hidden layer.

    Parameter names follow the released DynamicSwin checkpoints (``fc1.0`` the norm, ``fc1.1`` the
    linear layer) so they load as they are.
    """

    def __init__(self, dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc1(x))


class PrunedSwinBlock(SwinTransformerBlock):
    """A timm ``SwinTransformerBlock`` whose MLP runs on kept locations only.

    Attention is timm's own (``_attn``: cyclic shift, padding, the shifted-window mask) on the full
    map. After it, kept locations take ``mlp(norm2(x))`` and dropped ones ``fastmlp(x)``, each added to
    the attention output through ``drop_path2``.
    """

    fastmlp: FastMlp

    @classmethod
    def convert(cls, block: SwinTransformerBlock) -> PrunedSwinBlock:
        """Turn a built block into a pruned one in place (weights kept) with a fresh fast path."""
        block.__class__ = cls
        block.fastmlp = FastMlp(block.dim, block.mlp.drop1.p).to(block.norm1.weight.device)
        init_predictor(block.fastmlp)
        return block

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention half of the block on the full (B, H, W, C) map, residual included."""
        return x + self.drop_path1(self._attn(self.norm1(x)))

    def forward_streams(
        self, slow: torch.Tensor, fast: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: both paths everywhere, so shapes stay fixed and the mask (B, H, W, 1) gets gradients.

        As the reference: attention sees the two streams blended by the mask; each path's input is the
        attention output where the mask routes that location to it and the path's own stream elsewhere;
        both paths add to the attention output.
        """
        x = self.attend(slow * mask + fast * (1 - mask))
        slow = x + self.drop_path2(self.mlp(self.norm2(x * mask + slow * (1 - mask))))
        fast = x + self.drop_path2(self.fastmlp(x * (1 - mask) + fast * mask))
        return slow, fast

    def forward_split(self, x: torch.Tensor, order: torch.Tensor, num_keep: int) -> torch.Tensor:
        """Inference: the slow path on the first ``num_keep`` locations of ``order`` (B, N), the fast path
        on the rest, scattered back into the (B, H, W, C) map."""
        x = self.attend(x)
        B, H, W, C = x.shape
        flat = x.reshape(B, H * W, C)
        index = order.unsqueeze(-1).expand(-1, -1, C)
        picked = torch.gather(flat, 1, index)
        update = torch.cat(
            [self.mlp(self.norm2(picked[:, :num_keep])), self.fastmlp(picked[:, num_keep:])], dim=1
        )
        return flat.scatter_add(1, index, self.drop_path2(update)).reshape(B, H, W, C)


def stage_ratios(keep_ratio: float, num_stages: int) -> list[float]:
    return [keep_ratio - 0.2 * s for s in range(num_stages)]


class PrunedSwinStage(SwinTransformerStage):
    score_predictor: nn.ModuleList

    @classmethod
    def convert(cls, stage: SwinTransformerStage, pruning_loc: Sequence[int]) -> PrunedSwinStage:
        stage.__class__ = cls
        stage.pruning_loc = tuple(pruning_loc)
        stage.keep_ratios = [1.0] * len(pruning_loc)
        for block in list(stage.blocks)[pruning_loc[0] :]:
            PrunedSwinBlock.convert(block)
        dim = stage.blocks[0].dim
        stage.score_predictor = nn.ModuleList([KeepPredictor(dim) for _ in pruning_loc])
        init_predictor(stage.score_predictor)
        stage.score_predictor.to(stage.blocks[0].norm1.weight.device)
        return stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pruned(x)[0]

    def score(self, s: int, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        flat = x.reshape(B, H * W, C)
        return self.score_predictor[s](flat, flat.new_ones(B, H * W, 1))

    def forward_pruned(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.downsample(x)
        B, H, W, C = x.shape
        N = H * W
        out = []
        stage = 0
        slow = fast = mask = None
        for i, block in enumerate(self.blocks):
            if stage < len(self.pruning_loc) and i == self.pruning_loc[stage]:
                if self.training:
                    inp = x if mask is None else slow * mask + fast * (1 - mask)
                    scores = self.score(stage, inp)
                    decision = F.gumbel_softmax(scores, hard=True)[..., 0]
                    mask = decision.reshape(B, H, W, 1)
                    if slow is None:
                        slow = fast = x
                    out.append(decision)
                else:
                    scores = self.score(stage, x)
                    order = torch.argsort(scores[..., 0], dim=1, descending=True)
                    k = int(N * self.keep_ratios[stage])
                    out.append(order[:, :k])
                stage += 1
            if i < self.pruning_loc[0]:
                x = block(x)
            elif self.training:
                slow, fast = block.forward_streams(slow, fast, mask)
            else:
                x = block.forward_split(x, order, k)
        if self.training:
            x = slow * mask + fast * (1 - mask)
        return x, out


class DynamicSwin(SwinTransformer):
    @classmethod
    def from_swin(cls, model: SwinTransformer, keep_ratio: float = 0.7, pruning_loc: Sequence[int] = (1, 2, 3)):
        model.__class__ = cls
        PrunedSwinStage.convert(model.layers[2], pruning_loc)
        model.keep_ratio = keep_ratio
        return model

    @property
    def keep_ratio(self) -> float:
        return self._keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        self._keep_ratio = float(value)
        self.layers[2].keep_ratios = stage_ratios(value, len(self.layers[2].pruning_loc))

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        x = self.patch_embed(x)
        decisions = None
        for stage in self.layers:
            if isinstance(stage, PrunedSwinStage):
                x, decisions = stage.forward_pruned(x)
            else:
                x = stage(x)
        feat = self.norm(x)
        return self.forward_head(feat), feat, decisions
