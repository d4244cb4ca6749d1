"""DynamicViT: a timm ``VisionTransformer`` that learns to drop patch tokens (Rao et al., 2021).

Training keeps every token and masks dropped ones inside attention (shapes fixed, decisions
sampled with straight-through Gumbel-softmax). Evaluation ranks tokens by their keep log-odds and
gathers the top ``int(N * keep_ratio ** s)`` at stage ``s``, so later blocks really run on fewer
tokens. The keep decision itself is made in :class:`~dynvit.models.predictor.KeepPredictor`.

Prefix tokens (class, distillation and register tokens) are never scored and always kept. Heads
that pool the patch tokens see only the kept ones: in training through the keep mask (an average
weighted by it, or an attention pool whose keys it masks), in eval because only they are left.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent, trunc_normal_
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from dynvit.models.masked_attention import make_block_maskable, make_pool_maskable
from dynvit.models.predictor import KeepPredictor
from dynvit.models.tokens import embed_tokens, gather_tokens, index_to_mask, top_indices, validate_loc, weighted_mean


class StudentOutput(NamedTuple):
    """What a student returns in training mode.

    Attributes:
        logits: Class logits (B, num_classes); a distilled DeiT's class-token head.
        tokens: Patch tokens after the final norm (B, N, C), for token distillation.
        mask: Keep mask after the last stage (B, N), detached: which final tokens to distil.
        decisions: Keep decisions of every stage, each (B, N), differentiable (for the ratio loss).
        dist_logits: A distilled DeiT's distillation-token head (B, num_classes); None for other models.
    """

    logits: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    decisions: list[torch.Tensor]
    dist_logits: torch.Tensor | None = None


def keep_counts(num_patches: int, keep_ratio: float, num_stages: int) -> list[int]:
    """Patch tokens kept at each stage: ``int(N * keep_ratio ** s)``, relative to the original N.

    The float expression is the reference one on purpose (``int`` truncates, ``ρ**s`` is a float
    power), so released checkpoints see the token counts they were trained and reported with.
    """
    return [int(num_patches * keep_ratio ** (s + 1)) for s in range(num_stages)]


def validate_pruning(keep_ratio: float, pruning_loc: Sequence[int], depth: int, num_patches: int) -> None:
    """Raise ``ValueError`` naming the fix when a pruning setup cannot work on this backbone."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    locs = validate_loc(pruning_loc, depth)
    counts = keep_counts(num_patches, keep_ratio, len(locs))
    if counts[-1] < 1:
        raise ValueError(
            f"keep_ratio {keep_ratio} keeps {counts[-1]} of {num_patches} patch tokens at stage "
            f"{len(locs)}: raise keep_ratio or use fewer pruning locations"
        )


def init_predictor(module: nn.Module) -> None:
    """The ViT initialisation the reference applies to its predictors too."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """The (C, H, W) image a model was built for: a ViT's patch embedding says; a CNN, whose layers
    fit any size, carries it in its timm ``pretrained_cfg`` (the factory records ``img_size`` there)."""
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        cfg = getattr(model, "pretrained_cfg", None)
        if not isinstance(cfg, dict) or "input_size" not in cfg:
            raise TypeError(
                f"cannot tell what images a {type(model).__name__} takes: it has neither a patch embedding nor "
                "timm's pretrained_cfg['input_size']; build it with timm or dynvit (create_teacher, create_student)"
            )
        chans, *size = cfg["input_size"]
        return (getattr(model, "in_chans", chans), *size)
    chans = getattr(embed, "in_chans", None) or embed.proj.in_channels
    return (chans, *embed.img_size)


def final_patch_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patch tokens token distillation compares, from a model's final tokens x (B, P + N, C).

    These are the patch tokens after the network's last norm. Models that normalise after pooling
    (``fc_norm``, e.g. ``global_pool='avg'`` ViTs, whose ``norm`` is then the identity) get that
    norm applied per token, so every family distils normalised features, as the reference does.
    """
    tokens = x[:, model.num_prefix_tokens :]
    fc_norm = getattr(model, "fc_norm", None)
    return tokens if fc_norm is None or isinstance(fc_norm, nn.Identity) else fc_norm(tokens)


class TokenPruning(nn.Module):
    """DynamicViT on any ViT-like backbone: the stage loop over ``self.blocks`` and the forwards.

    A backbone class ``B`` gets its student as ``class DynamicB(TokenPruning, B)``. The backbone
    provides ``embed(x)`` (image → tokens, prefix tokens first), ``blocks`` (timm ``Block``s, made
    maskable here), ``norm``, ``forward_head``, ``num_prefix_tokens``, ``embed_dim`` and
    ``patch_embed.num_patches``; :meth:`from_vit` converts a built backbone in place.
    """

    blocks: nn.Sequential
    num_prefix_tokens: int
    score_predictor: nn.ModuleList
    # The registry name (dynvit.methods) and how reports label its rows: the method, whatever the backbone.
    method = "dynamicvit"
    # Parameter-name prefixes of what pruning adds: trained at the full learning rate, absent from teachers.
    new_param_prefixes: tuple[str, ...] = ("score_predictor.",)

    @classmethod
    def check_convertible(cls, model: nn.Module) -> None:
        """Raise ``TypeError`` naming the fix unless ``model`` is a backbone this class can convert."""
        raise NotImplementedError

    @classmethod
    def from_vit(cls, vit: nn.Module, keep_ratio: float = 0.7, pruning_loc: Sequence[int] = (3, 6, 9)) -> TokenPruning:
        """Turn a built backbone into its DynamicViT student in place (weights kept) and return it."""
        cls.check_convertible(vit)
        validate_pruning(keep_ratio, pruning_loc, len(vit.blocks), vit.patch_embed.num_patches)
        for block in vit.blocks:
            make_block_maskable(block)
        vit.__class__ = cls
        vit.init_pruning(vit.embed_dim, vit.patch_embed.num_patches, keep_ratio, pruning_loc)
        return vit.to(next(vit.parameters()).device)

    def init_pruning(self, embed_dim: int, num_patches: int, keep_ratio: float, pruning_loc: Sequence[int]) -> None:
        validate_pruning(keep_ratio, pruning_loc, len(self.blocks), num_patches)
        self.num_patches = num_patches
        self.pruning_loc = tuple(pruning_loc)
        self._keep_ratio = float(keep_ratio)
        self.score_predictor = nn.ModuleList([KeepPredictor(embed_dim) for _ in self.pruning_loc])
        init_predictor(self.score_predictor)

    def start_predictors_at_target(self) -> None:
        """Start every stage keeping each token with probability ρ, so the kept shares begin on the
        targets ρ, ρ², … instead of at 1/2, 1/4, … (the reference's zero init).

        From the even start every stage begins below its target, so the ratio loss and the class
        loss both push towards keeping more; on short schedules that push can carry a predictor to
        "keep everything", where the Gumbel gradient vanishes and the stage stops choosing (on the
        digits at ρ = 0.9, in 2 of 2 seeds).
        """
        for predictor in self.score_predictor:
            predictor.start_at(self._keep_ratio)

    @property
    def keep_ratio(self) -> float:
        """Base keep ratio ρ; stage s keeps ``int(N * ρ**s)`` tokens. Settable to evaluate another ρ."""
        return self._keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        validate_pruning(value, self.pruning_loc, len(self.blocks), self.num_patches)
        self._keep_ratio = float(value)

    @property
    def stage_keep_ratios(self) -> list[float]:
        """Targets of the ratio loss: ρ, ρ², ρ³, …"""
        return [self._keep_ratio ** (s + 1) for s in range(len(self.pruning_loc))]

    @property
    def stage_keep_counts(self) -> list[int]:
        return keep_counts(self.num_patches, self._keep_ratio, len(self.pruning_loc))

    def run_blocks(self, x: torch.Tensor, track: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Masked (training) or gathered (eval) pass through the blocks.

        Returns the tokens and, per stage, the keep mask (B, N) in training or the kept original
        patch indices (B, K_s) in eval; with ``track=False`` eval skips the indices (an empty list).
        """
        return self._run_masked(x) if self.training else self._run_gathered(x, track)

    def _run_masked(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        B, p = x.shape[0], self.num_prefix_tokens
        prefix = x.new_ones(B, p)
        decision = x.new_ones(B, x.shape[1] - p)
        keep, decisions, stage = None, [], 0
        for i, block in enumerate(self.blocks):
            if stage < len(self.pruning_loc) and i == self.pruning_loc[stage]:
                scores = self.score_predictor[stage](x[:, p:], decision.unsqueeze(-1))
                # Hard 0/1 forward, soft gradient: the straight-through estimator of the paper.
                decision = F.gumbel_softmax(scores, hard=True)[..., 0] * decision
                decisions.append(decision)
                keep = torch.cat([prefix, decision], dim=1)
                stage += 1
            x = block(x) if keep is None else block(x, keep=keep)
        return x, decisions

    def _run_gathered(self, x: torch.Tensor, track: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        B, p = x.shape[0], self.num_prefix_tokens
        # Where the prefix tokens are: the head of every stage's gather index, so one gather keeps them too.
        prefix = torch.arange(p, device=x.device).expand(B, -1)
        patch_index = torch.arange(x.shape[1] - p, device=x.device).expand(B, -1) if track else None
        kept, stage = [], 0
        for i, block in enumerate(self.blocks):
            if stage < len(self.pruning_loc) and i == self.pruning_loc[stage]:
                # After a gather every remaining token is kept, so the context is a plain mean.
                keep_odds = self.score_predictor[stage].keep_log_odds(x, p)
                top = top_indices(keep_odds, self.stage_keep_counts[stage])
                x = gather_tokens(x, torch.cat([prefix, top + p], dim=1))
                if track:
                    patch_index = torch.gather(patch_index, 1, top)
                    kept.append(patch_index)
                stage += 1
            x = block(x)
        return x, kept

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm; in eval only the kept ones remain."""
        x, _ = self.run_blocks(self.embed(x), track=False)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> StudentOutput | torch.Tensor:
        if not self.training:
            return self.forward_head(self.forward_features(x))
        x, decisions = self.run_blocks(self.embed(x))
        return self.train_output(self.norm(x), decisions)

    def train_output(self, x: torch.Tensor, decisions: list[torch.Tensor]) -> StudentOutput:
        """Training result from the final normed tokens; a backbone with another head overrides it."""
        return StudentOutput(
            logits=self.forward_head(x),
            tokens=final_patch_tokens(self, x),
            mask=decisions[-1].detach(),
            decisions=decisions,
        )

    @torch.no_grad()
    def predict_with_masks(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits of the pruned (top-k) forward plus, per stage, the boolean keep mask (B, N) over the patch grid.

        Always takes the inference path; dropout and drop-path follow the module's mode, so call it in
        ``eval()`` mode for inference numbers.
        """
        x, kept = self._run_gathered(self.embed(x))
        return self.forward_head(self.norm(x)), self.kept_masks(kept)

    def token_schedule(self) -> list[tuple[int, int]]:
        """Tokens (prefix tokens included) in attention and MLP of each block at inference: the stage
        gathers come before their block, so both halves of a block see the same count."""
        counts, n = [], self.num_patches
        stage_counts = dict(zip(self.pruning_loc, self.stage_keep_counts, strict=True))
        for i in range(len(self.blocks)):
            n = stage_counts.get(i, n)
            counts.append((n + self.num_prefix_tokens,) * 2)
        return counts

    def predict_with_counts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the pruned forward plus the token counts (B, depth, 2) in every block's attention and MLP."""
        logits, _ = self.predict_with_masks(x)
        counts = torch.tensor(self.token_schedule(), device=logits.device)
        return logits, counts.expand(logits.shape[0], -1, -1)

    def kept_masks(self, kept: list[torch.Tensor]) -> list[torch.Tensor]:
        """Turn per-stage kept indices into boolean masks (B, N) over the original patch grid."""
        return [index_to_mask(index, self.num_patches) for index in kept]


class DynamicViT(TokenPruning, VisionTransformer):
    """A timm ``VisionTransformer`` with DynamicViT keep predictors before ``pruning_loc`` blocks.

    Build one with :func:`dynvit.create_student` or convert an existing timm ViT (pretrained or not)
    in place with :meth:`from_vit`. ``train()`` mode returns a :class:`StudentOutput`; ``eval()``
    mode returns logits from the pruned forward. Class-token, average-pooling (with or without
    ``fc_norm``) and attention-pooling (``'map'``) heads are supported (see :func:`check_prunable`);
    a distilled DeiT converts to :class:`DynamicViTDistilled`.
    """

    @classmethod
    def check_convertible(cls, model: nn.Module) -> None:
        check_prunable(model)
        if isinstance(model, VisionTransformerDistilled) and not issubclass(cls, VisionTransformerDistilled):
            raise TypeError(
                "a distilled DeiT (VisionTransformerDistilled) has two heads: convert it with "
                "DynamicViTDistilled.from_vit (dynvit.create_student picks it)"
            )

    @classmethod
    def from_vit(cls, vit: nn.Module, keep_ratio: float = 0.7, pruning_loc: Sequence[int] = (3, 6, 9)) -> DynamicViT:
        student = super().from_vit(vit, keep_ratio, pruning_loc)
        if student.attn_pool is not None:
            make_pool_maskable(student.attn_pool)
        return student

    def check_input(self, x: torch.Tensor) -> None:
        expected = input_size(self)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit this model: it expects (B, {expected[0]}, "
                f"{expected[1]}, {expected[2]}) images; resize the data or build the model with "
                f"img_size={tuple(x.shape[-2:])}"
            )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, prefix tokens and position embedding: the tokens the blocks see."""
        self.check_input(x)
        return embed_tokens(self, x)

    def train_output(self, x: torch.Tensor, decisions: list[torch.Tensor]) -> StudentOutput:
        prefix = decisions[-1].new_ones(x.shape[0], self.num_prefix_tokens)
        keep = torch.cat([prefix, decisions[-1]], dim=1)
        return StudentOutput(
            logits=self.head(self.head_drop(self.fc_norm(self.pool_kept(x, keep)))),
            tokens=final_patch_tokens(self, x),
            mask=decisions[-1].detach(),
            decisions=decisions,
        )

    def pool_kept(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """timm's ``pool`` over the kept tokens only, for training, where every token is still there.

        Args:
            x: Final tokens (B, P + N, C), prefix first.
            keep: Keep mask (B, P + N), 1 on the prefix, differentiable on the patches.
        Returns:
            The pooled feature (B, C): the class token; for ``'avg'`` the mean over kept tokens written as
            a keep-weighted mean (so the decisions get a gradient); for ``'map'`` the attention pool with
            its keys masked by ``keep``.
        """
        if self.attn_pool is None and self.global_pool == "token":
            return self.pool(x)
        if not getattr(self, "pool_include_prefix", False):
            x, keep = x[:, self.num_prefix_tokens :], keep[:, self.num_prefix_tokens :]
        if self.attn_pool is not None:
            return self.attn_pool(x, keep=keep)
        # The floor keeps a stage that dropped every patch finite (the mean of nothing is 0 here).
        return weighted_mean(x, keep, min_total=1e-6)


class DynamicViTDistilled(DynamicViT, VisionTransformerDistilled):
    """DynamicViT on a distilled DeiT (timm's ``VisionTransformerDistilled``): class and distillation
    tokens are both prefix tokens, kept at every stage.

    ``eval()`` predicts as timm does, the mean of the class and distillation heads. ``train()`` returns
    the class head's logits as ``logits`` (what the DynamicViT objective trains with the labels and
    distils from the teacher) and the distillation head's as ``dist_logits``, which the objective
    distils from the teacher's prediction only, as DeiT trains its distillation token.
    """

    @classmethod
    def check_convertible(cls, model: nn.Module) -> None:
        if not isinstance(model, VisionTransformerDistilled):
            raise TypeError(f"DynamicViTDistilled converts a distilled DeiT, got {type(model).__name__}")
        check_prunable(model)

    def train_output(self, x: torch.Tensor, decisions: list[torch.Tensor]) -> StudentOutput:
        return StudentOutput(
            logits=self.head(self.head_drop(x[:, 0])),
            tokens=final_patch_tokens(self, x),
            mask=decisions[-1].detach(),
            decisions=decisions,
            dist_logits=self.head_dist(self.head_drop(x[:, 1])),
        )


def student_class(model: nn.Module) -> type[TokenPruning]:
    """The DynamicViT class that converts ``model``: a backbone's own ``dynamic_class`` (LV-ViT,
    T2T-ViT), :class:`DynamicViTDistilled` for a distilled DeiT, else :class:`DynamicViT`."""
    own = getattr(type(model), "dynamic_class", None)
    if own is not None:
        return own
    return DynamicViTDistilled if isinstance(model, VisionTransformerDistilled) else DynamicViT


SUPPORTED = (
    "token pruning supports timm VisionTransformer models (and distilled DeiT) built from timm's Block and "
    "Attention, whose head reads the class token (global_pool='token'), averages the patch tokens "
    "(global_pool='avg', with or without fc_norm) or pools them by attention (global_pool='map'); class, "
    "distillation and register tokens are kept as prefix tokens"
)


def check_prunable(model: nn.Module) -> None:
    """Raise ``TypeError`` naming what is supported unless DynamicViT can prune ``model``."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"{type(model).__name__} is not a timm VisionTransformer (e.g. deit_small_patch16_224, "
            f"vit_base_patch16_siglip_224); {SUPPORTED}"
        )
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(getattr(block, "attn", None)) is not Attention:
            attn = type(getattr(block, "attn", None)).__name__
            raise TypeError(
                f"block {i} of this ViT is {type(block).__name__}/{attn}, not timm's Block/Attention whose "
                f"attention DynamicViT masks; {SUPPORTED}"
            )
    pool = model.attn_pool
    if model.global_pool not in ("token", "avg", "map") or (
        pool is not None and (type(pool) is not AttentionPoolLatent or pool.pos_embed is not None)
    ):
        # An attention pool with a position embedding of its own would need every token in place.
        raise TypeError(
            f"this ViT's head uses global_pool={model.global_pool!r} with "
            f"{type(pool).__name__ if pool is not None else 'no attention pool'}; {SUPPORTED}"
        )
    if getattr(model, "dynamic_img_size", False):
        raise TypeError("token pruning keeps a fixed token count per stage: build the ViT with dynamic_img_size=False")
    if not isinstance(model.patch_drop, nn.Identity):
        raise TypeError("token pruning decides which tokens to drop itself: build the ViT with patch_drop_rate=0")
