"""DVT (Wang et al., "Not All Images are Worth 16x16 Words: Dynamic Transformers for Efficient Image
Recognition", NeurIPS 2021): a cascade of transformers on ever finer token grids that stops at the
first exit confident enough, so every image gets its own number of tokens.

Three complete backbones (own patch embedding, class token, position embedding, blocks, norm, head)
run on grids of 7×7, 10×10 and 14×14 patches (50, 101 and 197 tokens with the class token). Exits 2
and 3 reuse what the exit before them computed:

- *feature reuse*: each block has a ``feature_resuse_mlp`` (LN, then an MLP width → 128 → 48) applied
  to the previous exit's final tokens before its norm; the patch part is resampled to this exit's
  grid (nearest upsampling to an intermediate grid, then adaptive average pooling) and the class
  token gets zeros. The 48 channels are concatenated to the block's tokens after attention, before
  the block's MLP, whose norm and first layer are widened to width + 48 (its output stays width).
- *relationship reuse*: the previous exit's pre-softmax attention logits of all blocks, stacked as
  depth × heads channels, pass through 1×1 convolutions (depth·heads → 3·depth·heads → depth·heads,
  GELU between), are resampled to the new grid along keys, then along queries (the class row and
  column are kept as they are), and are added to the logits of the matching block and head.

The backbones are timm's (``VisionTransformer``, or dynvit's :class:`~dynvit.models.t2t_vit.T2TViT`),
converted in place: their blocks become :class:`ReuseBlock` and their attention :class:`LogitAttention`
by a ``__class__`` swap, and the reuse layers are added under the released checkpoints' key names
(``less_less_token.*``, ``less_token.*``, ``normal_token.*``), so those files load strictly.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import math
import numbers
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from dynvit import methods as _methods
from dynvit.models.masked_attention import attention_inputs, attention_output
from dynvit.models.t2t_vit import SOFT_SPLITS, T2T_12_ARGS, T2T_14_ARGS, T2TViT

# The released cascades' attribute (and checkpoint key) names, coarsest grid first.
EXIT_NAMES = ("less_less_token", "less_token", "normal_token")


class LogitAttention(Attention):
    """timm's ``Attention`` that takes an additive bias on its logits and can return the logits.

    timm's fused kernel exposes neither the pre-softmax logits nor (in all backends) a per-sample
    additive bias with gradients, which relationship reuse needs; this subclass computes the logits
    explicitly when asked for them and otherwise keeps the fused kernel (with the bias as float mask).
    """

    def forward_logits(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, need_logits: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention output (B, N, C) and the logits ``scale · q·kᵀ + bias`` (B, H, N, N) before the softmax.

        Args:
            x: Tokens (B, N, C), already normalised.
            bias: Added to the logits (B, H, N, N), or None.
            need_logits: Return the logits (else None, and the fused kernel runs).
        """
        q, k, v, gate = attention_inputs(self, x)
        if not need_logits and not (self.training and self.attn_drop.p > 0):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
            return attention_output(self, out, gate), None
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = self.attn_drop(logits.softmax(dim=-1)) @ v
        return attention_output(self, out, gate), logits


class ReuseBlock(Block):
    """timm's ``Block`` that passes logits out and a bias in, and (exits 2, 3) widens its MLP input.

    With feature reuse, :meth:`add_feature_reuse` replaces ``norm2`` and ``mlp`` by versions taking
    width + ``reuse_dim`` channels and adds ``feature_resuse_mlp`` (the released key spelling).
    """

    def add_feature_reuse(self, reuse_hidden: int, reuse_dim: int) -> None:
        """Widen this block for feature reuse (fresh weights for the widened norm and MLP)."""
        dim = self.norm1.normalized_shape[0]
        eps = self.norm1.eps
        device = self.norm1.weight.device
        self.norm2 = nn.LayerNorm(dim + reuse_dim, eps=eps, device=device)
        self.mlp = Mlp(dim + reuse_dim, self.mlp.fc1.out_features, dim).to(device)
        self.feature_resuse_mlp = nn.Sequential(nn.LayerNorm(dim, eps=eps), Mlp(dim, reuse_hidden, reuse_dim)).to(
            device
        )
        for module in (self.mlp, self.feature_resuse_mlp):
            module.apply(_init_linear)

    def forward_reuse(
        self,
        x: torch.Tensor,
        reused: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        need_logits: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block on tokens x (B, N, C) with reused features (B, N, reuse_dim) and logit bias.

        Returns:
            The new tokens and this block's attention logits (None unless ``need_logits``).
        """
        y, logits = self.attn.forward_logits(self.norm1(x), bias, need_logits)
        x = x + self.drop_path1(self.ls1(y))
        h = x if reused is None else torch.cat([x, reused], dim=-1)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(h)))), logits


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def resample_matrix(src: int, up: int, dst: int) -> torch.Tensor:
    """The linear map (dst², src²) of nearest upsampling src×src → up×up, then adaptive average
    pooling to dst×dst, on row-major flattened grids.

    DVT resamples reused features and logits this way. Built by pushing the src² unit images through
    ``F.interpolate`` and ``F.adaptive_avg_pool2d``, so it is those two ops; as a matrix it is one
    matmul on any number of channels, exports to ONNX as a constant, and needs no chunking.
    """
    basis = torch.eye(src * src, dtype=torch.float64).reshape(src * src, 1, src, src)
    out = F.adaptive_avg_pool2d(F.interpolate(basis, size=(up, up), mode="nearest"), (dst, dst))
    return out.reshape(src * src, dst * dst).T.float().contiguous()


def square_side(num_patches: int, what: str) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"DVT needs square patch grids; {what} has {num_patches} patches")
    return side


@dataclass
class ExitState:
    """What an exit hands to the next: its final tokens before the norm (B, N, C) and its blocks'
    stacked attention logits (B, depth·heads, N, N)."""

    tokens: torch.Tensor
    logits: torch.Tensor

    def select(self, index: torch.Tensor) -> ExitState:
        return ExitState(self.tokens[index], self.logits[index])


class EarlyExit(NamedTuple):
    """What :meth:`DVT.predict_early_exit` returns: each image's logits (B, classes) from the exit it
    left at, and that exit's index (B,) (0 = the coarsest grid)."""

    logits: torch.Tensor
    exit_index: torch.Tensor


class DVT(nn.Module):
    """A DVT cascade of three ViT backbones with feature and relationship reuse.

    ``train()`` mode: ``dvt(x)`` returns the three exits' logits (a tuple, coarsest grid first).
    ``eval()`` mode: ``dvt(x)`` answers with early exit at ``self.thresholds`` when they are set
    (see :meth:`choose_thresholds`), else with the last exit's logits (all three run).

    Args:
        exits: Three backbones (timm ``VisionTransformer`` or :class:`~dynvit.models.t2t_vit.T2TViT`)
            of the same depth, width and heads, on growing square grids. Converted in place.
        upsample: Side of the intermediate grid the previous exit's grid is upsampled to (nearest)
            before pooling to exits 2 and 3's grids; the released cascades use 14 and 20. By default
            twice the previous grid's side.
        feature_reuse: Reuse the previous exit's features (exits 2, 3).
        relation_reuse: Reuse the previous exit's attention logits (exits 2, 3).
        reuse_hidden: Hidden width of ``feature_resuse_mlp``.
        reuse_dim: Channels of the reused features.
    """

    # The registry's record (``dynvit.methods.get("dvt")``), and the class token no exit reduces.
    method = "dvt"
    num_prefix_tokens = 1

    def __init__(
        self,
        exits: Sequence[nn.Module],
        upsample: Sequence[int] | None = None,
        feature_reuse: bool = True,
        relation_reuse: bool = True,
        reuse_hidden: int = 128,
        reuse_dim: int = 48,
    ) -> None:
        super().__init__()
        if len(exits) != len(EXIT_NAMES):
            raise ValueError(f"DVT takes {len(EXIT_NAMES)} backbones, coarsest grid first; got {len(exits)}")
        shapes = {(len(m.blocks), m.blocks[0].attn.num_heads, m.embed_dim) for m in exits}
        if len(shapes) != 1:
            raise ValueError(f"DVT's backbones must share depth, heads and width; got (depth, heads, width) {shapes}")
        ((self.depth, self.num_heads, self.embed_dim),) = shapes
        self.grids = [square_side(m.patch_embed.num_patches, f"exit {i + 1}") for i, m in enumerate(exits)]
        if sorted(set(self.grids)) != self.grids:
            raise ValueError(f"DVT's exits need ever finer grids, got {self.grids}")
        if upsample is None:
            upsample = [2 * g for g in self.grids[:-1]]
        if len(upsample) != len(exits) - 1:
            raise ValueError(f"upsample gives the intermediate grid side for exits 2 and 3: 2 values, got {upsample}")
        self.upsample = [int(u) for u in upsample]
        self.feature_reuse = feature_reuse
        self.relation_reuse = relation_reuse
        self.num_classes = exits[-1].num_classes
        self.thresholds: torch.Tensor | None = None
        self._exit_gflops: list[float] | None = None
        for index, (name, backbone) in enumerate(zip(EXIT_NAMES, exits, strict=True)):
            for block in backbone.blocks:
                if type(block) is not Block or type(block.attn) is not Attention:
                    raise TypeError(f"DVT converts timm Block/Attention, got {type(block).__name__}")
                block.__class__ = ReuseBlock
                block.attn.__class__ = LogitAttention
                if index and feature_reuse:
                    block.add_feature_reuse(reuse_hidden, reuse_dim)
            if index and relation_reuse:
                channels = self.depth * self.num_heads
                backbone.relation_reuse_conv = nn.Sequential(
                    nn.Conv2d(channels, 3 * channels, 1), nn.GELU(), nn.Conv2d(3 * channels, channels, 1)
                ).to(backbone.cls_token.device)
            self.add_module(name, backbone)
        for index in range(1, len(exits)):
            matrix = resample_matrix(self.grids[index - 1], self.upsample[index - 1], self.grids[index])
            self.register_buffer(f"resample{index}", matrix, persistent=False)

    # -- structure -------------------------------------------------------------------------------

    @property
    def exits(self) -> list[nn.Module]:
        """The backbones, coarsest grid first."""
        return [getattr(self, name) for name in EXIT_NAMES]

    @property
    def tokens_per_exit(self) -> list[int]:
        """Tokens each exit's blocks run on, class token included (50, 101, 197 for the released grids)."""
        return [g * g + 1 for g in self.grids]

    @property
    def patch_embed(self) -> nn.Module:
        """The finest exit's patch embedding: it names the input size (``img_size``, ``in_chans``)."""
        return self.exits[-1].patch_embed

    @property
    def pretrained_cfg(self) -> dict:
        """The finest exit's timm data config (mean, std, interpolation, crop), which the data follows."""
        return self.exits[-1].pretrained_cfg

    @property
    def num_exits(self) -> int:
        return len(EXIT_NAMES)

    def check_input(self, x: torch.Tensor) -> None:
        """A clear error for images the cascade's patch grids were not built for."""
        expected = self.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit this DVT cascade: its patch grids "
                f"{'/'.join(f'{g}x{g}' for g in self.grids)} are built for (B, {expected[0]}, {expected[1]}, "
                f"{expected[2]}) images; resize the data or build the cascade with create_dvt(..., img_size=...)"
            )

    # -- one exit --------------------------------------------------------------------------------

    def _embed(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(backbone, VisionTransformer):
            x = backbone._pos_embed(backbone.patch_embed(x))
            return backbone.norm_pre(backbone.patch_drop(x))
        return backbone.embed(x)

    def _resample_relations(self, index: int, logits: torch.Tensor) -> torch.Tensor:
        """Previous logits (B, D·H, 1+S, 1+S) → this exit's (B, D·H, 1+T, 1+T), class row/column kept."""
        matrix = getattr(self, f"resample{index}")
        keys = torch.cat([logits[..., :1], logits[..., 1:] @ matrix.T], dim=-1)
        return torch.cat([keys[..., :1, :], matrix @ keys[..., 1:, :]], dim=-2)

    def _resample_features(self, index: int, features: torch.Tensor) -> torch.Tensor:
        """Reused patch features (B, S, c) → (B, 1+T, c) on this exit's grid, zeros for the class token."""
        patches = getattr(self, f"resample{index}") @ features
        return torch.cat([patches.new_zeros(patches.shape[0], 1, patches.shape[2]), patches], dim=1)

    def run_exit(
        self, index: int, x: torch.Tensor, previous: ExitState | None, need_state: bool = True
    ) -> tuple[torch.Tensor, ExitState | None]:
        """Exit ``index`` on images x, given what the exit before it handed on.

        Returns:
            Its logits (B, classes) and what it hands to the next exit (None unless ``need_state``).
        """
        backbone = self.exits[index]
        tokens = self._embed(backbone, x)
        biases: Sequence[torch.Tensor | None] = [None] * self.depth
        if index and self.relation_reuse:
            reused = self._resample_relations(index, backbone.relation_reuse_conv(previous.logits))
            biases = reused.chunk(self.depth, dim=1)
        prev_tokens = previous.tokens[:, 1:] if index and self.feature_reuse else None
        logits = []
        for block, bias in zip(backbone.blocks, biases, strict=True):
            reused_features = None
            if prev_tokens is not None:
                reused_features = self._resample_features(index, block.feature_resuse_mlp(prev_tokens))
            tokens, block_logits = block.forward_reuse(tokens, reused_features, bias, need_logits=need_state)
            logits.append(block_logits)
        out = backbone.forward_head(backbone.norm(tokens))
        return out, (ExitState(tokens, torch.cat(logits, dim=1)) if need_state else None)

    # -- forwards --------------------------------------------------------------------------------

    def forward_exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits (B, classes), coarsest grid first, in any mode."""
        self.check_input(x)
        outputs, state = [], None
        for index in range(self.num_exits):
            out, state = self.run_exit(index, x, state, need_state=index < self.num_exits - 1)
            outputs.append(out)
        return outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | torch.Tensor:
        if self.training:
            return tuple(self.forward_exits(x))
        if self.thresholds is not None:
            return self.predict_early_exit(x, self.thresholds).logits
        return self.forward_exits(x)[-1]

    def check_thresholds(self, thresholds: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Thresholds as a float tensor of one value per exit but the last; a clear error otherwise."""
        values = torch.as_tensor(thresholds, dtype=torch.float32).flatten().cpu()
        if values.numel() != self.num_exits - 1:
            raise ValueError(
                f"DVT takes {self.num_exits - 1} thresholds, the confidence at which exits 1 and 2 answer "
                f"(the last exit always answers); got {values.numel()}: {values.tolist()}"
            )
        if torch.isnan(values).any():
            raise ValueError(f"thresholds must be numbers, got {values.tolist()}")
        return values

    @torch.no_grad()
    def predict_early_exit(self, x: torch.Tensor, thresholds: Sequence[float] | torch.Tensor) -> EarlyExit:
        """Logits and exit index of each image, really exiting early.

        The batch runs exit 1; images whose top softmax probability reaches ``thresholds[0]`` answer
        there, and only the others (gathered, with the features and logits they reuse) run exit 2,
        and so on; the last exit answers for every image left. Runs in eval mode.

        Args:
            x: Images (B, C, H, W).
            thresholds: Confidence thresholds of exits 1 and 2.
        """
        values = self.check_thresholds(thresholds).tolist()
        self.check_input(x)
        was_training = self.training
        self.eval()
        try:
            logits = x.new_empty(x.shape[0], self.num_classes)
            exit_index = torch.full((x.shape[0],), self.num_exits - 1, dtype=torch.long, device=x.device)
            active = torch.arange(x.shape[0], device=x.device)
            state = None
            for index in range(self.num_exits):
                last = index == self.num_exits - 1
                out, state = self.run_exit(index, x, state, need_state=not last)
                if last:
                    logits[active] = out.to(logits.dtype)
                    break
                leave = out.softmax(dim=-1).amax(dim=-1) >= values[index]
                logits[active[leave]] = out[leave].to(logits.dtype)
                exit_index[active[leave]] = index
                stay = (~leave).nonzero().squeeze(1)
                if stay.numel() == 0:
                    break
                if stay.numel() < leave.numel():
                    active, x, state = active[stay], x[stay], state.select(stay)
            return EarlyExit(logits, exit_index)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def predict_with_counts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode logits (at ``self.thresholds``, as ``forward``) and the tokens (B, exits·depth, 2) that
        entered every block's attention and MLP, exit by exit, coarsest first: ``tokens_per_exit[k]`` in exit
        k's blocks for every exit the image ran, 0 in those of the exits after the one it left at."""
        thresholds = self.thresholds if self.thresholds is not None else [math.inf] * (self.num_exits - 1)
        logits, exit_index = self.predict_early_exit(x, thresholds)
        ran = torch.arange(self.num_exits, device=x.device)[None] <= exit_index[:, None]
        tokens = torch.tensor(self.tokens_per_exit, device=x.device) * ran
        return logits, tokens.repeat_interleave(self.depth, dim=1)[..., None].expand(-1, -1, 2).contiguous()

    @torch.no_grad()
    def mean_exit_cost(self, images: Iterable[torch.Tensor]) -> tuple[float, float]:
        """Mean GFLOPs per image of ``images`` (batches) at ``self.thresholds``, each image at the cost of
        the exits it ran (:meth:`exit_gflops`), and the mean patch tokens of the exit it left at."""
        costs = torch.tensor(self.exit_gflops())
        tokens = torch.tensor(self.tokens_per_exit, dtype=torch.float64) - self.num_prefix_tokens
        thresholds = self.thresholds if self.thresholds is not None else [math.inf] * (self.num_exits - 1)
        device = next(self.parameters()).device
        gflops = patches = 0.0
        seen = 0
        for x in images:
            exit_index = self.predict_early_exit(x.to(device), thresholds).exit_index.cpu()
            gflops += costs[exit_index].sum().item()
            patches += tokens[exit_index].sum().item()
            seen += exit_index.numel()
        if seen == 0:
            raise ValueError("no images to measure the mean cost on")
        return gflops / seen, patches / seen

    @torch.no_grad()
    def leaving_shares(self, images: Iterable[torch.Tensor]) -> list[float]:
        """The share of the images of ``images`` (batches) that leave at each exit at ``self.thresholds``."""
        thresholds = self.thresholds if self.thresholds is not None else [math.inf] * (self.num_exits - 1)
        device = next(self.parameters()).device
        counts = torch.zeros(self.num_exits)
        for x in images:
            exit_index = self.predict_early_exit(x.to(device), thresholds).exit_index.cpu()
            counts += torch.bincount(exit_index, minlength=self.num_exits).float()
        if counts.sum() == 0:
            raise ValueError("no images to count the exits on")
        return (counts / counts.sum()).tolist()

    def token_schedule(self) -> None:
        """None: how many exits run, and so how many tokens, depends on the image."""
        return None

    # -- cost and thresholds ---------------------------------------------------------------------

    def exit_gflops(self) -> list[float]:
        """GFLOPs (fvcore) of one image that leaves at each exit: everything run up to it, reuse included.

        Cumulative, as the released checkpoints' ``flops`` are: leaving at exit 3 costs exits 1, 2 and 3.
        Cached; the confidence test between exits (a softmax) is not counted.
        """
        if self._exit_gflops is None:
            from dynvit.measure.flops import count_module_flops

            param = next(self.parameters())
            x = torch.randn(1, *self.input_size, device=param.device, dtype=param.dtype)
            was_training = self.training
            self.eval()
            try:
                self._exit_gflops = [count_module_flops(_ExitPrefix(self, k), x) / 1e9 for k in range(self.num_exits)]
            finally:
                self.train(was_training)
        return list(self._exit_gflops)

    @property
    def input_size(self) -> tuple[int, int, int]:
        """The (C, H, W) images the cascade takes."""
        embed = self.patch_embed
        return (getattr(embed, "in_chans", None) or embed.proj.in_channels, *embed.img_size)

    @torch.no_grad()
    def exit_confidences(self, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every exit's top softmax probability (exits, N) on the images of ``loader`` (batches of
        images or of (images, labels)), and whether its prediction is right (exits, N) when labels come."""
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        confidences, correct = [], []
        try:
            for batch in loader:
                if isinstance(batch, (tuple, list)):
                    images, labels = batch[0], (batch[1] if len(batch) > 1 else None)
                else:
                    images, labels = batch, None
                probs = torch.stack(self.forward_exits(images.to(device))).softmax(dim=-1)
                top, predicted = probs.max(dim=-1)
                confidences.append(top.float().cpu())
                if labels is not None:
                    correct.append(predicted.cpu() == labels.cpu()[None])
        finally:
            self.train(was_training)
        if not confidences:
            raise ValueError("the loader gave no images to choose thresholds on")
        return torch.cat(confidences, dim=1), (torch.cat(correct, dim=1) if correct else None)

    def expected_gflops(self, thresholds: Sequence[float] | torch.Tensor, loader: Iterable) -> float:
        """Mean GFLOPs per image of ``loader`` when exiting at ``thresholds``."""
        values = self.check_thresholds(thresholds)
        confidences, _ = self.exit_confidences(loader)
        return float(torch.tensor(self.exit_gflops())[exit_indices(confidences, values)].mean())

    def choose_thresholds(
        self, loader: Iterable, gflops: float, steps: int = 400, set_thresholds: bool = True
    ) -> ThresholdChoice:
        """Thresholds that spend at most ``gflops`` per image on ``loader``'s images, as DVT picks them.

        The official rule: exit k takes a share of the images proportional to q^k (k = 1, 2, 3); each
        exit's threshold is the confidence at which that share of the images still running leaves
        (:func:`find_thresholds`). q is searched over ``steps`` values from 0.01 to 100 (and the limit
        q → 0, everything at exit 1), keeping the most expensive choice within the budget. The result
        is stored as ``self.thresholds`` (and so in a Lightning checkpoint) unless ``set_thresholds`` is off.

        Args:
            loader: Held-out images, or (images, labels) batches.
            gflops: Budget: mean GFLOPs per image.
            steps: Values of q tried.
        """
        costs = self.exit_gflops()
        check_budget(gflops, costs)
        confidences, correct = self.exit_confidences(loader)
        choice = search_thresholds(confidences, costs, gflops, correct, steps)
        if set_thresholds:
            self.thresholds = choice.thresholds
        return choice

    def export_onnx(
        self, folder: str | Path, images: torch.Tensor | None = None, tolerance: float = 1e-4
    ) -> list[Path]:
        """Write each exit as an ONNX file (dynamic batch) and check the chain in onnxruntime.

        ``exit1.onnx`` takes ``images`` and gives ``logits``, ``out_tokens`` and ``out_attention_logits``
        (what the next exit reuses); ``exit2.onnx`` takes ``images``, ``tokens`` and ``attention_logits``
        (exit 1's two outputs) and gives the same three; ``exit3.onnx`` takes those inputs and gives ``logits``. The exit rule
        stays outside the graphs: run exit 1, keep the rows under the threshold, feed them on.

        Args:
            folder: Where the three files go (created).
            images: Example images to trace with and check on; by default four random ones.
            tolerance: Largest max |onnxruntime − eager| / max |eager| accepted for each exit's logits.
        Returns:
            The three paths.
        Raises:
            ValueError: onnxruntime disagrees with eager PyTorch beyond ``tolerance``.
        """
        from dynvit.deploy.onnx import onnx_session

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        x = torch.randn(4, *self.input_size) if images is None else images.float()
        self.check_input(x)
        self.eval()
        batch = torch.export.Dim("batch")
        paths, inputs, feeds = [], (x,), {"images": x}
        names = ["images"]
        with torch.no_grad():
            eager = self.forward_exits(x)
        for k in range(self.num_exits):
            last = k == self.num_exits - 1
            graph = _ExitGraph(self, k)
            outputs = ["logits"] if last else ["logits", "out_tokens", "out_attention_logits"]
            path = folder / f"exit{k + 1}.onnx"
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    graph,
                    inputs,
                    str(path),
                    dynamo=True,
                    input_names=names,
                    output_names=outputs,
                    dynamic_shapes={name: {0: batch} for name in names},
                    external_data=False,
                )
            results = onnx_session(path).run(outputs, {n: v.numpy() for n, v in feeds.items()})
            got = torch.from_numpy(results[0])
            error = ((got - eager[k]).abs().max() / eager[k].abs().max()).item()
            if error > tolerance:
                raise ValueError(f"exit {k + 1} in onnxruntime differs from eager PyTorch by {error:.2e} (relative)")
            paths.append(path)
            if not last:
                with torch.no_grad():
                    inputs = (x, *graph(*inputs)[1:])
                names = ["images", "tokens", "attention_logits"]
                feeds = {
                    "images": x,
                    "tokens": torch.from_numpy(results[1]),
                    "attention_logits": torch.from_numpy(results[2]),
                }
        return paths


def check_budget(gflops: float, costs: Sequence[float]) -> None:
    """A clear error for a budget no threshold can meet: below what exit 1 alone costs."""
    if not gflops >= costs[0]:
        raise ValueError(
            f"a budget of {gflops:g} GFLOPs is below exit 1's cost ({costs[0]:.4g} GFLOPs per image): "
            f"give at least that much (exits cost {', '.join(f'{c:.4g}' for c in costs)})"
        )


def search_thresholds(
    confidences: torch.Tensor,
    costs: Sequence[float],
    gflops: float,
    correct: torch.Tensor | None = None,
    steps: int = 400,
) -> ThresholdChoice:
    """The thresholds :meth:`DVT.choose_thresholds` picks, from every exit's confidences (exits, N),
    the GFLOPs of leaving at each exit, the budget, and optionally whether each exit is right (exits, N)."""
    check_budget(gflops, costs)
    cost_of = torch.tensor(costs)
    best: ThresholdChoice | None = None
    for q in [0.0, *torch.logspace(-2, 2, steps).tolist()]:
        thresholds = find_thresholds(confidences, exit_shares(q, len(costs)))
        chosen = exit_indices(confidences, thresholds)
        cost = float(cost_of[chosen].mean())
        if cost <= gflops and (best is None or cost > best.gflops):
            counts = torch.bincount(chosen, minlength=len(costs)).float()
            top1 = None
            if correct is not None:
                top1 = 100.0 * float(correct[chosen, torch.arange(chosen.numel())].float().mean())
            best = ThresholdChoice(thresholds, q, cost, (counts / chosen.numel()).tolist(), top1)
    return best


class _ExitGraph(nn.Module):
    """Exit ``index`` as a graph of tensors: images (and the previous exit's tokens and logits) in;
    logits (and this exit's tokens and logits, unless it is the last) out."""

    def __init__(self, dvt: DVT, index: int) -> None:
        super().__init__()
        self.dvt = dvt
        self.index = index

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor | None = None, attention_logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        last = self.index == self.dvt.num_exits - 1
        state = None if tokens is None else ExitState(tokens, attention_logits)
        x = images
        # The explicit attention also in the last exit: the exporter's decomposition of the fused kernel with
        # a float mask fails (torch 2.15).
        out, state = self.dvt.run_exit(self.index, x, state, need_state=True)
        return (out,) if last else (out, state.tokens, state.logits)


class ThresholdChoice(NamedTuple):
    """What :meth:`DVT.choose_thresholds` picked: the thresholds of exits 1 and 2, the q they came
    from, and on the held-out images the mean GFLOPs, the share leaving at each exit and the top-1 (%,
    None without labels)."""

    thresholds: torch.Tensor
    q: float
    gflops: float
    exit_shares: list[float]
    top1: float | None


class _ExitPrefix(nn.Module):
    """The cascade up to exit ``index``, for counting what leaving there costs."""

    def __init__(self, dvt: DVT, index: int) -> None:
        super().__init__()
        self.dvt = dvt
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = None
        for k in range(self.index + 1):
            out, state = self.dvt.run_exit(k, x, state, need_state=k < self.index)
        return out


def exit_shares(q: float, num_exits: int = 3) -> list[float]:
    """DVT's share of images per exit: proportional to q, q², q³ (q = 0: all at the first exit)."""
    if q == 0:
        return [1.0] + [0.0] * (num_exits - 1)
    weights = [q ** (k + 1) for k in range(num_exits)]
    return [w / sum(weights) for w in weights]


def find_thresholds(confidences: torch.Tensor, shares: Sequence[float]) -> torch.Tensor:
    """Thresholds that send ``shares`` of the images to each exit, the way the official code sets them.

    For each exit k but the last, in turn: among the images no earlier exit took, sorted by exit k's
    confidence (highest first), the threshold is the confidence of the ``floor(N · shares[k])``-th, so
    that many leave (more on ties); no image leaves (threshold ∞) when that count is 0 or more than remain.

    Args:
        confidences: Top softmax probability of each exit (exits, N).
        shares: Wanted share of the N images per exit.
    Returns:
        One threshold per exit but the last.
    """
    num_exits, n = confidences.shape
    remaining = torch.ones(n, dtype=torch.bool)
    thresholds = torch.full((num_exits - 1,), math.inf)
    for k in range(num_exits - 1):
        count = math.floor(n * shares[k])
        ranked = confidences[k][remaining].sort(descending=True).values
        if 0 < count <= ranked.numel():
            thresholds[k] = ranked[count - 1]
        remaining &= confidences[k] < thresholds[k]
    return thresholds


def exit_indices(confidences: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The exit each image leaves at (N,): the first whose confidence reaches its threshold, else the last."""
    num_exits, n = confidences.shape
    chosen = torch.full((n,), num_exits - 1, dtype=torch.long)
    for k in reversed(range(num_exits - 1)):
        chosen[confidences[k] >= thresholds[k]] = k
    return chosen


def save_exit_gallery(
    images: torch.Tensor, exit_index: torch.Tensor, path: str | Path, per_exit: int = 8, num_exits: int = 3
) -> Path:
    """A picture of example images grouped by the exit they left at: row k holds up to ``per_exit`` of
    the images exit k answered for (the "easy" ones on top), each scaled to its own min–max, blank cells
    where an exit took fewer.

    Args:
        images: The images (B, C, H, W), normalised or not.
        exit_index: Each image's exit (B,), as :meth:`DVT.predict_early_exit` gives it.
        path: The PNG to write (its folder is created).
    Returns:
        ``path``.
    """
    from torchvision.utils import save_image

    if exit_index.shape != images.shape[:1]:
        raise ValueError(f"exit_index needs one exit per image: {tuple(exit_index.shape)} for {images.shape[0]}")
    images = images.detach().float().cpu()
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    scaled = (images - low) / (high - low).clamp_min(1e-12)
    cells = torch.ones(num_exits, per_exit, *images.shape[1:])
    for k in range(num_exits):
        chosen = scaled[exit_index.cpu() == k][:per_exit]
        cells[k, : chosen.shape[0]] = chosen
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(cells.flatten(0, 1), path, nrow=per_exit, padding=2, pad_value=1.0)
    return path


# The released cascades: each exit's (patch size, padding) for DeiT, soft splits for T2T-ViT, and the
# intermediate grid sides for resampling to exits 2 and 3 (7 → 14 → 10, 10 → 20 → 14).
_T2T_COARSE = ((14, 8, 3), (3, 2, 1), (3, 2, 1))
_T2T_MIDDLE = ((11, 6, 5), (3, 2, 1), (3, 2, 1))
CASCADES: dict[str, dict] = {
    "deit_small_patch16_224": dict(patches=((32, 0), (23, 3), (16, 0)), upsample=(14, 20)),
    "t2t_vit_12": dict(soft_splits=(_T2T_COARSE, _T2T_MIDDLE, SOFT_SPLITS), upsample=(14, 20), backbone=T2T_12_ARGS),
    "t2t_vit_14": dict(soft_splits=(_T2T_COARSE, _T2T_MIDDLE, SOFT_SPLITS), upsample=(14, 20), backbone=T2T_14_ARGS),
}


def _vit_exit(model_name: str, img_size: int, patch: int, padding: int, **kwargs) -> nn.Module:
    """A timm ViT on the grid of ``patch``-px patches of an image padded by ``padding`` on each side.

    Built at the padded size (so timm sizes the grid and position embedding), then its patch
    convolution pads and its size check expects the unpadded image.
    """
    import timm

    model = timm.create_model(model_name, pretrained=False, img_size=img_size + 2 * padding, patch_size=patch, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"DVT builds its exits from a timm VisionTransformer; {model_name} is {type(model).__name__}")
    if padding:
        model.patch_embed.proj.padding = (padding, padding)
        model.patch_embed.img_size = (img_size, img_size)
    return model


def create_dvt(
    model_name: str,
    checkpoint: str | None = None,
    *,
    img_size: int | None = None,
    patches: Sequence[tuple[int, int]] | None = None,
    soft_splits: Sequence[Sequence[tuple[int, int, int]]] | None = None,
    upsample: Sequence[int] | None = None,
    feature_reuse: bool = True,
    relation_reuse: bool = True,
    reuse_hidden: int = 128,
    reuse_dim: int = 48,
    **kwargs,
) -> DVT:
    """A DVT cascade on ``model_name``: the released ones (``"deit_small_patch16_224"``, ``"t2t_vit_12"``,
    ``"t2t_vit_14"``, grids 7×7 → 10×10 → 14×14 at 224 px) or any timm ViT given ``patches``.

    Args:
        model_name: The backbone.
        checkpoint: Weights to load strictly (a released DVT ``.pth.tar``, whose ``model_state_dict``
            has keys ``less_less_token.*``, ``less_token.*``, ``normal_token.*``, or this toolkit's files).
        img_size: Input resolution (224 for the released cascades; the backbone's own otherwise).
        patches: Each exit's (patch size, padding) for a timm ViT, coarsest first.
        soft_splits: Each exit's T2T soft splits ((kernel, stride, padding) × 3) for T2T-ViT.
        upsample: Intermediate grid sides for exits 2 and 3 (see :class:`DVT`).
        feature_reuse, relation_reuse, reuse_hidden, reuse_dim: See :class:`DVT`.
        **kwargs: Passed to every backbone (``num_classes``, ``drop_path_rate``, ``in_chans``, widths).
    """
    spec = dict(CASCADES.get(model_name, {}))
    patches = patches if patches is not None else spec.get("patches")
    soft_splits = soft_splits if soft_splits is not None else spec.get("soft_splits")
    upsample = upsample if upsample is not None else spec.get("upsample")
    if "backbone" in spec:
        if patches is not None:
            raise ValueError(f"{model_name} is a T2T-ViT: its exits differ by soft_splits, not patches")
        size = 224 if img_size is None else img_size
        args = dict(spec["backbone"], **kwargs)
        exits = [T2TViT(img_size=size, soft_splits=splits, **args) for splits in soft_splits]
        import timm

        cfg = timm.models.get_pretrained_cfg(model_name).to_dict()
        for backbone in exits:
            backbone.pretrained_cfg = dict(cfg, input_size=(args.get("in_chans", 3), size, size))
    else:
        if patches is None:
            raise ValueError(
                f"{model_name!r} has no released DVT cascade ({', '.join(CASCADES)}); give each exit's "
                "(patch size, padding) as patches=((16, 0), (11, 1), (8, 0)), coarsest first"
            )
        if len(patches) != len(EXIT_NAMES):
            raise ValueError(f"patches gives each of the {len(EXIT_NAMES)} exits' (patch size, padding), got {patches}")
        if img_size is None:
            import timm

            img_size = timm.models.get_pretrained_cfg(model_name.split(".")[0]).input_size[-1]
        for patch, padding in patches:
            if patch > img_size + 2 * padding:
                raise ValueError(f"patch size {patch} (padding {padding}) does not fit img_size {img_size}")
        exits = [_vit_exit(model_name, img_size, patch, padding, **kwargs) for patch, padding in patches]
    model = DVT(exits, upsample, feature_reuse, relation_reuse, reuse_hidden, reuse_dim)
    if checkpoint is not None:
        from dynvit.models.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint)
    return model


__all__ = [
    "CASCADES",
    "DVT",
    "create_dvt",
    "EXIT_NAMES",
    "EarlyExit",
    "ExitState",
    "LogitAttention",
    "ReuseBlock",
    "resample_matrix",
]


# -- the method registry's record ------------------------------------------------------------------


def default_patches(img_size: int, grid: int) -> list[tuple[int, int]]:
    """Each exit's (patch size, padding) for a ViT on a ``grid``×``grid`` patch grid of ``img_size``-px images:
    the released cascades' grid ratios (7, 10, 14 of 14: a half, then 10/14 of the grid), each patch the
    smallest that covers the image in that many steps, padded evenly to fit (DeiT-S: 32; 23 padded by 3; 16)."""
    grids = (max(1, round(grid / 2)), round(grid * 10 / 14), grid)
    if len(set(grids)) != len(grids):
        raise ValueError(
            f"a {grid}x{grid} patch grid is too coarse for DVT's three ever finer grids (would be {grids}): use a ViT "
            "with at least 4x4 patches, or give patches=((patch, padding), ...) for each exit"
        )
    patches = []
    for side in grids:
        patch = -(-img_size // side)
        patches.append((patch, -(-(patch * side - img_size) // 2)))
    return patches


def _exit_from_vit(vit: VisionTransformer, patch: int, padding: int) -> VisionTransformer:
    """A copy of ``vit`` on the grid of ``patch``-px patches of its images padded by ``padding``: the patch
    embedding resampled to the new patch size (timm's ``resample_patch_embed``, via ``set_input_size``) and the
    position embedding to the new grid (``resample_abs_pos_embed``); everything else the teacher's."""
    img_size = vit.patch_embed.img_size[0]
    backbone = copy.deepcopy(vit)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm logs each resampling
        backbone.set_input_size(img_size=(img_size + 2 * padding,) * 2, patch_size=(patch, patch))
    if padding:
        # As _vit_exit: the convolution pads, and the size check expects the unpadded image.
        backbone.patch_embed.proj.padding = (padding, padding)
        backbone.patch_embed.img_size = (img_size, img_size)
    return backbone


def _keep_teacher_mlps(dvt: DVT, teachers: Sequence[VisionTransformer]) -> None:
    """Start exits 2 and 3's widened MLPs from the teacher's: its weights on the ViT's own channels, the reused
    channels' norm at identity and their fc1 columns at zero, so only the reuse modules start fresh."""
    dim = dvt.embed_dim
    with torch.no_grad():
        for backbone, teacher in zip(dvt.exits[1:], teachers[1:], strict=True):
            for block, source in zip(backbone.blocks, teacher, strict=True):
                norm, mlp = source
                block.norm2.weight[:dim].copy_(norm.weight)
                block.norm2.bias[:dim].copy_(norm.bias)
                block.mlp.fc1.weight.zero_()
                block.mlp.fc1.weight[:, :dim].copy_(mlp.fc1.weight)
                block.mlp.fc1.bias.copy_(mlp.fc1.bias)
                block.mlp.fc2.load_state_dict(mlp.fc2.state_dict())


def check_buildable(vit: nn.Module) -> None:
    """``TypeError`` saying why DVT cannot build its cascade from ``vit`` (the registry's ``accepts``): it needs a
    timm ViT with a class token, square images and a patch embedding that is one convolution to resample."""
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"DVT builds its cascade from a timm VisionTransformer, got {type(vit).__name__}")
    if vit.cls_token is None or vit.global_pool != "token":
        free = sorted(m.name for m in _methods.registered().values() if not m.needs_class_token and not m.learned)
        raise TypeError(
            "DVT reuses the class token's attention row and column and reads its exits from the class token, and "
            f"this ViT has no class token (global_pool={vit.global_pool!r}): use {' or '.join(free)}, which need none"
        )
    if vit.num_prefix_tokens != 1:
        raise TypeError(
            "DVT resamples the patch tokens' attention relations between exits behind exactly one prefix token, the "
            f"class token; this ViT has {vit.num_prefix_tokens} (distillation or register tokens): use a ViT with "
            "a class token only"
        )
    embed = vit.patch_embed
    # timm's PatchEmbed is what set_input_size resamples; a stem of its own (LV-ViT's ConvStemEmbed) may also end
    # in a `proj` convolution, but that alone is not the patch embedding, and the stem cannot be resampled.
    if not isinstance(embed, PatchEmbed) or not isinstance(embed.proj, nn.Conv2d):
        stem = embed.proj if isinstance(embed, PatchEmbed) else embed
        raise TypeError(
            "DVT builds its coarser exits by resampling the patch embedding, which must be timm's PatchEmbed with one "
            f"convolution; this ViT's is a {type(stem).__name__} (a convolutional stem): build a cascade of its own "
            "with dynvit.create_dvt instead"
        )
    img_size = vit.patch_embed.img_size
    if img_size[0] != img_size[1]:
        raise TypeError(f"DVT needs square images, this ViT takes {tuple(img_size)}")


def build_dvt(
    vit: nn.Module,
    threshold: float | None = None,
    *,
    patches: Sequence[tuple[int, int]] | None = None,
    upsample: Sequence[int] | None = None,
    feature_reuse: bool = True,
    relation_reuse: bool = True,
    reuse_hidden: int = 128,
    reuse_dim: int = 48,
) -> DVT:
    """A DVT cascade fine-tuned from one pretrained ViT (the registry's ``build``), or ``vit``'s threshold set.

    Every exit starts from the teacher's weights: its patch embedding resampled to the exit's patch size, its
    position embedding to the exit's grid, exits 2 and 3's widened MLPs from the teacher's MLPs; the reuse
    modules are at init. The last exit is ``vit`` itself (converted in place); the other two are copies.

    Args:
        vit: A plain timm ViT with a class token on a square patch grid; or a DVT, whose threshold is set.
        threshold: Confidence at which exits 1 and 2 both answer (the registry's knob); None: no early exit
            (all exits run). :meth:`DVT.choose_thresholds` instead picks one per exit for a GFLOPs budget.
        patches: Each exit's (patch size, padding), coarsest first; by default :func:`default_patches`
            (the released DeiT-S cascade on DeiT-S).
        upsample, feature_reuse, relation_reuse, reuse_hidden, reuse_dim: See :class:`DVT`.
    """
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 < threshold <= 1.0
    ):
        raise ValueError(f"threshold is a confidence in (0, 1] or None (no early exit), got {threshold!r}")
    if isinstance(vit, DVT):
        vit.thresholds = None if threshold is None else vit.check_thresholds([threshold] * (vit.num_exits - 1))
        return vit
    check_buildable(vit)
    img_size = vit.patch_embed.img_size
    grid = square_side(vit.patch_embed.num_patches, "the ViT")
    patches = default_patches(img_size[0], grid) if patches is None else [tuple(p) for p in patches]
    if len(patches) != len(EXIT_NAMES):
        raise ValueError(f"patches gives each of the {len(EXIT_NAMES)} exits' (patch size, padding), got {patches}")
    own_patch = vit.patch_embed.patch_size[0]
    exits = [
        vit if (patch, padding) == (own_patch, 0) else _exit_from_vit(vit, patch, padding) for patch, padding in patches
    ]
    # The teacher's norms and MLPs, before feature reuse replaces them by widened ones.
    teachers = [[(b.norm2, b.mlp) for b in backbone.blocks] for backbone in exits]
    model = DVT(exits, upsample, feature_reuse, relation_reuse, reuse_hidden, reuse_dim)
    if feature_reuse:
        _keep_teacher_mlps(model, teachers)
    return build_dvt(model, threshold)


# Registered after the reducers (which register after DynamicViT) whichever module is imported first, so the
# registry's order, README's table, does not depend on import order.
importlib.import_module("dynvit.reducers")

_methods.register(
    _methods.Method(
        name="dvt",
        summary="a cascade of 3 ViTs on 7×7 → 10×10 → 14×14 grids reusing features and attention; each image leaves "
        "at the first exit confident enough (DVT)",
        learned=True,
        build=build_dvt,
        knob=_methods.Knob("threshold", 0.0, 1.0, cheaper="lower", short="T"),
        cost="images",
        wraps=True,
        reports=frozenset({"counts", "exits"}),
        needs_class_token=True,
        onnx="its exit rule sends each image on or out by its confidence, outside any one graph: export the exits "
        "with DVT.export_onnx(folder), one ONNX file each, and apply the thresholds between them",
        reference="blackfeather-wang/Dynamic-Vision-Transformer models_deit.py",
        objective="dvt",  # DVTModule: the exits' losses summed, each optionally distilled from the teacher
        released={"grids 7/10/14, all exits": {"patches": ((32, 0), (23, 3), (16, 0)), "upsample": (14, 20)}},
        accepts=check_buildable,
    )
)
