"""What every token reducer shares: attention that reports what reducers score with, a block split
where reducers act (between attention and MLP), and the reduced ``VisionTransformer`` base class.

A reducer converts a timm ViT in place, the way ToMe patches timm: the blocks become
:class:`ReducerBlock` (same weights, same plain ``forward``), the model becomes a subclass of
:class:`ReducedViT` whose ``run_blocks`` decides where tokens are merged or dropped. Prefix tokens
(class, distillation, register tokens) are never reduced and stay in front; the head pools what is
left (see :meth:`ReducedViT.pooled_head`).
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers.attention import maybe_add_mask
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from dynvit.models.dynamic_vit import TokenPruning, check_prunable, validate_pruning
from dynvit.models.factory import default_pruning_loc

# The timm classes a reducer takes over; their own embedding and head stay in use.
BACKBONES: tuple[type[VisionTransformer], ...] = (VisionTransformer, VisionTransformerDistilled)


class AttentionStats(NamedTuple):
    """What one attention call hands to a reducer.

    Attributes:
        keys: Keys (B, H, N, head_dim), after ``k_norm``: ToMe's similarity metric.
        values: Values (B, H, N, head_dim): ATS weighs class attention by their norm.
        cls_attn: Attention of the class token over all N keys (B, H, N), or ``None`` when not asked for.
    """

    keys: torch.Tensor
    values: torch.Tensor
    cls_attn: torch.Tensor | None


class ReducedRun(NamedTuple):
    """Result of :meth:`ReducedViT.run_blocks`.

    Attributes:
        tokens: Tokens after the last block (B, M, C), prefix tokens first; padded slots included (ATS).
        kept: Per reduction stage, the original patch index of every token after it (B, M_s); tokens that
            are no original patch (EViT's fused token, ATS padding) carry the index ``num_patches``.
        counts: Real tokens (prefix tokens included, padding excluded) entering attention and MLP of every
            block (B, depth, 2), int64: what the image actually cost.
        sizes: How many original tokens each final token stands for (B, M): ToMe's merged sizes, 0 on ATS
            padding; None when every token stands for itself. Pooling heads weigh tokens by it.
    """

    tokens: torch.Tensor
    kept: list[torch.Tensor]
    counts: torch.Tensor
    sizes: torch.Tensor | None = None


class ReducerAttention(Attention):
    """timm's ``Attention`` with :meth:`attend`: an additive key bias plus the statistics reducers score with.

    ``forward`` is timm's own, so blocks where nothing is reduced compute exactly what they did before.
    """

    def attend(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, cls_attn: bool = False
    ) -> tuple[torch.Tensor, AttentionStats]:
        """Self-attention of x (B, N, C) with an additive bias on the keys.

        Args:
            bias: Added to the attention logits, broadcastable to (B, H, N, N), typically (B, 1, 1, N):
                ToMe's log token sizes, or ``-inf`` on ATS padding.
            cls_attn: Also return the class token's attention row. With fused attention it is computed
                separately (one query row, so cheap); the rest stays fused.
        Returns:
            The attention output (B, N, C) and its :class:`AttentionStats`.
        """
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if bias is not None:
            # SDPA wants a float mask in the query's dtype (bf16 under autocast).
            bias = bias.to(q.dtype)
        row = None
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0
            )
            if cls_attn:
                row = maybe_add_mask((q[:, :, :1] * self.scale) @ k.transpose(-2, -1), bias)
                row = row.softmax(dim=-1)[:, :, 0]
        else:
            attn = maybe_add_mask((q * self.scale) @ k.transpose(-2, -1), bias).softmax(dim=-1)
            row = attn[:, :, 0] if cls_attn else None
            x = self.attn_drop(attn) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x)), AttentionStats(keys=k, values=v, cls_attn=row)


class ReducerBlock(Block):
    """timm's ``Block`` split in two, so a reducer can act between attention and MLP."""

    def attend(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, cls_attn: bool = False
    ) -> tuple[torch.Tensor, AttentionStats]:
        """The attention half with its residual; see :meth:`ReducerAttention.attend`."""
        out, stats = self.attn.attend(self.norm1(x), bias=bias, cls_attn=cls_attn)
        return x + self.drop_path1(self.ls1(out)), stats

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP half with its residual."""
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def key_bias(weights: torch.Tensor) -> torch.Tensor:
    """Per-key additive attention bias (B, N) → (B, 1, 1, N), broadcast over heads and queries."""
    return weights[:, None, None, :]


def validate_loc(pruning_loc: tuple[int, ...], depth: int, num_patches: int) -> None:
    """Raise ``ValueError`` unless the block indices are integers, strictly increasing and inside the model."""
    if any(isinstance(i, bool) or not isinstance(i, int) for i in pruning_loc):
        raise ValueError(f"pruning_loc must hold integer block indices, got {pruning_loc}")
    # Keep ratio 1.0 always passes, so only DynamicViT's location checks can fire.
    validate_pruning(1.0, pruning_loc, depth, num_patches)


def validate_rate(name: str, rate: float) -> None:
    """Raise ``ValueError`` unless ``rate`` is a number in (0, 1]."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 < rate <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {rate!r}")


class ReducedViT(VisionTransformer):
    """A timm ``VisionTransformer`` whose blocks run through a token reducer's :meth:`run_blocks`.

    Subclasses set ``method`` (the registry name), implement :meth:`configure` (the method's
    parameters, validated) and :meth:`run_blocks`. ``forward`` returns logits in train and eval mode,
    so an ordinary classifier can fine-tune a reduced model. A distilled DeiT becomes a subclass of
    both the reducer and ``VisionTransformerDistilled`` (:func:`reduced_class`), so its two heads stay.
    """

    method: str = ""
    # Methods that score tokens by the class token's attention cannot run without one.
    needs_class_token: bool = False
    backbone: type[VisionTransformer] = VisionTransformer

    @classmethod
    def from_vit(cls, vit: VisionTransformer, **params) -> ReducedViT:
        """Turn a timm ViT (or a model already reduced here) into this reducer in place, weights kept.

        Raises:
            TypeError: ``vit`` is not a timm ViT this method can reduce, or a parameter is unknown.
            ValueError: a parameter is out of range for this model.
        """
        check_reducible(vit, cls)
        try:
            inspect.signature(cls.configure).bind(vit, **params)
        except TypeError:
            accepted = [p for p in inspect.signature(cls.configure).parameters if p != "self"]
            raise TypeError(
                f"{cls.method} got parameters {sorted(params)}; it accepts {accepted} (required ones have no default)"
            ) from None
        old_class = vit.__class__
        vit.__class__ = reduced_class(cls, vit.backbone if isinstance(vit, ReducedViT) else old_class)
        try:
            vit.configure(**params)
        except (TypeError, ValueError):
            vit.__class__ = old_class  # a rejected parameter leaves the model usable as it was
            raise
        if not issubclass(old_class, ReducedViT):
            for block in vit.blocks:
                block.__class__ = ReducerBlock
                block.attn.__class__ = ReducerAttention
        return vit

    def configure(self, **params) -> None:
        """Validate and set the method's parameters; called by :meth:`from_vit`."""
        raise NotImplementedError

    def run_blocks(self, x: torch.Tensor) -> ReducedRun:
        """Embedded tokens (B, 1 + N, C) through the blocks, reducing on the way."""
        raise NotImplementedError

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def default_loc(self) -> tuple[int, ...]:
        """DynamicViT's default stage blocks for this backbone (3, 6, 9 on a 12-block ViT)."""
        name = (getattr(self, "pretrained_cfg", None) or {}).get("architecture", "")
        return default_pruning_loc(name, len(self.blocks))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, class token and position embedding: the tokens the blocks see."""
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm; only the reduced set remains."""
        return self.norm(self.run_blocks(self.embed(x)).tokens)

    def pooled_head(self, x: torch.Tensor, sizes: torch.Tensor | None) -> torch.Tensor:
        """The model's head on the final normed tokens x (B, M, C), each standing for ``sizes`` (B, M) tokens.

        Class-token heads read their tokens as timm does. An average pool weighs each token by its size
        (ToMe's size-weighted mean, as ToMe pools MAE models; ATS padding gets weight 0); an attention
        pool adds ``log(size)`` to its keys (ToMe's proportional attention; ``-inf`` on padding).
        """
        if sizes is None or (self.attn_pool is None and self.global_pool == "token"):
            return self.forward_head(x)
        if not getattr(self, "pool_include_prefix", False):
            x, sizes = x[:, self.num_prefix_tokens :], sizes[:, self.num_prefix_tokens :]
        sizes = sizes.to(x.dtype)
        if self.attn_pool is not None:
            pooled = self.attn_pool(x, attn_mask=key_bias(sizes.log()))
        else:
            pooled = (x * sizes.unsqueeze(-1)).sum(dim=1) / sizes.sum(dim=1, keepdim=True)
        return self.head(self.head_drop(self.fc_norm(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self.run_blocks(self.embed(x))
        return self.pooled_head(self.norm(run.tokens), run.sizes)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, ReducedRun]:
        """Eval-mode logits and the :class:`ReducedRun` behind them (the mode is restored after)."""
        was_training = self.training
        self.eval()
        try:
            run = self.run_blocks(self.embed(x))
            return self.pooled_head(self.norm(run.tokens), run.sizes), run
        finally:
            self.train(was_training)

    def predict_with_counts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode logits plus the real token counts (B, depth, 2) in every block's attention and MLP."""
        logits, run = self.predict(x)
        return logits, run.counts

    def token_schedule(self) -> list[tuple[int, int]] | None:
        """Tokens (prefix tokens included) in attention and MLP of each block when they do not depend on
        the image; ``None`` for adaptive methods."""
        return None


@functools.cache
def reduced_class(reducer: type[ReducedViT], backbone: type[VisionTransformer]) -> type[ReducedViT]:
    """The class a ``backbone`` model becomes under ``reducer``: the reducer itself for a plain
    ``VisionTransformer``, else one subclass of both (made once), so the backbone's own prefix tokens
    and head (a distilled DeiT's) stay in use, as ToMe patches timm models."""
    if backbone is VisionTransformer:
        return reducer
    return type(f"{reducer.__name__}{backbone.__name__}", (reducer, backbone), {"backbone": backbone})


class SelectionViT(ReducedViT):
    """A reducer that keeps a subset of the patch tokens, so kept-token masks make sense."""

    def predict_with_masks(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Eval-mode logits plus, per stage, the boolean mask (B, N) of original patches still kept as tokens.

        Same contract as ``DynamicViT.predict_with_masks``; a fused token or padding marks no patch.
        """
        logits, run = self.predict(x)
        masks = []
        for index in run.kept:
            # One spare column takes the "no original patch" index, then goes.
            mask = torch.zeros(index.shape[0], self.num_patches + 1, dtype=torch.bool, device=index.device)
            masks.append(mask.scatter_(1, index, True)[:, : self.num_patches])
        return logits, masks


def check_reducible(model: VisionTransformer, reducer: type[ReducedViT] | None = None) -> None:
    """Raise ``TypeError`` unless ``reducer`` (any reducer when None) can take ``model`` over: a timm
    ``VisionTransformer`` or distilled DeiT that DynamicViT could prune (timm's ``Block``/``Attention``,
    a class-token, average-pooling or attention-pooling head), or a model reduced here. Methods that
    rank tokens by the class token's attention also need a class token."""
    if isinstance(model, TokenPruning):
        raise TypeError(
            f"token reducers take a plain timm ViT, got the subclass {type(model).__name__} "
            "(a DynamicViT student cannot be reduced again): reduce its teacher"
        )
    if not isinstance(model, ReducedViT):
        check_prunable(model)
        if type(model) not in BACKBONES:
            raise TypeError(
                f"token reducers take a plain timm VisionTransformer or distilled DeiT, got the subclass "
                f"{type(model).__name__} (its own forward would be bypassed); build the backbone with "
                "dynvit.create_teacher"
            )
    if reducer is not None and reducer.needs_class_token and model.cls_token is None:
        raise TypeError(
            f"{reducer.method} ranks tokens by the class token's attention, and this ViT has no class token "
            f"(global_pool={model.global_pool!r}): use tome or random, which need none"
        )


__all__ = [
    "AttentionStats",
    "ReducedRun",
    "ReducedViT",
    "ReducerAttention",
    "ReducerBlock",
    "SelectionViT",
    "check_reducible",
    "key_bias",
    "reduced_class",
    "validate_loc",
    "validate_rate",
]
