"""MCTF: multi-criteria token fusion with one-step-ahead attention (Lee et al., "Multi-criteria Token Fusion
with One-step-ahead Attention for Efficient Vision Transformers", CVPR 2024), as its official code
(``mlvlab/MCTF``) computes it.

In each block of ``activate_layer``, *before* attention, the block's input tokens are fused by a bipartite
matching (A = even positions, class token first and protected; B = odd positions). A pair's score is the
product of three criteria, each with a temperature (0 turns it off):

- similarity ``((cos(x_a, x_b) + 1) / 2) ** (1 / tau_sim)`` of the raw block inputs;
- informativeness ``(ĩ_a · ĩ_b) ** (1 / tau_info)``, with ``ĩ`` the inverse of the attention a token
  receives (mean over heads and queries, the block's own attention), over its maximum;
- size ``(s̃_a · s̃_b) ** (1 / tau_size)``, with ``s̃`` the inverse size over its maximum (1 before any fusion).

Bidirectional: the ``r // 2`` best A tokens fuse into their B partners, then the ``r − r // 2`` best
B tokens (their score towards the A tokens left) fuse into those, reusing the same scores. The tokens
come out as [A tokens left, in order; B tokens left, best score first]. A fused token is a weighted mean
(``pooling_type``; by default weights = attention received × size / max size). One-step-ahead: the
attention map computed for the scores is fused too (keys summed, queries by the same weights) and used as
the block's attention over the fused tokens' values, instead of recomputing it.

``r`` is a count per active block, or a fraction (< 1) of the current patch tokens; it is capped at half
the patch tokens and so that at least 10 tokens (class token included) remain. The released DeiT
settings: ``r=16`` in blocks 1–11 (2.6 GFLOPs on DeiT-S) and MCTF-Fast, ``r=0.35`` in blocks 3, 6, 9.
MCTF fine-tunes its models (30 epochs, with a consistency loss against a randomly reduced teacher); the
fusion itself adds no parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from timm.models.vision_transformer import Attention

from dynvit.methods import Knob, Method, register
from dynvit.models.tokens import writes_out
from dynvit.reducers.base import ReducedRun, ReducedViT

# How a fused token is pooled (MCTF's ``pooling_type``): 0 size-weighted mean, 1 weighted by attention
# received × size / max size (MCTF's setting), 2 element-wise max, 3 plain mean.
POOLING_TYPES = (0, 1, 2, 3)
# Where the fusion acts (MCTF's ``one_step_ahead``): 0 after the block, by its attention; 1 before attention,
# whose map is fused instead of recomputed (MCTF's setting); 2 before attention, which is then recomputed.
ONE_STEP_AHEAD = (0, 1, 2)
# MCTF never fuses a sequence below this many tokens, class token included.
MIN_TOKENS = 10


def merge_count(tokens: int, r: int | float, num_prefix: int) -> int:
    """Tokens MCTF fuses in an active block that ``tokens`` tokens (prefix tokens included) enter.

    As MCTF computes it: ``r`` shrinks to ``tokens − 10`` where fewer than 10 would remain; a fraction
    ``r < 1`` counts ``int(patches · r)``; at most half the patch tokens. Where even that leaves nothing
    to fuse (fewer than 11 tokens), none (MCTF's code fails there).
    """
    if tokens - r < MIN_TOKENS:
        r = tokens - MIN_TOKENS
    patches = tokens - num_prefix
    r = int(patches * r) if r < 1 else r
    return max(min(r, patches // 2), 0)


class FusionPlan(NamedTuple):
    """Which tokens fuse where, as found by :func:`multi_criteria_matching`.

    Indices into set A (even positions) and B (odd positions) of the matched sequence.

    Attributes:
        unmerged: A tokens left after the first direction (B, |A| − r1).
        src, dst: A tokens fused away (B, r1) and the B token each goes into.
        unmerged_b: B tokens left after the second direction (B, |B| − r2), best score first; None when
            not bidirectional.
        src_b, dst_b: B tokens fused away (B, r2) and the position among ``unmerged`` each goes into.
    """

    unmerged: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    unmerged_b: torch.Tensor | None = None
    src_b: torch.Tensor | None = None
    dst_b: torch.Tensor | None = None


def received_attention(probs: torch.Tensor) -> torch.Tensor:
    """Attention each token receives (B, T): probabilities (B, H, T, T) averaged over heads and queries."""
    return probs.mean(dim=[1, 2])


@torch.no_grad()
def multi_criteria_matching(
    metric: torch.Tensor,
    received: torch.Tensor | None,
    size: torch.Tensor | None,
    r: int,
    protect_first: bool,
    tau_sim: float,
    tau_info: float,
    tau_size: float,
    bidirection: bool,
) -> FusionPlan:
    """MCTF's bipartite matching of tokens ``metric`` (B, T, C) by similarity × informativeness × size.

    Args:
        received: Attention each token receives in the block (B, T), for informativeness (None: off).
        size: Token sizes (B, T, 1), None before any fusion (size criterion off).
        r: Tokens to fuse: ``r // 2`` from A into B, then the rest from B into A when ``bidirection``.
        protect_first: Token 0 (the class token) is never fused, and A's order is kept (MCTF sorts the
            unmerged A tokens only when it protects tokens).
    """
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)  # the criteria are written as MCTF writes them, so rounding agrees
    scores = ((scores + 1) / 2) ** (1 / tau_sim) if tau_sim else torch.ones_like(scores)
    if tau_info > 0 and received is not None:
        info = 1 / received
        info = info / info.max(1, keepdim=True)[0]
        scores = scores * (info[..., ::2, None] * info[..., 1::2, None].transpose(1, 2)) ** (1 / tau_info)
    if tau_size and size is not None:
        inverse = 1 / size
        inverse = inverse / inverse.max(1, keepdim=True)[0]
        scores = scores * (inverse[..., ::2, :] * inverse[..., 1::2, :].transpose(1, 2)) ** (1 / tau_size)
    if protect_first:
        scores[..., :1, :] = -torch.inf
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    unmerged, src = order[..., r1:], order[..., :r1]
    dst = partner.gather(-1, src)
    if protect_first:
        unmerged = unmerged.sort(dim=-1)[0]
    if not bidirection:
        return FusionPlan(unmerged, src, dst)
    back = scores.gather(-2, unmerged[..., None].expand(-1, -1, scores.shape[-1])).transpose(1, 2)
    best_b, partner_b = back.max(dim=-1)
    order_b = best_b.sort(dim=-1, descending=True)[1]
    src_b = order_b[..., :r2]
    return FusionPlan(unmerged, src, dst, order_b[..., r2:], src_b, partner_b.gather(-1, src_b))


def _along(index: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """``index`` (B, n) broadcast to x's shape with n entries along ``dim`` (a gather or scatter index)."""
    view = [1] * x.dim()
    view[0], view[dim] = index.shape
    shape = list(x.shape)
    shape[dim] = index.shape[1]
    return index.view(view).expand(shape)


def _gather_into(out: torch.Tensor, x: torch.Tensor, dim: int, index: torch.Tensor) -> None:
    """``out`` ← x gathered at ``index`` along ``dim``, without a copy in between where :func:`writes_out` allows."""
    if not writes_out(x):
        out.copy_(x.gather(dim, index))
    else:
        torch.gather(x, dim, index, out=out)


def fuse(plan: FusionPlan, x: torch.Tensor, mode: str = "sum", held: int = 0, dim: int = -2) -> torch.Tensor:
    """Apply a plan along x's axis ``dim`` (tokens; an attention map's keys are the last axis), combining
    fused tokens by ``mode`` (sum or amax) in MCTF's order, so that sums round as its code does.

    The result is written in place into one output: the A tokens left and the B tokens left are gathered
    straight into their slices, and only the fused tokens are scattered. On the attention map, the largest
    tensor here, this takes less than half the time of gathering, scattering and concatenating whole sets.

    Args:
        held: Tokens in front that took no part in the matching (prefix tokens before the class token);
            they pass unchanged.
    Returns:
        x with T − r tokens along ``dim`` in MCTF's order: held tokens, A left, then B left (best score
        first; all of B one-way).
    """
    dim = dim % x.dim()
    matched = x.narrow(dim, held, x.shape[dim] - held)
    a = matched[(slice(None),) * dim + (slice(0, None, 2),)]
    b = matched[(slice(None),) * dim + (slice(1, None, 2),)]
    b = b.scatter_reduce(dim, _along(plan.dst, b, dim), a.gather(dim, _along(plan.src, a, dim)), mode)
    left_a = plan.unmerged.shape[1]
    left_b = b.shape[dim] if plan.unmerged_b is None else plan.unmerged_b.shape[1]
    shape = list(x.shape)
    shape[dim] = held + left_a + left_b
    out = x.new_empty(shape)
    if held:
        out.narrow(dim, 0, held).copy_(x.narrow(dim, 0, held))
    kept_a = out.narrow(dim, held, left_a)
    _gather_into(kept_a, a, dim, _along(plan.unmerged, a, dim))
    if plan.unmerged_b is None:
        out.narrow(dim, held + left_a, left_b).copy_(b)
        return out
    _gather_into(out.narrow(dim, held + left_a, left_b), b, dim, _along(plan.unmerged_b, b, dim))
    # Last, as autograd needs: the scatter's backward reads its result, which a later write into out would change.
    kept_a.scatter_reduce_(dim, _along(plan.dst_b, kept_a, dim), b.gather(dim, _along(plan.src_b, b, dim)), mode)
    return out


def fuse_tokens(
    plan: FusionPlan,
    x: torch.Tensor,
    size: torch.Tensor,
    probs: torch.Tensor,
    pooling_type: int,
    fuse_map: bool,
    held: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fuse tokens x (B, T, C) with sizes (B, T, 1) and, with ``fuse_map``, the attention map (B, H, T, T).

    The weights (attention received, sizes) carry no gradient, as in MCTF; the map's keys are summed and
    its queries pooled like the tokens.

    Returns:
        Fused tokens (B, T', C), their sizes (B, T', 1), the fused map (B, H, T', T') or None.
    """
    fused_probs = fuse(plan, probs, held=held, dim=-1) if fuse_map else None  # keys add up
    with torch.no_grad():
        new_size = fuse(plan, size, held=held)
    if pooling_type == 1:
        with torch.no_grad():
            received = received_attention(probs).unsqueeze(-1)
            relative = size / size.amax(dim=-2, keepdim=True)
            norm = fuse(plan, received * relative, held=held)
        if fused_probs is not None:  # products in MCTF's order, which rounds as its code does
            fused_probs = fuse(plan, fused_probs * received[:, None] * relative[:, None], held=held) / norm[:, None]
        return fuse(plan, x * received * relative, held=held) / norm, new_size, fused_probs
    if pooling_type == 2:
        if fused_probs is not None:
            fused_probs = fuse(plan, fused_probs, "amax", held)
        return fuse(plan, x, "amax", held), new_size, fused_probs
    if pooling_type == 0:
        if fused_probs is not None:
            fused_probs = fuse(plan, fused_probs * size[:, None], held=held) / new_size[:, None]
        return fuse(plan, x * size, held=held) / new_size, new_size, fused_probs
    with torch.no_grad():
        count = fuse(plan, torch.ones_like(size), held=held)
    if fused_probs is not None:
        fused_probs = fuse(plan, fused_probs, held=held) / count[:, None]
    return fuse(plan, x, held=held) / count, new_size, fused_probs


def attention_probs(attn: Attention, h: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """The attention probabilities (B, H, T, T) of normed tokens h (B, T, C), with ``log(size)`` added
    to the logits when sizes (B, T, 1) are given; only q and k are computed (MCTF's first pass)."""
    B, T, C = h.shape
    dim = attn.num_heads * attn.head_dim
    bias = None if attn.qkv.bias is None else attn.qkv.bias[: 2 * dim]
    qk = h @ attn.qkv.weight[: 2 * dim].T
    qk = (qk if bias is None else qk + bias).reshape(B, T, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qk[0]), attn.k_norm(qk[1])
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    return logits.softmax(dim=-1)


def attend_with(attn: Attention, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Attention output (B, T, C) of normed tokens h under given probabilities (B, H, T, T): only the values
    are computed from h (MCTF's one-step-ahead second pass)."""
    B, T, C = h.shape
    dim = attn.num_heads * attn.head_dim
    v = h @ attn.qkv.weight[2 * dim :].T
    if attn.qkv.bias is not None:
        v = v + attn.qkv.bias[2 * dim :]
    v = v.reshape(B, T, attn.num_heads, attn.head_dim).permute(0, 2, 1, 3)
    out = attn.norm((attn.attn_drop(probs) @ v).transpose(1, 2).reshape(B, T, dim))
    if attn.gate is not None:
        out = out * attn.gate(h).sigmoid()
    return attn.proj_drop(attn.proj(out))


def full_attention(attn: Attention, h: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and probabilities of normed tokens h, written out as MCTF's plain pass."""
    B, T, C = h.shape
    q, k, v = attn.qkv(h).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    probs = logits.softmax(dim=-1)
    out = attn.norm((attn.attn_drop(probs) @ v).transpose(1, 2).reshape(B, T, -1))
    if attn.gate is not None:
        out = out * attn.gate(h).sigmoid()
    return attn.proj_drop(attn.proj(out)), probs


def _check_choice(name: str, value: object, choices: tuple) -> int:
    if isinstance(value, bool):
        value = int(value)
    if value not in choices or not isinstance(value, int):
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class MCTFViT(ReducedViT):
    """A timm ViT fusing tokens by multi-criteria bipartite matching before attention (MCTF).

    Build with ``dynvit.methods.get("mctf").build(vit, r=16)``; MCTF-Fast is
    ``r=0.35, activate_layer=(3, 6, 9)``.
    """

    method = "mctf"

    def configure(
        self,
        r: int | float = 16,
        activate_layer: Sequence[int] | None = None,
        prop_attn: bool = True,
        one_step_ahead: int = 1,
        tau_sim: float = 1,
        tau_info: float = 20,
        tau_size: float = 40,
        bidirection: bool = True,
        pooling_type: int = 1,
    ) -> None:
        """Args (MCTF's names and its DeiT settings):
        r: Tokens fused per active block (an int), or a fraction in (0, 1) of the current patch tokens;
            capped at half the patch tokens and so that 10 tokens remain (:func:`merge_count`).
        activate_layer: Blocks that fuse; by default every block but the first.
        prop_attn: Add ``log(size)`` to the attention logits.
        one_step_ahead: 1: fuse before attention and fuse its map instead of recomputing it; 2: fuse
            before attention and recompute it; 0: fuse after the block, by its attention.
        tau_sim, tau_info, tau_size: Temperatures of the three criteria; 0 turns one off.
        bidirection: Fuse A into B (``r // 2``), then B into the A left (the rest); else only A into B.
        pooling_type: How fused tokens are pooled: 1 attention received × size (MCTF), 0 size-weighted
            mean, 2 max, 3 plain mean.
        """
        depth = len(self.blocks)
        if isinstance(r, bool) or not isinstance(r, int | float) or not r >= 0 or (isinstance(r, float) and not r < 1):
            raise ValueError(
                f"r must be an int count >= 0 or a fraction in (0, 1) of the patch tokens, got {r!r}"
                + (" (a fraction of 1 or more would fuse every token)" if isinstance(r, float) and r >= 1 else "")
            )
        if isinstance(r, int) and r > self.num_patches // 2:
            raise ValueError(
                f"r={r} asks to fuse more than half of the {self.num_patches} patch tokens, which bipartite "
                f"matching cannot: use r <= {self.num_patches // 2}, or a fraction below 1"
            )
        layers = tuple(range(1, depth)) if activate_layer is None else tuple(activate_layer)
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth for i in layers):
            raise ValueError(f"activate_layer must hold block indices 0..{depth - 1}, got {layers}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"activate_layer names a block twice: {layers}")
        for name, tau in (("tau_sim", tau_sim), ("tau_info", tau_info), ("tau_size", tau_size)):
            if isinstance(tau, bool) or not isinstance(tau, int | float) or tau < 0:
                raise ValueError(f"{name} must be a temperature >= 0 (0 turns the criterion off), got {tau!r}")
        self.one_step_ahead = _check_choice("one_step_ahead", one_step_ahead, ONE_STEP_AHEAD)
        self.pooling_type = _check_choice("pooling_type", pooling_type, POOLING_TYPES)
        self.r, self.activate_layer = r, tuple(sorted(layers))
        self.prop_attn, self.bidirection = bool(prop_attn), bool(bidirection)
        self.tau_sim, self.tau_info, self.tau_size = tau_sim, tau_info, tau_size

    def merges(self) -> list[int]:
        """Tokens fused in each block (0 where it does not fuse)."""
        n, out = self.num_patches + self.num_prefix_tokens, []
        for i in range(len(self.blocks)):
            m = merge_count(n, self.r, self.num_prefix_tokens) if i in self.activate_layer else 0
            out.append(m)
            n -= m
        return out

    def token_schedule(self) -> list[tuple[int, int]]:
        n, counts = self.num_patches + self.num_prefix_tokens, []
        for m in self.merges():
            counts.append((n, n) if self.one_step_ahead == 0 else (n, n - m))
            n -= m
        return counts

    def run_blocks(self, x: torch.Tensor) -> ReducedRun:
        return self.trace(x)[0]

    def trace(self, x: torch.Tensor, track_sources: bool = False) -> tuple[ReducedRun, torch.Tensor | None]:
        """Embedded tokens (B, P + N, C) through the blocks; with ``track_sources``, also which original
        patches (B, M, N) bool each final non-prefix token stands for."""
        B, T, _ = x.shape
        p = self.num_prefix_tokens
        held = max(p - 1, 0)  # as ToMe: prefix tokens before the last stay out; the last is A's protected first
        size = None  # unset until the first fusion: no size criterion, no attention bias (as MCTF)
        sources = None
        if track_sources:
            eye = torch.eye(T - p, dtype=torch.uint8, device=x.device)
            sources = torch.cat([eye.new_zeros(p, T - p), eye]).expand(B, -1, -1)
        for block, r in zip(self.blocks, self.merges(), strict=True):
            bias_size = size if self.prop_attn else None
            if not r:
                x = block.feed_forward(
                    x + block.drop_path1(block.ls1(full_attention(block.attn, block.norm1(x), bias_size)[0]))
                )
                continue
            if self.one_step_ahead == 0:  # the block as it is, then fusion by its attention
                out, probs = full_attention(block.attn, block.norm1(x), bias_size)
                x = block.feed_forward(x + block.drop_path1(block.ls1(out)))
            elif self.one_step_ahead == 1:
                probs = attention_probs(block.attn, block.norm1(x), bias_size)
            else:
                with torch.no_grad():
                    probs = attention_probs(block.attn, block.norm1(x), bias_size)
            plan = multi_criteria_matching(
                x[:, held:],
                received_attention(probs)[:, held:],
                None if size is None else size[:, held:],
                r,
                p > 0,
                self.tau_sim,
                self.tau_info,
                self.tau_size,
                self.bidirection,
            )
            size = x.new_ones(B, x.shape[1], 1) if size is None else size
            x, size, probs = fuse_tokens(plan, x, size, probs, self.pooling_type, self.one_step_ahead == 1, held)
            if sources is not None:
                sources = fuse(plan, sources, "amax", held)
            if self.one_step_ahead == 1:  # one step ahead: the fused map serves as this block's attention
                out = attend_with(block.attn, block.norm1(x), probs)
            elif self.one_step_ahead == 2:
                out = full_attention(block.attn, block.norm1(x), size if self.prop_attn else None)[0]
            if self.one_step_ahead:
                x = block.feed_forward(x + block.drop_path1(block.ls1(out)))
        counts = torch.tensor(self.token_schedule(), device=x.device).expand(B, -1, -1)
        if sources is not None:
            sources = sources[:, p:].bool()
        return ReducedRun(tokens=x, kept=[], counts=counts, sizes=None if size is None else size.squeeze(-1)), sources

    @torch.no_grad()
    def predict_with_sources(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode logits and which original patches (B, M, N) bool each final non-prefix token stands for."""
        with self.evaluating():
            run, sources = self.trace(self.embed(x), track_sources=True)
            return self.pooled_head(self.norm(run.tokens), run.sizes), sources


register(
    Method(
        name="mctf",
        summary="fuse tokens before attention by similarity × informativeness × size, both ways, reusing the "
        "fused attention map (MCTF)",
        learned=False,
        build=MCTFViT.from_vit,
        knob=Knob("r", 0, lambda vit: vit.patch_embed.num_patches // 2, integer=True, cheaper="higher"),
        cost="schedule",
        reports=frozenset({"counts", "sources"}),
        onnx=None,
        reference="mlvlab/MCTF utils/mctf.py, models/modules/blocks.py, models/SA/MHSA.py",
        released={"r=16": {"r": 16}, "Fast": {"r": 0.35, "activate_layer": (3, 6, 9)}},
    )
)

__all__ = ["FusionPlan", "MCTFViT", "fuse", "fuse_tokens", "merge_count", "multi_criteria_matching"]
