"""DynamicViT training: a pruned student distilled from its frozen, unpruned teacher (ViTs, and the
hierarchical students of the journal version)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torchmetrics import MeanMetric

from dynvit.lightning.base import ImageClassification, model_build_args
from dynvit.measure.recall import stage_recall
from dynvit.models import create_student, create_teacher, forward_with_tokens, load_checkpoint, load_weights
from dynvit.models.checkpoint import CheckpointMismatch, file_sha256
from dynvit.models.contract import DenseDistilling
from dynvit.models.masked_attention import set_keep_gradient
from dynvit.objectives.spatial_pruning import pruning_objective

_TEACHER = "teacher."


class FrozenTeacherModule(ImageClassification):
    """A module that trains ``self.net`` beside a frozen teacher ``self.teacher`` (built in the subclass;
    None where the teacher is optional, as for a DVT cascade trained from scratch).

    The teacher stays in eval mode, gets no gradients, is not in the optimiser and is not written into
    checkpoints: it is rebuilt from ``teacher_checkpoint``/``pretrained`` on load, and every checkpoint
    records where its weights came from (``self.teacher_record``, see :func:`teacher_record`).
    """

    teacher: nn.Module | None
    teacher_record: dict[str, str | None]

    def frozen_networks(self) -> list[nn.Module]:
        return [] if self.teacher is None else [self.teacher]

    def train(self, mode: bool = True) -> FrozenTeacherModule:
        # Lightning flips the whole module to train mode each epoch; the teacher must stay in eval
        # (no dropout, no drop-path) to be the fixed target the method distils from.
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # The teacher is rebuilt from its own checkpoint; storing it in every student checkpoint would
    # double their size for nothing.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        sd = checkpoint["state_dict"]
        for key in [k for k in sd if k.startswith(_TEACHER)]:
            del sd[key]
        checkpoint.setdefault("dynvit", {})["teacher"] = dict(self.teacher_record)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.teacher is not None:
            checkpoint["state_dict"].update({_TEACHER + k: v for k, v in self.teacher.state_dict().items()})


class DynamicViTModule(FrozenTeacherModule):
    """The DynamicViT student plus a frozen teacher; the student starts from the teacher's weights.

    The teacher stays in eval mode, gets no gradients, is not in the optimiser and is not written
    into checkpoints (it is rebuilt from ``teacher_checkpoint``/``pretrained`` on load). The student
    is whatever :func:`~dynvit.models.create_student` builds for ``model_name``, and the objective
    follows it (:func:`~dynvit.objectives.pruning_objective`): token pruning with token distillation
    for ViTs; for hierarchical backbones (``convnext_tiny``, …) dynamic spatial sparsification with
    the keep ratios ``[ρ, ρ − 0.2, ρ − 0.4]`` and feature-map distillation.

    Args:
        model_name: The backbone of teacher and student (timm name or a registered seed backbone).
        num_classes, in_chans: Linked from the DataModule by the CLI.
        img_size: Input resolution; ``None`` (default) builds both networks at the backbone's own (timm's
            ``pretrained_cfg``). The DataModule follows the model (``follow``).
        keep_ratio: Base keep ratio ρ; ViTs: stage s keeps ``int(N * ρ**s)`` patch tokens at inference;
            hierarchical students: pruning stage s keeps ``int(N * (ρ − 0.2·s))`` stage-3 locations.
        pruning_loc: Blocks before which tokens are pruned (stage-3 blocks for hierarchical
            backbones); None uses the backbone's default.
        teacher_checkpoint: Weights of the trained teacher (DeiT/timm/Lightning ``.ckpt``).
        pretrained: Take the teacher from timm's pretrained weights instead.
        student_checkpoint: Optional DynamicViT weights to start the student from (else the teacher's).
        ratio_weight, distill_weight, token_weight: Loss weights (0.5, 0.5 for the distillation terms;
            ratio_weight None takes the objective's reference weight: 2.0 for ViTs, 10.0 for hierarchical
            students); token_weight=0 switches token (feature-map) distillation off.
        backbone_lr_scale: Backbone learning rate relative to ``lr``, which the new parameters get
            (predictors, and fast paths of hierarchical students): 0.01 in the DeiT recipe, 0.2 in
            the ConvNeXt one.
        keep_gradient: ``"tangent"`` (the reference) or ``"secant"``: the gradient the masked attention
            gives a dropped token's keep decision (see :func:`~dynvit.models.masked_attention.set_keep_gradient`).
        start_at_target: Start the fresh predictors keeping tokens with probability ρ instead of 1/2
            (see :meth:`~dynvit.models.dynamic_vit.TokenPruning.start_predictors_at_target`). Off by
            default, as in the reference; ignored when ``student_checkpoint`` gives trained predictors.
        Remaining arguments: see :class:`~dynvit.lightning.base.ImageClassification`.
    """

    def __init__(
        self,
        model_name: str = "deit_small_patch16_224",
        num_classes: int = 1000,
        img_size: int | None = None,
        in_chans: int = 3,
        keep_ratio: float = 0.7,
        pruning_loc: Sequence[int] | None = None,
        teacher_checkpoint: str | None = None,
        pretrained: bool = False,
        student_checkpoint: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        ratio_weight: float | None = None,
        distill_weight: float = 0.5,
        token_weight: float = 0.5,
        keep_gradient: Literal["tangent", "secant"] = "tangent",
        start_at_target: bool = False,
        lr: float = 1e-3,
        backbone_lr_scale: float = 0.01,
        lr_base_batch_size: int | None = 1024,
        weight_decay: float = 0.05,
        warmup_epochs: float = 5.0,
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.1,
        mixup: float = 0.0,
        cutmix: float = 0.0,
    ) -> None:
        super().__init__(num_classes, label_smoothing, mixup, cutmix)
        self.save_hyperparameters()
        build = model_build_args(num_classes, img_size, in_chans, model_kwargs)
        self.teacher = build_teacher(model_name, pretrained, teacher_checkpoint, build)
        # Which teacher every checkpoint was distilled from (hashed once, here): see teacher_record.
        self.teacher_record = teacher_record(teacher_checkpoint, model_name if pretrained else None)
        self.teacher.requires_grad_(False).eval()
        self.net = create_student(model_name, keep_ratio=keep_ratio, pruning_loc=pruning_loc, **build)
        if student_checkpoint is not None:
            load_checkpoint(self.net, student_checkpoint)
        else:
            load_weights(self.net, self.teacher.state_dict(), source="the teacher")
            if start_at_target:
                self.net.start_predictors_at_target()
        set_keep_gradient(self.net, keep_gradient)
        self.loss = pruning_objective(self.net, ratio_weight, distill_weight, token_weight, label_smoothing)
        self.val_recall = nn.ModuleList(MeanMetric() for _ in self.net.pruning_loc)

    @property
    def student(self) -> nn.Module:
        return self.net

    def lr_scales(self) -> Mapping[str, float]:
        # What pruning adds (predictors, fast paths) learns at lr, the pretrained backbone slower.
        return {**dict.fromkeys(self.net.new_param_prefixes, 1.0), "": self.hparams.backbone_lr_scale}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = self.training_inputs(batch)
        with torch.no_grad():
            teacher_logits, teacher_tokens = forward_with_tokens(self.teacher, x)
        out = self.net(x)
        # LV-ViT students distil dense predictions with KL instead of features with MSE.
        mode = {"token_mode": self.net.token_distill} if isinstance(self.net, DenseDistilling) else {}
        terms = self.loss(out, y, self.net.stage_keep_ratios, teacher_logits, teacher_tokens, **mode)
        # Terms a student does not have (the distillation head of a non-distilled ViT) are None.
        logged = {k: v for k, v in terms._asdict().items() if v is not None}
        self.check_finite(terms.total, logged)
        self.log("train/loss", logged.pop("total"), prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in logged.items()})
        for s, (decision, target) in enumerate(zip(out.decisions, self.net.stage_keep_ratios, strict=True)):
            self.log(f"train/keep_rate_s{s + 1}", decision.mean())
            self.log(f"train/keep_target_s{s + 1}", target)
        return terms.total

    def _eval_step(self, batch: tuple, stage: str) -> None:
        x, y, *rest = batch
        logits, masks = self.net.predict_with_masks(x)
        self.evaluate(logits, y, stage)
        if rest and stage == "val":
            self.log_recall(masks, rest[0])

    def log_recall(self, masks: list[torch.Tensor], target: torch.Tensor) -> None:
        """Share of the object's patches (``target`` (B, N) bool) still kept after each stage."""
        for s, (recall, metric) in enumerate(zip(stage_recall(masks, target), self.val_recall, strict=True)):
            metric.update(recall)
            self.log(f"val/recall_s{s + 1}", metric, sync_dist=True)

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple, batch_idx: int) -> None:
        self._eval_step(batch, "test")


def build_teacher(model_name: str, pretrained: bool, checkpoint: str | None, build: dict[str, Any]) -> nn.Module:
    """The frozen teacher, with errors that say what a teacher must be (no ``reset_head``: a teacher keeps
    the data's classes)."""
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(
            f"teacher_checkpoint {checkpoint} does not exist: train the teacher first, or point teacher_checkpoint "
            "at its weights"
        )
    try:
        return create_teacher(model_name, pretrained=pretrained, checkpoint=checkpoint, **build)
    except CheckpointMismatch as e:
        raise CheckpointMismatch(
            f"teacher_checkpoint is not a {model_name} teacher for this data ({build['num_classes']} classes): {e}\n"
            "The teacher must be trained on the data's classes, and model_name/model_kwargs must describe "
            "its architecture"
        ) from e


def teacher_record(checkpoint: str | None, pretrained_name: str | None) -> dict[str, str | None]:
    """Where a teacher's weights came from, as every student checkpoint records it under
    ``checkpoint["dynvit"]["teacher"]``: ``{"path", "sha256"}`` of its file (the SHA-256 of its bytes),
    ``{"pretrained"}`` for timm's weights, ``{"path": None, "sha256": None}`` for a random teacher."""
    if checkpoint is not None:
        return {"path": str(Path(checkpoint).resolve()), "sha256": file_sha256(checkpoint)}
    if pretrained_name is not None:
        return {"pretrained": f"timm:{pretrained_name}"}
    return {"path": None, "sha256": None}
