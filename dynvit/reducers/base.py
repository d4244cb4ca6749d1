"""What every token reducer shares: attention that reports what reducers score with, a block split
where reducers act (between attention and MLP), and the reduced ``VisionTransformer`` base class with
the one block loop every reducer runs through.

A reducer converts a timm ViT in place, the way ToMe patches timm: the blocks become
:class:`ReducerBlock` (same weights, same plain ``forward``), the model becomes a subclass of
:class:`ReducedViT`, whose :meth:`~ReducedViT.run_blocks` runs the blocks and calls the method's hooks:
:meth:`~ReducedViT.before_block` (reduce before a block runs) and :meth:`~ReducedViT.between` (reduce
between a block's attention and its MLP, from that attention's statistics). The hooks read and update
a :class:`TokenState`: where each token comes from, its size, padding, merge sources. Prefix tokens
(class, distillation, register tokens) are never reduced and stay in front; the head pools what is
left (see :meth:`ReducedViT.pooled_head`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from timm.layers.attention import maybe_add_mask
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

from dynvit import methods
from dynvit.models.attention_kernel import attend
from dynvit.models.dynamic_vit import TokenPruning, check_prunable
from dynvit.models.factory import default_stage_blocks
from dynvit.models.masked_attention import KernelAttention, attention_inputs, attention_output, masked_softmax
from dynvit.models.tokens import (
    MergePlan,
    embed_tokens,
    index_to_mask,
    key_bias,
    log_sizes,
    merge_index,
    merge_sources,
    merge_weighted,
    select_tokens,
    weighted_mean,
)

# The timm classes a reducer takes over; their own embedding and head stay in use.
BACKBONES: tuple[type[VisionTransformer], ...] = (VisionTransformer, VisionTransformerDistilled)


class AttentionStats(NamedTuple):
    """What one attention call hands to a reducer.

    Attributes:
        keys: Keys (B, H, N, head_dim), after ``k_norm``: ToMe's similarity metric.
        values: Values (B, H, N, head_dim): ATS weighs class attention by their norm.
        cls_attn: Attention of the class token over all N keys (B, H, N), or ``None`` when not asked for.
        attn: The whole attention (B, H, N, N) after softmax, or ``None`` when not asked for.
    """

    keys: torch.Tensor
    values: torch.Tensor
    cls_attn: torch.Tensor | None
    attn: torch.Tensor | None = None


class ReducedRun(NamedTuple):
    """Result of :meth:`ReducedViT.run_blocks`.

    Attributes:
        tokens: Tokens after the last block (B, M, C), prefix tokens first; padded slots included (ATS).
        kept: Per reduction stage, the original patch index of every non-prefix token after it (B, M_s):
            a merged token carries the patch it kept its place from (ToMe: the B token of each merge);
            tokens that are no original patch (EViT's fused token, ATS padding) carry ``num_patches``.
        counts: Real tokens (prefix tokens included, padding excluded) entering attention and MLP of every
            block (B, depth, 2), int64: what the image actually cost.
        sizes: How many original tokens each final token stands for (B, M): ToMe's merged sizes, 0 on ATS
            padding; None when every token stands for itself. Pooling heads weigh tokens by it.
        sources: Which original patches each final non-prefix token stands for (B, M - P, N) bool, when the
            run was asked to track them (``run_blocks(x, sources=True)``); else None.
    """

    tokens: torch.Tensor
    kept: list[torch.Tensor]
    counts: torch.Tensor
    sizes: torch.Tensor | None = None
    sources: torch.Tensor | None = None


@dataclass
class TokenState:
    """What :meth:`ReducedViT.run_blocks` carries from block to block; the method's hooks read and update it.

    Hooks change the tokens through :meth:`select`, :meth:`append` and :meth:`merge`, which keep every
    field in step with them, and call :meth:`mark_stage` after each reduction that reports a kept map.

    Attributes:
        num_prefix: P, the prefix tokens in front (never reduced).
        num_patches: N, the original patch tokens.
        index: (B, n) the original patch of each non-prefix token (see :attr:`ReducedRun.kept`); N for none.
        sizes: (B, P + n) how many original tokens each token stands for, in the tokens' dtype; None while
            each stands for one.
        proportional: Attention adds ``log(size)`` to its keys (ToMe's proportional attention); a size of 0
            then hides a token from every later attention (ATS padding).
        valid: (B, n) bool, which non-prefix tokens are real when some may be padding (ATS); None when all
            are. While it is set, the loop counts each image's real tokens.
        sources: (B, P + n, P + N) bool, which original tokens each token stands for, when tracked; else None.
        kept: ``index`` after every stage so far.
        attn: The previous block's attention (B, H, P + n, P + n), when the method sets ``wants_attention``.
        generator: Where the method's random draws come from, if it sets one up (None: torch's global one).
    """

    num_prefix: int
    num_patches: int
    index: torch.Tensor
    sizes: torch.Tensor | None = None
    proportional: bool = False
    valid: torch.Tensor | None = None
    sources: torch.Tensor | None = None
    kept: list[torch.Tensor] = field(default_factory=list)
    attn: torch.Tensor | None = None
    generator: torch.Generator | None = None

    @property
    def bias(self) -> torch.Tensor | None:
        """The additive key bias attention needs now: ``log(sizes)`` when proportional, else None."""
        if self.sizes is None or not self.proportional:
            return None
        return key_bias(self.sizes.log())

    def real_tokens(self) -> torch.Tensor:
        """Real tokens per image (B,), prefix tokens included (needs :attr:`valid`)."""
        return self.valid.sum(dim=1) + self.num_prefix

    def select(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Keep the prefix tokens of x (B, P + n, C) and the non-prefix ones at positions ``pos`` (B, k)."""
        p = self.num_prefix
        self.index = torch.gather(self.index, 1, pos)
        if self.valid is not None:
            self.valid = torch.gather(self.valid, 1, pos)
        if self.sizes is not None:
            self.sizes = torch.cat([self.sizes[:, :p], torch.gather(self.sizes[:, p:], 1, pos)], dim=1)
        if self.sources is not None:
            self.sources = select_tokens(self.sources, pos, p)
        return select_tokens(x, pos, p)

    def append(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """x (B, M, C) with ``token`` (B, 1, C) after it: a token that is no original patch (EViT's fused one)."""
        self.index = torch.cat([self.index, self.index.new_full((x.shape[0], 1), self.num_patches)], dim=1)
        return torch.cat([x, token], dim=1)

    def merge(self, x: torch.Tensor, plan: MergePlan, held: int) -> torch.Tensor:
        """Merge the tokens x[:, held:] by ``plan``, size-weighted (``sizes`` start at 1), sources and index along.

        ``held`` prefix tokens stay out of the matching; the remaining ``P - held`` (0 or 1) lead the matched
        sequence, where the plan protects its first token (ToMe's class token).
        """
        p, n = self.num_prefix, self.num_patches
        sizes = x.new_ones(x.shape[:2]) if self.sizes is None else self.sizes
        merged, merged_size = merge_weighted(plan, x[:, held:], sizes[:, held:].unsqueeze(-1))
        self.sizes = held_before(sizes, merged_size.squeeze(-1), held)
        # The protected prefix token rides at the head of the matched index, as no patch.
        lead = self.index.new_full((x.shape[0], p - held), n)
        self.index = merge_index(plan, torch.cat([lead, self.index], dim=1))[:, p - held :]
        if self.sources is not None:
            self.sources = held_before(self.sources, merge_sources(plan, self.sources[:, held:]), held)
        return held_before(x, merged, held)

    def mark_stage(self) -> None:
        """Record the current index as one stage's kept map."""
        self.kept.append(self.index)


def held_before(x: torch.Tensor, merged: torch.Tensor, held: int) -> torch.Tensor:
    """The ``held`` first tokens of x (B, M, ·), then ``merged``; ``merged`` itself when none are held, so
    the common case (a plain ViT holds none) copies nothing."""
    return merged if held == 0 else torch.cat([x[:, :held], merged], dim=1)


class ReducerAttention(KernelAttention):
    """timm's ``Attention`` with :meth:`attend`: an additive key bias plus the statistics reducers score with.

    ``forward`` is timm's own on the kernel :class:`KernelAttention` picks, so blocks where nothing is reduced
    compute what they did before.
    """

    def attend(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        cls_attn: bool = False,
        attn: bool = False,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AttentionStats]:
        """Self-attention of x (B, N, C) with an additive bias on the keys.

        Args:
            bias: Added to the attention logits, broadcastable to (B, H, N, N), typically (B, 1, 1, N):
                ToMe's log token sizes, or ``-inf`` on ATS padding.
            cls_attn: Also return the class token's attention row. With fused attention it is computed
                separately (one query row, so cheap); the rest stays fused.
            attn: Also return the whole attention matrix; this call then runs unfused.
            keep: A differentiable keep mask (B, N) applied inside the softmax, as DynamicViT's training
                masks keys (:func:`~dynvit.models.masked_attention.masked_softmax`, after ``bias``); this
                call then runs unfused.
        Returns:
            The attention output (B, N, C) and its :class:`AttentionStats`.
        """
        q, k, v, gate = attention_inputs(self, x)
        if bias is not None:
            # SDPA wants a float mask in the query's dtype (bf16 under autocast).
            bias = bias.to(q.dtype)
        row = matrix = None
        if keep is not None:
            # Scaled after the product, as DynamicViT's and DiffRate's training attention (bit for bit).
            matrix = masked_softmax(maybe_add_mask((q @ k.transpose(-2, -1)) * self.scale, bias), keep)
            row = matrix[:, :, 0] if cls_attn else None
            x = self.attn_drop(matrix).to(v.dtype) @ v
        elif self.fused_attn and not attn:
            x = attend(q, k, v, self.scale, bias=bias, dropout_p=self.attn_drop.p if self.training else 0.0)
            if cls_attn:
                row = maybe_add_mask((q[:, :, :1] * self.scale) @ k.transpose(-2, -1), bias)
                row = row.softmax(dim=-1)[:, :, 0]
        else:
            matrix = maybe_add_mask((q * self.scale) @ k.transpose(-2, -1), bias).softmax(dim=-1)
            row = matrix[:, :, 0] if cls_attn else None
            x = self.attn_drop(matrix) @ v
        stats = AttentionStats(keys=k, values=v, cls_attn=row, attn=matrix if attn else None)
        return attention_output(self, x, gate), stats


class ReducerBlock(Block):
    """timm's ``Block`` split in two, so a reducer can act between attention and MLP."""

    def attend(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        cls_attn: bool = False,
        attn: bool = False,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AttentionStats]:
        """The attention half with its residual; see :meth:`ReducerAttention.attend`."""
        out, stats = self.attn.attend(self.norm1(x), bias=bias, cls_attn=cls_attn, attn=attn, keep=keep)
        return x + self.drop_path1(self.ls1(out)), stats

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP half with its residual."""
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def validate_rate(name: str, rate: float) -> None:
    """Raise ``ValueError`` unless ``rate`` is a number in (0, 1]."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 < rate <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {rate!r}")


class ReducedViT(VisionTransformer):
    """A timm ``VisionTransformer`` whose blocks run through one loop that calls a token reducer's hooks.

    A method subclasses it, sets ``method`` (its registry name, :mod:`dynvit.methods`), implements
    :meth:`configure` (its parameters, validated) and :meth:`token_schedule`, and reduces in one or both
    hooks: :meth:`before_block` (before block i runs) and :meth:`between` (between block i's attention
    and MLP, in the blocks :meth:`acts_between` names, with that attention's :class:`AttentionStats`).
    Hooks update the :class:`TokenState` :meth:`start` set up. A method with a loop of its own may
    override :meth:`run_blocks` instead.

    ``forward`` returns logits in train and eval mode, so an ordinary classifier can fine-tune a
    reduced model. A distilled DeiT becomes a subclass of both the reducer and
    ``VisionTransformerDistilled`` (:func:`reduced_class`), so its two heads stay.
    """

    method: str = ""
    backbone: type[VisionTransformer] = VisionTransformer
    # What the hooks read besides keys and values: the class token's attention row in the blocks where
    # ``between`` acts (stats.cls_attn), and every block's whole attention (state.attn, stats.attn).
    class_attention: bool = False
    wants_attention: bool = False

    @classmethod
    def from_vit(cls, vit: VisionTransformer, **params) -> ReducedViT:
        """Turn a timm ViT (or a model already reduced here) into this reducer in place, weights kept.

        Raises:
            TypeError: ``vit`` is not a timm ViT this method can reduce, or a parameter is unknown.
            ValueError: a parameter is out of range for this model.
        """
        check_reducible(vit, cls.method)
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

    def start(self, state: TokenState) -> None:
        """Set the state up before the first block (e.g. ATS tracks padding); nothing by default."""

    def before_block(self, i: int, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        """Tokens x (B, P + n, C) about to enter block ``i``, reduced; unchanged by default."""
        return x

    def acts_between(self, i: int) -> bool:
        """Whether :meth:`between` acts in block ``i``; in no block by default."""
        return False

    def between(self, i: int, x: torch.Tensor, stats: AttentionStats, state: TokenState) -> torch.Tensor:
        """Tokens x after block ``i``'s attention (residual added), reduced before its MLP; ``stats`` are that
        attention's (``cls_attn`` when :attr:`class_attention`)."""
        return x

    def run_blocks(
        self,
        x: torch.Tensor,
        sources: bool = False,
        record: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    ) -> ReducedRun:
        """Embedded tokens (B, P + N, C) through the blocks, reducing on the way through the hooks.

        Args:
            sources: Track which original patches each token stands for (:attr:`ReducedRun.sources`).
            record: Collects the tokens and their sizes (or None) after every block, to inspect a run.
        """
        B, p, n = x.shape[0], self.num_prefix_tokens, self.num_patches
        state = TokenState(p, n, index=torch.arange(n, device=x.device).expand(B, -1))
        if sources:
            state.sources = torch.eye(p + n, dtype=torch.bool, device=x.device).expand(B, -1, -1)
        self.start(state)
        counts = []
        for i, block in enumerate(self.blocks):
            x = self.before_block(i, x, state)
            before = state.real_tokens() if state.valid is not None else None
            acts, bias = self.acts_between(i), state.bias
            if acts or bias is not None or self.wants_attention:
                x, stats = block.attend(x, bias=bias, cls_attn=acts and self.class_attention, attn=self.wants_attention)
                state.attn = stats.attn
                if acts:
                    x = self.between(i, x, stats, state)
                x = block.feed_forward(x)
            else:
                x = block(x)
            if before is not None:
                counts.append(torch.stack([before, state.real_tokens()], dim=1))
            if record is not None:
                record.append((x, state.sizes))
        schedule = self.token_schedule()
        if schedule is not None:
            run_counts = torch.tensor(schedule, device=x.device).expand(B, -1, -1)
        else:  # adaptive: the loop counted each image's real tokens
            run_counts = torch.stack(counts, dim=1)
        tracked = None if state.sources is None else state.sources[:, p:, p:]
        return ReducedRun(tokens=x, kept=state.kept, counts=run_counts, sizes=state.sizes, sources=tracked)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def default_loc(self) -> tuple[int, ...]:
        """DynamicViT's default stage blocks for this backbone (3, 6, 9 on a 12-block ViT)."""
        return default_stage_blocks(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, class token and position embedding: the tokens the blocks see."""
        return embed_tokens(self, x)

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
            pooled = self.attn_pool(x, attn_mask=key_bias(log_sizes(sizes)))
        else:
            pooled = weighted_mean(x, sizes)
        return self.head(self.head_drop(self.fc_norm(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self.run_blocks(self.embed(x))
        return self.pooled_head(self.norm(run.tokens), run.sizes)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode for the block, the model's own mode restored after: what every ``predict_*`` runs in."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, ReducedRun]:
        """Eval-mode logits and the :class:`ReducedRun` behind them (the mode is restored after)."""
        with self.evaluating():
            run = self.run_blocks(self.embed(x))
            return self.pooled_head(self.norm(run.tokens), run.sizes), run

    def predict_with_counts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode logits plus the real token counts (B, depth, 2) in every block's attention and MLP."""
        logits, run = self.predict(x)
        return logits, run.counts

    def predict_with_masks(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Eval-mode logits plus, per stage, the boolean mask (B, N) of original patches still tokens of their own.

        Same contract as ``DynamicViT.predict_with_masks``; a fused token or padding marks no patch, a
        merged token the patch it kept its place from.
        """
        logits, run = self.predict(x)
        return logits, [index_to_mask(index, self.num_patches) for index in run.kept]

    def token_schedule(self) -> list[tuple[int, int]] | None:
        """Tokens (prefix tokens included) in attention and MLP of each block when they do not depend on
        the image; ``None`` for adaptive methods."""
        return None


# Code written against the earlier split of selection methods from mergers: every reducer reports kept maps now.
SelectionViT = ReducedViT


class MergingViT(ReducedViT):
    """A reducer whose tokens stand for sets of original patches: it also reports those sets (merge sources)."""

    @torch.no_grad()
    def predict_with_sources(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode logits and which original patches (B, M, N) bool each final non-prefix token stands for."""
        with self.evaluating():
            run = self.run_blocks(self.embed(x), sources=True)
            return self.pooled_head(self.norm(run.tokens), run.sizes), run.sources


@functools.cache
def reduced_class(reducer: type[ReducedViT], backbone: type[VisionTransformer]) -> type[ReducedViT]:
    """The class a ``backbone`` model becomes under ``reducer``: the reducer itself for a plain
    ``VisionTransformer``, else one subclass of both (made once), so the backbone's own prefix tokens
    and head (a distilled DeiT's) stay in use, as ToMe patches timm models."""
    if backbone is VisionTransformer:
        return reducer
    return type(f"{reducer.__name__}{backbone.__name__}", (reducer, backbone), {"backbone": backbone})


def check_reducible(model: VisionTransformer, method: str | None = None) -> None:
    """Raise ``TypeError`` unless the registered reducer ``method`` (any reducer when None) can take ``model`` over: a timm
    ``VisionTransformer`` or distilled DeiT that DynamicViT could prune (timm's ``Block``/``Attention``,
    a class-token, average-pooling or attention-pooling head), or a model reduced here. Methods that
    rank tokens by the class token's attention (``needs_class_token`` in their registry entry) also
    need a class token."""
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
    if method is not None and methods.get(method).needs_class_token and model.cls_token is None:
        free = sorted(m.name for m in methods.registered().values() if not m.needs_class_token and not m.learned)
        raise TypeError(
            f"{method} ranks tokens by the class token's attention, and this ViT has no class token "
            f"(global_pool={model.global_pool!r}): use {' or '.join(free)}, which need none"
        )
    if method is not None and methods.get(method).accepts is not None:
        methods.get(method).accepts(model)


__all__ = [
    "AttentionStats",
    "MergingViT",
    "ReducedRun",
    "ReducedViT",
    "ReducerAttention",
    "ReducerBlock",
    "SelectionViT",
    "TokenState",
    "check_reducible",
    "held_before",
    "reduced_class",
    "validate_rate",
]
