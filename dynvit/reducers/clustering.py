"""What TokenReduction's clustering and merging methods share (K-Medoids, DPC-KNN, PatchMerger,
Sinkhorn, SiT; Haurum et al., "Which Tokens to Use?", ICCVW 2023, ``JoakimHaurum/TokenReduction``).

All of them act *before* the blocks in ``reduction_loc`` (0-based), so such a block runs whole on the
reduced tokens; dynvit's EViT and top-k act between attention and MLP instead. The prefix tokens
(class, distillation, register tokens) stay in front, unchanged; only the patch tokens are clustered.
Stage s leaves ``K_s = int(N · keep_rate^(s+1))`` tokens of the N original patches, relative to N, not
to the previous stage (137, 96, 67 for DeiT-S at 0.7).

A method subclasses :class:`ClusteringViT` and implements :meth:`ClusteringViT.reduce`, one stage's
clustering of the current patch tokens. Learned methods build their per-stage modules in
:meth:`ClusteringViT.stage_module`; they live in ``cluster_layers`` (index = stage) under the reference's
own sub-module names, so a TokenReduction checkpoint loads strictly with no conversion.

Each stage reports which output token every input token went to: hard clusterings
``{"centres": (B, K_s), "assignment": (B, N_s)}`` (centres index the stage's input tokens, assignment
gives each input token's output token), soft ones ``{"weights": (B, K_s, N_s)}`` (how much of input token
n makes output token k). :func:`patch_assignment` follows them back to the original patches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from timm.models.vision_transformer import Block
from torch import nn

from dynvit.models.dynamic_vit import init_predictor, keep_counts
from dynvit.models.factory import default_pruning_loc
from dynvit.reducers.base import ReducedRun, ReducedViT, validate_rate

# What one stage reports about its clustering (see the module docstring for the keys).
Assignment = dict[str, torch.Tensor]


class StageContext(NamedTuple):
    """What :meth:`ClusteringViT.reduce` may use besides the patch tokens.

    Attributes:
        block: Index of the block that will run on the reduced tokens (an entry of ``reduction_loc``).
        keep: K_s, the tokens this stage must return.
        prefix: The prefix tokens (B, P, C), class token first; they are kept whatever ``reduce`` does.
        attention: Attention probabilities (B, H, P + N_s, P + N_s) of the previous block over the current
            tokens, prefix tokens included, when the method sets ``needs_attention``; else None.
        generator: Where random draws come from: a generator seeded afresh on every forward when the model
            has a ``seed``, else None (torch's global generator, as the reference draws).
    """

    block: int
    keep: int
    prefix: torch.Tensor
    attention: torch.Tensor | None
    generator: torch.Generator | None


class ClusteredRun(NamedTuple):
    """Result of :meth:`ClusteringViT.run_stages`: the usual run plus every stage's :data:`Assignment`."""

    run: ReducedRun
    assignments: list[Assignment]


def cluster_counts(num_patches: int, keep_rate: float, num_stages: int) -> list[int]:
    """K_s = ``int(N · keep_rate^(s+1))`` for every stage, the reference's float expression.

    Raises:
        ValueError: a stage would keep no token; the message names the smallest keep rate that works.
    """
    counts = keep_counts(num_patches, keep_rate, num_stages)
    if counts[-1] < 1:
        # The smallest rate on a 0.001 grid whose float expression keeps a token at the last stage.
        lowest = math.ceil((1.0 / num_patches) ** (1.0 / num_stages) * 1000) / 1000
        while keep_counts(num_patches, lowest, num_stages)[-1] < 1:
            lowest = round(lowest + 0.001, 3)
        raise ValueError(
            f"keep_rate {keep_rate} keeps int({num_patches} * {keep_rate}^{num_stages}) = 0 patch tokens at stage "
            f"{num_stages - 1}: raise keep_rate to at least {lowest} or use fewer reduction_loc entries"
        )
    return counts


def check_reduction_loc(reduction_loc: tuple[int, ...], depth: int) -> None:
    """Raise ``ValueError`` unless ``reduction_loc`` holds strictly increasing block indices 0..depth-1."""
    if any(isinstance(i, bool) or not isinstance(i, int) for i in reduction_loc):
        raise ValueError(f"reduction_loc must hold integer block indices, got {reduction_loc}")
    if not reduction_loc:
        raise ValueError("reduction_loc is empty: give at least one block index, e.g. (3, 6, 9)")
    if any(b <= a for a, b in zip(reduction_loc, reduction_loc[1:], strict=False)):
        raise ValueError(f"reduction_loc must be strictly increasing, got {reduction_loc}")
    if reduction_loc[0] < 0 or reduction_loc[-1] >= depth:
        raise ValueError(f"reduction_loc {reduction_loc} must index blocks 0..{depth - 1} of this {depth}-block model")


def default_params(vit: nn.Module) -> dict[str, object]:
    """TokenReduction's keep rate 0.7 and DynamicViT's stage blocks for ``vit`` (3, 6, 9 on 12 blocks): the
    registry's defaults for the clustering methods."""
    name = (getattr(vit, "pretrained_cfg", None) or {}).get("architecture", "")
    return {"keep_rate": 0.7, "reduction_loc": default_pruning_loc(name, len(vit.blocks))}


def block_with_attention(block: Block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm ``Block`` on x (B, M, C), unfused, also returning its attention probabilities (B, H, M, M).

    The logits are ``(q @ kᵀ) · scale`` as TokenReduction's blocks compute them (timm scales q first), so
    the weights K-Medoids ranks tokens by are the reference's to the last bit. The probabilities are
    returned after attention dropout, as the reference returns them.
    """
    attn = block.attn
    B, M, _ = x.shape
    h = block.norm1(x)
    gate = attn.gate(h).sigmoid() if attn.gate is not None else None
    q, k, v = attn.qkv(h).reshape(B, M, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = attn.attn_drop(((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1))
    out = attn.norm((probs @ v).transpose(1, 2).reshape(B, M, attn.attn_dim))
    if gate is not None:
        out = out * gate
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, probs


class ClusteringViT(ReducedViT):
    """A timm ViT whose patch tokens are clustered into K_s tokens before each block of ``reduction_loc``.

    Subclasses set ``method``, implement :meth:`reduce`, and, when learned, :meth:`stage_module`.
    Methods with their own parameters extend :meth:`configure`: set them, then call
    ``super().configure(keep_rate, reduction_loc)`` (which builds the stage modules).
    """

    # The block before each reduction hands its attention probabilities to reduce (K-Medoids).
    needs_attention: bool = False
    # The output tokens are input tokens (the centres, in order), so the original patch each one is is tracked.
    selects: bool = False
    # Set by subclasses that draw random numbers: seeds a generator afresh on every forward; None draws
    # from torch's global generator.
    seed: int | None = None
    # What clustering adds to a plain ViT: loaded from a plain checkpoint at its init, trained at full rate.
    new_param_prefixes: tuple[str, ...] = ("cluster_layers.",)
    cluster_layers: nn.ModuleList

    def configure(self, keep_rate: float = 0.7, reduction_loc: Sequence[int] | None = None) -> None:
        """Args:
        keep_rate: Stage s keeps ``int(N · keep_rate^(s+1))`` of the N original patch tokens.
        reduction_loc: Blocks (0-based) before which tokens are clustered; DynamicViT's stage blocks by
            default (3, 6, 9 on a 12-block ViT, TokenReduction's setting).
        Raises:
            ValueError: keep_rate outside (0, 1] or keeping no token at some stage; bad block indices;
                location 0 for a method that needs the previous block's attention.
        """
        validate_rate("keep_rate", keep_rate)
        loc = self.default_loc() if reduction_loc is None else tuple(reduction_loc)
        check_reduction_loc(loc, len(self.blocks))
        if self.needs_attention and loc[0] == 0:
            raise ValueError(
                f"{self.method} weighs tokens by the attention they received in the previous block, and block 0 "
                f"has none: start reduction_loc at block 1 or later, got {loc}"
            )
        counts = cluster_counts(self.num_patches, keep_rate, len(loc))
        self.keep_rate, self.reduction_loc, self.keep_counts = float(keep_rate), loc, counts
        modules = [self.stage_module(s, k) for s, k in enumerate(counts)]
        if any(m is None for m in modules) and not all(m is None for m in modules):
            raise TypeError(f"{type(self).__name__}.stage_module must give a module for every stage or for none")
        self.cluster_layers = nn.ModuleList([] if modules[0] is None else modules)
        # New modules join the model as it is: its device, dtype and mode (an eval model must not get
        # training-mode layers).
        param = next(self.parameters())
        self.cluster_layers.to(device=param.device, dtype=param.dtype).train(self.training)

    def stage_module(self, stage: int, keep: int) -> nn.Module | None:
        """The learned module of ``stage`` (stored as ``cluster_layers[stage]``), at the reference's init;
        None for training-free methods."""
        return None

    def reduce(self, stage: int, x: torch.Tensor, context: StageContext) -> tuple[torch.Tensor, Assignment]:
        """Cluster the patch tokens x (B, N_s, C) of ``stage`` into ``context.keep`` tokens.

        Returns:
            The new patch tokens (B, K_s, C) and the stage's :data:`Assignment`.
        """
        raise NotImplementedError

    def init_stage_module(self, module: nn.Module) -> nn.Module:
        """``module`` at the reference's initialisation (timm 0.4.12's ViT init, which TokenReduction applies to
        its whole model: Linear weights truncated normal, std 0.02, zero biases; LayerNorm ones and zeros)."""
        init_predictor(module)
        return module

    def token_schedule(self) -> list[tuple[int, int]]:
        counts, n, p = [], self.num_patches, self.num_prefix_tokens
        for i in range(len(self.blocks)):
            if i in self.reduction_loc:
                n = self.keep_counts[self.reduction_loc.index(i)]
            counts.append((n + p, n + p))
        return counts

    def run_stages(self, x: torch.Tensor) -> ClusteredRun:
        """Embedded tokens (B, P + N, C) through the blocks, clustering before each ``reduction_loc`` block."""
        B, p = x.shape[0], self.num_prefix_tokens
        generator = None if self.seed is None else torch.Generator(device=x.device).manual_seed(self.seed)
        index = torch.arange(self.num_patches, device=x.device).expand(B, -1)
        kept, assignments, attention = [], [], None
        for i, block in enumerate(self.blocks):
            if i in self.reduction_loc:
                stage = self.reduction_loc.index(i)
                context = StageContext(i, self.keep_counts[stage], x[:, :p], attention, generator)
                patches, assignment = self.reduce(stage, x[:, p:], context)
                x = torch.cat([x[:, :p], patches], dim=1)
                if self.selects:
                    index = torch.gather(index, 1, assignment["centres"])
                else:
                    index = index.new_full((B, patches.shape[1]), self.num_patches)
                kept.append(index)
                assignments.append(assignment)
            if self.needs_attention and i + 1 in self.reduction_loc:
                x, attention = block_with_attention(block, x)
            else:
                x = block(x)
        counts = torch.tensor(self.token_schedule(), device=x.device).expand(B, -1, -1)
        return ClusteredRun(ReducedRun(tokens=x, kept=kept, counts=counts), assignments)

    def run_blocks(self, x: torch.Tensor) -> ReducedRun:
        return self.run_stages(x).run

    @torch.no_grad()
    def predict_with_assignments(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Assignment]]:
        """Eval-mode logits and every stage's :data:`Assignment` (the mode is restored after)."""
        with self.evaluating():
            result = self.run_stages(self.embed(x))
            return self.pooled_head(self.norm(result.run.tokens), result.run.sizes), result.assignments


def token_of_input(assignment: Assignment) -> torch.Tensor:
    """The output token (B, N_s) each input token of a stage went to.

    Hard clusterings give it as ``assignment``; for soft ones it is the output token that takes the
    largest weight of the input token (``weights.argmax`` over the K_s output tokens; ties to the first).
    """
    if "assignment" in assignment:
        return assignment["assignment"]
    if "weights" in assignment:
        return assignment["weights"].argmax(dim=1)
    raise ValueError(f"a stage assignment holds 'assignment' or 'weights', got keys {sorted(assignment)}")


def stage_tokens(assignment: Assignment) -> int:
    """K_s, the output tokens of a stage: the centres or weight rows it names, else (a hard clustering given by
    its assignment alone, as ATC's) one more than the largest token id."""
    for key in ("centres", "weights"):
        if key in assignment:
            return assignment[key].shape[1]
    return int(token_of_input(assignment).max()) + 1


def patch_assignment(assignments: Sequence[Assignment], stage: int) -> torch.Tensor:
    """The output token of ``stage`` each original patch ended in (B, N), following stages 0..stage.

    Colour each patch by this id to draw the clusters of a stage. Soft stages count via
    :func:`token_of_input`.

    Args:
        assignments: Every stage's :data:`Assignment`, as :meth:`ClusteringViT.predict_with_assignments`
            returns them.
        stage: 0-based stage index (negative counts from the last, as in a list).
    """
    stage = stage + len(assignments) if -len(assignments) <= stage < 0 else stage
    if not 0 <= stage < len(assignments):
        raise ValueError(f"stage must be in 0..{len(assignments) - 1} for {len(assignments)} stages, got {stage}")
    token = token_of_input(assignments[0])
    for later in assignments[1 : stage + 1]:
        token = torch.gather(token_of_input(later), 1, token)
    return token


def cluster_purity(patch_token: torch.Tensor, digit_mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Per image, the fraction of digit patches that lie in a digit-majority cluster (B,).

    A cluster is the set of original patches mapped to one output token (:func:`patch_assignment`). It is
    digit-majority when strictly more than half of its patches are digit patches (by the digits' patch
    masks). Purity is Σ over digit-majority clusters of their digit patches, divided by all digit patches:
    1 when no digit patch is merged into a mostly-background token, lower as digits get absorbed into
    background. An image with no digit patch has purity NaN.

    Args:
        patch_token: Output token id of every original patch (B, N), in ``0..num_tokens-1``.
        digit_mask: True on digit patches (B, N).
        num_tokens: K, the output tokens of the stage.
    """
    if patch_token.shape != digit_mask.shape:
        raise ValueError(f"patch_token {tuple(patch_token.shape)} and digit_mask {tuple(digit_mask.shape)} differ")
    digit = digit_mask.to(torch.float64)
    size = torch.zeros(patch_token.shape[0], num_tokens, dtype=torch.float64, device=patch_token.device)
    size = size.scatter_add(1, patch_token, torch.ones_like(digit))
    digits = torch.zeros_like(size).scatter_add(1, patch_token, digit)
    majority = digits > size / 2
    return (digits * majority).sum(dim=1) / digit.sum(dim=1)


__all__ = [
    "Assignment",
    "ClusteredRun",
    "ClusteringViT",
    "StageContext",
    "block_with_attention",
    "check_reduction_loc",
    "cluster_counts",
    "cluster_purity",
    "default_params",
    "patch_assignment",
    "stage_tokens",
    "token_of_input",
]
