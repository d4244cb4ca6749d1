"""An independent re-implementation of the reference DynamicViT-DeiT model, for tests only.

Written from the method description and checkpoint layout in docs/reference.md, in plain torch: it
imports neither timm nor dynvit, so the equivalence tests compare two separate implementations.
Parameter names are those of the released checkpoints (``blocks.{i}.attn.qkv``,
``score_predictor.{s}.in_conv.0``, …), so its ``state_dict()`` is a released-checkpoint stand-in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def softmax_with_policy(attn: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Query i attends to key j iff ``policy[j] = 1`` or ``j = i``; mask applied inside the softmax, in float32.

    Args:
        attn: Attention logits (B, H, N, N).
        policy: Keep mask (B, N, 1).
    """
    B, N, _ = policy.shape
    attn_policy = policy.reshape(B, 1, 1, N)
    eye = torch.eye(N, dtype=attn_policy.dtype, device=attn_policy.device).view(1, 1, N, N)
    attn_policy = attn_policy + (1.0 - attn_policy) * eye
    max_att = attn.max(dim=-1, keepdim=True)[0]
    attn = (attn - max_att).to(torch.float32).exp() * attn_policy.to(torch.float32)
    attn = (attn + eps / N) / (attn.sum(dim=-1, keepdim=True) + eps)
    return attn.type_as(max_att)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1) if policy is None else softmax_with_policy(attn, policy)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), policy=policy)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class PredictorLG(nn.Module):
    """Keep/drop log-probabilities from local features and the policy-weighted mean of global ones."""

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

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        B, N, C = x.shape
        local_x = x[:, :, : C // 2]
        global_x = (x[:, :, C // 2 :] * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        return self.out_conv(torch.cat([local_x, global_x.expand(B, N, C // 2)], dim=-1))


def batch_index_select(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b]]`` for x (B, N, C) and idx (B, K)."""
    B, N, C = x.shape
    offset = torch.arange(B, device=x.device).view(B, 1) * N
    return x.reshape(B * N, C)[(idx + offset).reshape(-1)].reshape(B, idx.shape[1], C)


class VisionTransformerDiffPruning(nn.Module):
    """DynamicViT-DeiT: a class-token ViT with a PredictorLG before each of ``pruning_loc``.

    Training returns ``(logits, patch_features, last_decision, decisions)`` with masked attention;
    eval returns logits after argsort-based token gathering, keeping ``int(N * ρ**s)`` patches.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        pruning_loc: tuple[int, ...] = (3, 6, 9),
        token_ratio: tuple[float, ...] = (0.7, 0.49, 0.343),
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        self.score_predictor = nn.ModuleList([PredictorLG(embed_dim) for _ in pruning_loc])
        self.pruning_loc = pruning_loc
        self.token_ratio = token_ratio
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor):
        B = x.shape[0]
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed
        init_n = x.shape[1] - 1
        prev_decision = torch.ones(B, init_n, 1, dtype=x.dtype, device=x.device)
        policy = None
        out_pred_prob = []
        p_count = 0
        for i, blk in enumerate(self.blocks):
            if p_count < len(self.pruning_loc) and i == self.pruning_loc[p_count]:
                spatial_x = x[:, 1:]
                pred_score = self.score_predictor[p_count](spatial_x, prev_decision).reshape(B, -1, 2)
                if self.training:
                    hard_keep_decision = F.gumbel_softmax(pred_score, hard=True)[:, :, 0:1] * prev_decision
                    out_pred_prob.append(hard_keep_decision.reshape(B, init_n))
                    policy = torch.cat([torch.ones(B, 1, 1, dtype=x.dtype, device=x.device), hard_keep_decision], 1)
                    prev_decision = hard_keep_decision
                else:
                    num_keep = int(init_n * self.token_ratio[p_count])
                    keep_policy = torch.argsort(pred_score[:, :, 0], dim=1, descending=True)[:, :num_keep]
                    cls_policy = torch.zeros(B, 1, dtype=keep_policy.dtype, device=keep_policy.device)
                    x = batch_index_select(x, torch.cat([cls_policy, keep_policy + 1], dim=1))
                    prev_decision = batch_index_select(prev_decision, keep_policy)
                p_count += 1
            x = blk(x, policy=policy) if self.training else blk(x)
        x = self.norm(x)
        logits = self.head(x[:, 0])
        if self.training:
            return logits, x[:, 1:], prev_decision.detach(), out_pred_prob
        return logits
