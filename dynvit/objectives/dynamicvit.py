"""The DynamicViT objective: classification + keep-ratio + logit and token distillation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dynvit.models.dynamic_vit import StudentOutput


class LossTerms(NamedTuple):
    """The weighted total and each unweighted term, so every term can be logged on its own.

    ``dist_head`` is the KL of a distilled DeiT's distillation head to the teacher, None for other models.
    """

    total: torch.Tensor
    cls: torch.Tensor
    ratio: torch.Tensor
    distill: torch.Tensor
    token: torch.Tensor
    dist_head: torch.Tensor | None = None


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy for class indices, or soft-target cross-entropy for mixup/cutmix targets (B, C)."""
    if targets.ndim == logits.ndim:
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def keep_ratio_loss(decisions: Sequence[torch.Tensor], targets: Sequence[float]) -> torch.Tensor:
    """``mean_s mean_b (mean_n decision_s - ρ^s)²``: pulls each stage's kept share to its target."""
    terms = [((d.mean(dim=1) - t) ** 2).mean() for d, t in zip(decisions, targets, strict=True)]
    return torch.stack(terms).mean()


def logit_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(student ‖ teacher) on log-softmaxes, batch mean, as the reference."""
    return F.kl_div(
        F.log_softmax(student_logits, dim=-1),
        F.log_softmax(teacher_logits, dim=-1),
        reduction="batchmean",
        log_target=True,
    )


def token_distillation_loss(
    student_tokens: torch.Tensor,
    teacher_tokens: torch.Tensor,
    keep_mask: torch.Tensor,
    mode: Literal["mse", "kl"] = "mse",
) -> torch.Tensor:
    """Distil the final tokens the student kept: MSE of features (ViT) or KL of dense predictions (LV-ViT).

    Averaged over kept tokens only (and channels for MSE); 0 when nothing was kept. Written as a
    masked sum rather than boolean indexing so a training step never waits on the GPU.

    Args:
        student_tokens, teacher_tokens: (B, N, C) final patch tokens or dense class predictions.
        keep_mask: (B, N) keep mask after the last stage; only kept tokens are compared.
    """
    kept = (keep_mask > 0.5).to(student_tokens.dtype).unsqueeze(-1)
    teacher_tokens = teacher_tokens.to(student_tokens.dtype)
    if mode == "mse":
        per_token = (student_tokens - teacher_tokens).pow(2)
        count = kept.sum() * student_tokens.shape[-1]
    else:
        per_token = F.kl_div(
            F.log_softmax(student_tokens, dim=-1),
            F.log_softmax(teacher_tokens, dim=-1),
            reduction="none",
            log_target=True,
        )
        count = kept.sum()
    return (per_token * kept).sum() / count.clamp_min(1)


class DynamicViTLoss(nn.Module):
    """``CE + ratio_weight·ratio + distill_weight·KL(logits) + token_weight·token`` (docs/reference.md).

    A distilled DeiT student (``out.dist_logits`` set) adds ``distill_weight·KL(dist_logits ‖ teacher)``:
    its distillation head learns from the teacher's prediction only, as DeiT trains that token, while
    CE and the logit KL act on the class head as in the reference.

    Args:
        ratio_weight: Weight of the keep-ratio MSE (2.0 in the reference).
        distill_weight: Weight of the logit KL to the teacher (0.5).
        token_weight: Weight of the token distillation (0.5); 0 switches it off.
        label_smoothing: For hard targets; mixup/cutmix targets arrive already smoothed.
    """

    def __init__(
        self,
        ratio_weight: float = 2.0,
        distill_weight: float = 0.5,
        token_weight: float = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.ratio_weight = ratio_weight
        self.distill_weight = distill_weight
        self.token_weight = token_weight
        self.label_smoothing = label_smoothing

    def forward(
        self,
        out: StudentOutput,
        targets: torch.Tensor,
        keep_targets: Sequence[float],
        teacher_logits: torch.Tensor,
        teacher_tokens: torch.Tensor,
        token_mode: Literal["mse", "kl"] = "mse",
    ) -> LossTerms:
        cls = classification_loss(out.logits, targets, self.label_smoothing)
        ratio = keep_ratio_loss(out.decisions, keep_targets)
        distill = logit_distillation_loss(out.logits, teacher_logits)
        token = (
            token_distillation_loss(out.tokens, teacher_tokens, out.mask, token_mode)
            if self.token_weight
            else cls.new_zeros(())
        )
        total = cls + self.ratio_weight * ratio + self.distill_weight * distill + self.token_weight * token
        dist_head = None
        if out.dist_logits is not None:
            dist_head = logit_distillation_loss(out.dist_logits, teacher_logits)
            total = total + self.distill_weight * dist_head
        return LossTerms(total, cls, ratio, distill, token, dist_head)
