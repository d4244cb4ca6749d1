"""DTEM: ToMe on a learned decoupled embedding (Lee & Hong, "Learning to Merge Tokens via Decoupled Embedding
for Efficient Vision Transformers", NeurIPS 2024), as its official code (``movinghoon/DTEM``) computes it.

Every block's attention input ``norm1(x)`` also goes through a small linear *decoupled embedding*
``metric_layer`` (C → ``feat_dim``: the head width, 64 for DeiT; twice that from C = 1024 up), beside
the fused qkv projection. Between attention and MLP, tokens merge as in ToMe, but matched by the cosine
similarity of that embedding instead of the attention keys: the first token of set A (the class token)
is protected, the ``r`` most similar (A, B) pairs merge by size-weighted average, sizes are tracked and
attention is proportional to size. DTEM writes that attention as ``exp(l − max l) · size`` normalised
over the keys, in float32, which dynvit follows.

In training mode the merge is DTEM's relaxation, which is what lets the embedding learn: nothing is
removed; a soft top-r (``k2`` best partners per A token, temperatures ``tau1`` and ``tau2``) spreads each
A token's size over its B partners, tokens are re-sorted by size and only the first ``n − r`` take part
in the next block's matching; the embedding sees its input detached, so its gradient does not reach the
backbone. DTEM then trains only the embedding (backbone frozen, cross-entropy); that recipe belongs to
the fine-tuning track (objective ``"dtem"`` in the registry). Until then a plain cross-entropy run trains
the embedding through this relaxation together with whatever else is trainable.

Checkpoints: a plain ViT's keys load as they are (``blocks.{i}.attn.qkv.weight/bias`` stay the fused qkv
projection) and the embedding is ``blocks.{i}.attn.qkv.metric_layer.*``. DTEM's own files hold the qkv
projection as ``attn.qkv.qkv_layer.*`` beside a fused copy of both in ``attn.qkv.weight/bias``; they load
strictly through the layout registered below (the copy is redundant: DTEM rewrites it from the two parts
whenever the model enters eval mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import Attention
from torch import nn

from dynvit.methods import Knob, Method, register
from dynvit.models.checkpoint import CheckpointMismatch, register_layout
from dynvit.models.tokens import bipartite_soft_matching, max_merges, merge_sum, merge_weighted
from dynvit.reducers.base import ReducedRun, ReducedViT, held_before
from dynvit.reducers.tome import merge_schedule, merge_token_schedule


class DecoupledQKV(nn.Linear):
    """timm's fused qkv ``Linear`` (its own weight and bias, same forward) carrying DTEM's ``metric_layer``."""

    metric_layer: nn.Linear

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The decoupled embedding of the attention input x (B, N, C) → (B, N, feat_dim).

        In training its input is detached (as in DTEM), so merging decisions train the embedding only.
        """
        return self.metric_layer(x.detach() if self.training else x)


def default_feat_dim(attn: Attention) -> int:
    """DTEM's embedding width: the head width, doubled for models 1024 wide or wider."""
    return attn.head_dim if attn.head_dim * attn.num_heads < 1024 else 2 * attn.head_dim


def add_metric_layer(attn: Attention, feat_dim: int) -> None:
    """Turn ``attn.qkv`` into a :class:`DecoupledQKV` in place; a fresh ``metric_layer`` (PyTorch's Linear
    init, as DTEM's) unless one of width ``feat_dim`` is there already."""
    qkv = attn.qkv
    if isinstance(qkv, DecoupledQKV) and qkv.metric_layer.out_features == feat_dim:
        return
    qkv.__class__ = DecoupledQKV
    qkv.metric_layer = nn.Linear(qkv.in_features, feat_dim, device=qkv.weight.device, dtype=qkv.weight.dtype)


def size_attention(
    attn: Attention, x: torch.Tensor, size: torch.Tensor, prop_attn: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """DTEM's attention of x (B, N, C) with token sizes (B, N), and the decoupled embedding of x.

    As DTEM computes it: logits ``(q · scale) kᵀ`` in float32 (autocast off); with ``prop_attn``,
    ``exp(l − max l) · size`` normalised over the keys (a zero size gets exactly zero weight), else softmax.

    Returns:
        The attention output (B, N, C), before the residual, and the embedding (B, N, feat_dim).
    """
    B, N, _ = x.shape
    metric = attn.qkv.embed(x)
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    with torch.autocast(device_type=x.device.type, enabled=False):
        q, k, v = q.float(), k.float(), v.float()
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if prop_attn:
            weights = (logits - logits.amax(dim=-1, keepdim=True)).exp() * size[:, None, None, :].float()
            weights = weights / weights.sum(dim=-1, keepdim=True)
        else:
            weights = logits.softmax(dim=-1)
        out = attn.attn_drop(weights) @ v
    out = attn.norm(out.to(x.dtype).transpose(1, 2).reshape(B, N, attn.attn_dim))
    if attn.gate is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), metric


def soft_top_k(scores: torch.Tensor, k: int, k2: int, tau1: float, tau2: float) -> torch.Tensor:
    """DTEM's differentiable choice of the k best (A, B) pairs from scores (B, |A|, |B|).

    Each A token keeps its ``k2`` best B partners; their scores over ``tau1`` form one pool per image, from
    which k soft one-hot draws (softmax over the pool at temperature ``tau2``) are summed, each draw
    damping the row it fell on by ``log(1 − its mass)`` (floored at float32's eps). A row's total is then
    scaled down to at most 1 (the scale itself carries no gradient). Float32, autocast off.

    Returns:
        The soft assignment (B, |A|, |B|): how much of each A token goes to each B token.
    """
    eps = torch.finfo(torch.float32).eps
    with torch.autocast(device_type=scores.device.type, enabled=False):
        scores = scores.float()
        partners = scores.argsort(dim=-1, descending=True)[..., :k2]
        logits = scores.gather(-1, partners) / tau1
        B, A, K = logits.shape
        khot = torch.zeros_like(logits)
        for _ in range(k):
            draw = (logits.reshape(B, -1) / tau2).softmax(dim=-1).reshape(B, A, K)
            khot = khot + draw
            logits = logits + (1 - draw.sum(dim=-1, keepdim=True)).clamp(min=eps).log()
        khot = khot / ((khot.sum(dim=-1, keepdim=True).detach() - 1).clamp(min=0) + 1)
        return torch.zeros_like(scores).scatter_reduce(-1, partners, khot, reduce="sum")


def soft_merge(
    x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, n: int, r: int, k2: int, tau1: float, tau2: float, p: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DTEM's training-mode merge of the ``n − p`` tokens after the p prefix tokens (no token is removed).

    A (positions p, p+2, …) and B (p+1, p+3, …) of the participating tokens are matched by
    :func:`soft_top_k` on the cosine similarity of ``metric``; each B token becomes the size-weighted mean
    of itself and the shares of A tokens it receives, its size grows by them, and each A token keeps its
    value with its size scaled by what it did not give away (clipped to [0, 1] in the forward pass, not in
    the gradient). The participating tokens are then re-sorted by size, largest first.

    Args:
        x: Tokens (B, T, C); the ones from position n on take no part and stay where they are.
        size: Token sizes (B, T).
        metric: The decoupled embedding (B, T, D).
    Returns:
        Tokens and sizes, same shapes, so that the first ``n − r`` take part in the next block's matching.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    xa, xb = x[:, p:n:2], x[:, p + 1 : n : 2]
    wa, wb = size[:, p:n:2], size[:, p + 1 : n : 2]
    assign = soft_top_k(metric[:, p:n:2] @ metric[:, p + 1 : n : 2].transpose(-1, -2), r, k2, tau1, tau2)
    given = assign.transpose(-1, -2).to(x.dtype)
    xb = wb.unsqueeze(-1) * xb + given @ (wa.unsqueeze(-1) * xa)
    wb = wb + (given @ wa.unsqueeze(-1)).squeeze(-1)
    kept = 1 - assign.sum(dim=-1)
    wa = wa * (kept + (kept.clamp(0, 1) - kept).detach())
    xb = xb / wb.unsqueeze(-1)
    w, nx = torch.cat([wa, wb], dim=-1), torch.cat([xa, xb], dim=1)
    order = w.argsort(dim=-1, descending=True)
    nx = torch.gather(nx, 1, order.unsqueeze(-1).expand_as(nx))
    x = torch.cat([x[:, :p], nx, x[:, n:]], dim=1)
    return x, torch.cat([size[:, :p], torch.gather(w, 1, order), size[:, n:]], dim=-1)


class DTEMViT(ReducedViT):
    """A timm ViT that merges tokens by a learned decoupled embedding in every block (DTEM).

    Build with ``dynvit.methods.get("dtem").build(vit, r=16)``; the embedding starts at PyTorch's Linear
    init (as DTEM's) unless loaded from a DTEM checkpoint (:func:`dynvit.load_checkpoint`).
    """

    method = "dtem"

    def configure(
        self,
        r: int | Sequence[int] = 16,
        prop_attn: bool = True,
        feat_dim: int | None = None,
        k2: int = 3,
        tau1: float = 0.1,
        tau2: float = 0.1,
    ) -> None:
        """Args:
        r: Tokens merged per block (an int for all blocks, or one per block), capped as in ToMe where fewer
            than ``2 r`` patch tokens remain. DTEM's default is 16.
        prop_attn: Weigh attention by token size (DTEM does for DeiT).
        feat_dim: Width of the decoupled embedding; None: the head width (doubled from C = 1024 up).
        k2: Partners per A token in the training-mode soft top-k.
        tau1, tau2: Temperatures of the training-mode soft top-k (scores, then draws).
        """
        merges = merge_schedule(self.num_patches, len(self.blocks), r)
        feat_dim = default_feat_dim(self.blocks[0].attn) if feat_dim is None else feat_dim
        if isinstance(feat_dim, bool) or not isinstance(feat_dim, int) or feat_dim < 1:
            raise ValueError(f"feat_dim must be a positive int (the embedding's width), got {feat_dim!r}")
        if isinstance(k2, bool) or not isinstance(k2, int) or k2 < 1:
            raise ValueError(f"k2 must be a positive int (partners per token in the soft top-k), got {k2!r}")
        for name, tau in (("tau1", tau1), ("tau2", tau2)):
            if isinstance(tau, bool) or not isinstance(tau, int | float) or not tau > 0:
                raise ValueError(f"{name} must be a positive temperature, got {tau!r}")
        for block in self.blocks:
            add_metric_layer(block.attn, feat_dim)
        self.merges, self.r, self.prop_attn = merges, r, bool(prop_attn)
        self.feat_dim, self.k2, self.tau1, self.tau2 = feat_dim, k2, float(tau1), float(tau2)

    def token_schedule(self) -> list[tuple[int, int]]:
        return merge_token_schedule(self.num_patches + self.num_prefix_tokens, self.merges)

    def run_blocks(self, x: torch.Tensor) -> ReducedRun:
        return self.trace(x)[0]

    def trace(self, x: torch.Tensor, track_sources: bool = False) -> tuple[ReducedRun, torch.Tensor | None]:
        """Embedded tokens (B, P + N, C) through the blocks; in eval with ``track_sources``, also which
        original patches (B, M, N) bool each final non-prefix token stands for."""
        if self.training:
            return self._soft_run(x), None
        B, T, _ = x.shape
        p = self.num_prefix_tokens
        held = max(p - 1, 0)  # as ToMe: prefix tokens before the last stay out; the last is A's protected first
        size = x.new_ones(B, T)
        sources = None
        if track_sources:
            eye = torch.eye(T - p, dtype=torch.uint8, device=x.device)
            sources = torch.cat([eye.new_zeros(p - held, T - p), eye]).expand(B, -1, -1)
        for block, r in zip(self.blocks, self.merges, strict=True):
            out, metric = size_attention(block.attn, block.norm1(x), size, self.prop_attn)
            x = x + block.drop_path1(block.ls1(out))
            if r:
                # DTEM normalises the embedding before ToMe's matching, which normalises it again.
                metric = metric / metric.norm(dim=-1, keepdim=True)
                plan = bipartite_soft_matching(metric[:, held:], r, protect_first=p > 0)
                merged, merged_size = merge_weighted(plan, x[:, held:], size[:, held:, None])
                x = held_before(x, merged, held)
                size = held_before(size, merged_size.squeeze(-1), held)
                if sources is not None:
                    sources = merge_sum(plan, sources)
            x = block.feed_forward(x)
        counts = torch.tensor(self.token_schedule(), device=x.device).expand(B, -1, -1)
        if sources is not None:
            sources = sources[:, p - held :].bool()
        return ReducedRun(tokens=x, kept=[], counts=counts, sizes=size), sources

    def _soft_run(self, x: torch.Tensor) -> ReducedRun:
        """Training mode: DTEM's relaxed merging, every token kept (see :func:`soft_merge`)."""
        B, T, _ = x.shape
        p, n = self.num_prefix_tokens, T
        size = x.new_ones(B, T)
        for block, r in zip(self.blocks, self.merges, strict=True):
            out, metric = size_attention(block.attn, block.norm1(x), size, self.prop_attn)
            x = x + block.drop_path1(block.ls1(out))
            r = min(r, max_merges(n - p))
            if r:
                x, size = soft_merge(x, size, metric, n, r, self.k2, self.tau1, self.tau2, p)
                n -= r
            x = block.feed_forward(x)
        counts = torch.full((B, len(self.blocks), 2), T, dtype=torch.long, device=x.device)
        return ReducedRun(tokens=x, kept=[], counts=counts, sizes=size)

    @torch.no_grad()
    def predict_with_sources(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode logits and which original patches (B, M, N) bool each final non-prefix token stands for."""
        with self.evaluating():
            run, sources = self.trace(self.embed(x), track_sources=True)
            return self.pooled_head(self.norm(run.tokens), run.sizes), sources


def dtem_layout(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """DTEM's checkpoint layout → dynvit's: ``attn.qkv.qkv_layer.*`` becomes ``attn.qkv.*`` (replacing DTEM's
    fused copy of qkv and embedding there); dynvit's own layout passes unchanged.

    Raises:
        CheckpointMismatch: the checkpoint has no decoupled embedding (``attn.qkv.metric_layer.*``).
    """
    out = dict(state_dict)
    for key in [k for k in out if ".attn.qkv.qkv_layer." in k]:
        out[key.replace(".qkv_layer.", ".")] = out.pop(key)
    if not any(".attn.qkv.metric_layer." in k for k in out):
        raise CheckpointMismatch(
            "this checkpoint has no DTEM embedding (blocks.{i}.attn.qkv.metric_layer.*), so it cannot load into "
            f"a {type(model).__name__}: load a plain ViT checkpoint into the plain model first and build dtem "
            'on it (dynvit.create_teacher(name, checkpoint=path), then dynvit.methods.get("dtem").build(vit, r=16)),'
            " which starts the embedding at its init; or use a checkpoint trained with dtem"
        )
    return out


register_layout(DTEMViT, dtem_layout)

register(
    Method(
        name="dtem",
        summary="ToMe matched on a learned decoupled embedding Linear(C, 64) of the attention input (DTEM)",
        learned=True,
        build=DTEMViT.from_vit,
        knob=Knob("r", 0, lambda vit: max_merges(vit.patch_embed.num_patches), integer=True, cheaper="higher"),
        cost="schedule",
        reports=frozenset({"counts", "sources"}),
        onnx=None,
        reference="movinghoon/DTEM dtem/dtem.py, dtem/utils.py",
        # Later: DTEM's recipe (backbone frozen, only the embedding trained through the soft top-k, cross-entropy).
        objective="dtem",
        released={"r=13": {"r": 13}},
    )
)

__all__ = ["DTEMViT", "DecoupledQKV", "dtem_layout", "size_attention", "soft_merge", "soft_top_k"]
