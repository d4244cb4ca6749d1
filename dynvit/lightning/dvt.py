"""Train a DVT cascade: the sum of its three exits' losses, from scratch or distilled from a teacher."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dynvit.lightning.base import model_build_args
from dynvit.lightning.pruning import FrozenTeacherModule, build_teacher, teacher_record
from dynvit.models.dvt import check_budget, create_dvt, search_thresholds
from dynvit.objectives.dynamicvit import classification_loss, logit_distillation_loss


class DVTModule(FrozenTeacherModule):
    """A DVT cascade (:func:`~dynvit.models.dvt.create_dvt`) trained on the sum of its exits' losses.

    From scratch (the paper): each exit's cross-entropy, summed. With a teacher (``teacher_checkpoint``
    or ``pretrained``; the teacher is the plain ``teacher_name`` ViT, frozen): each exit's loss becomes
    ``(1 − distill_weight) · CE + distill_weight · KL(exit ‖ teacher)``, still summed over the exits.

    Validation logs every exit's top-1 (``val/top1_exit{k}``) and, as ``val/top1``, the last exit's (the
    official model selection metric). With ``gflops`` set, each validation epoch also picks the
    thresholds that spend that budget on the validation images (:meth:`~dynvit.models.dvt.DVT.choose_thresholds`),
    sets them on the network and logs ``val/early_exit_top1`` and ``val/early_exit_gflops``; the
    thresholds are stored in the checkpoint (``checkpoint["dvt_thresholds"]``) and restored with it.

    Args:
        model_name: ``deit_small_patch16_224``, ``t2t_vit_12``, ``t2t_vit_14`` or any timm ViT with ``patches``.
        num_classes, in_chans: Linked from the DataModule by the CLI.
        img_size: Input resolution (the released cascades: 224).
        patches: Each exit's (patch size, padding) for a timm ViT without a released cascade.
        upsample: Intermediate grid sides for resampling to exits 2 and 3 (default: twice the grid before).
        model_kwargs: Passed to every backbone (``depth``, ``embed_dim``, ``drop_path_rate``, …).
        checkpoint: DVT weights to start from (a released ``.pth.tar`` or this toolkit's files).
        teacher_name: The teacher's backbone (timm name), for distillation.
        teacher_checkpoint: The teacher's weights; ``pretrained``: timm's weights instead.
        teacher_kwargs: Extra timm kwargs of the teacher.
        distill_weight: Share of the KL term in each exit's loss (with a teacher).
        gflops: Budget (mean GFLOPs per image) for the thresholds chosen each validation epoch; None: none.
        Remaining arguments: see :class:`~dynvit.lightning.base.ImageClassification`; the teacher is handled
            as by every :class:`~dynvit.lightning.pruning.FrozenTeacherModule`.
    """

    def __init__(
        self,
        model_name: str = "deit_small_patch16_224",
        num_classes: int = 1000,
        img_size: int | None = None,
        in_chans: int = 3,
        patches: Sequence[Sequence[int]] | None = None,
        upsample: Sequence[int] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        teacher_name: str | None = None,
        teacher_checkpoint: str | None = None,
        pretrained: bool = False,
        teacher_kwargs: dict[str, Any] | None = None,
        distill_weight: float = 0.5,
        gflops: float | None = None,
        lr: float = 5e-4,
        lr_base_batch_size: int | None = 512,
        weight_decay: float = 0.05,
        warmup_epochs: float = 20.0,
        min_lr_ratio: float = 0.02,
        label_smoothing: float = 0.1,
        mixup: float = 0.0,
        cutmix: float = 0.0,
    ) -> None:
        super().__init__(num_classes, label_smoothing, mixup, cutmix)
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"distill_weight is a share of each exit's loss, in [0, 1]; got {distill_weight}")
        self.save_hyperparameters()
        self.net = create_dvt(
            model_name,
            checkpoint=checkpoint,
            patches=None if patches is None else [tuple(p) for p in patches],
            upsample=upsample,
            **model_build_args(num_classes, img_size, in_chans, model_kwargs),
        )
        if gflops is not None:
            # Checked now: the budget is first used when the first validation ends, after a training epoch.
            check_budget(gflops, self.net.exit_gflops())
        self.teacher: nn.Module | None = None
        if teacher_checkpoint is not None or pretrained:
            if teacher_name is None:
                raise ValueError("a teacher_checkpoint (or pretrained) needs teacher_name, the teacher's timm model")
            size = self.net.input_size[-1]
            build = dict(num_classes=num_classes, img_size=size, in_chans=in_chans, **(teacher_kwargs or {}))
            self.teacher = build_teacher(teacher_name, pretrained, teacher_checkpoint, build)
            self.teacher.requires_grad_(False).eval()
        self.teacher_record = teacher_record(teacher_checkpoint, teacher_name if pretrained else None)
        self._confidences: list[torch.Tensor] = []
        self._correct: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = self.training_inputs(batch)
        exits = self.net(x)
        terms = {f"cls{k + 1}": classification_loss(o, y, self.hparams.label_smoothing) for k, o in enumerate(exits)}
        loss = sum(terms.values())
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            w = self.hparams.distill_weight
            kl = {f"kl{k + 1}": logit_distillation_loss(o, teacher_logits) for k, o in enumerate(exits)}
            loss = (1 - w) * loss + w * sum(kl.values())
            terms.update(kl)
        self.check_finite(loss, terms)
        self.log("train/loss", loss, prog_bar=True)
        for name, value in terms.items():
            self.log(f"train/{name}", value)
        return loss

    def _eval_step(self, batch: tuple, stage: str) -> None:
        x, y, *_ = batch
        exits = self.net.forward_exits(x)
        self.evaluate(exits[-1], y, stage)
        for k, logits in enumerate(exits):
            self.log(f"{stage}/top1_exit{k + 1}", (logits.argmax(-1) == y).float().mean(), sync_dist=True)
        if stage == "val" and self.hparams.gflops is not None:
            probs = torch.stack(exits).softmax(dim=-1)
            top, predicted = probs.max(dim=-1)
            self._confidences.append(top.float().cpu())
            self._correct.append((predicted == y[None]).cpu())

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        if not self._confidences:
            return
        confidences, correct = torch.cat(self._confidences, dim=1), torch.cat(self._correct, dim=1)
        self._confidences, self._correct = [], []
        choice = search_thresholds(confidences, self.net.exit_gflops(), self.hparams.gflops, correct)
        self.net.thresholds = choice.thresholds
        self.log("val/early_exit_top1", choice.top1 / 100.0)
        self.log("val/early_exit_gflops", choice.gflops)

    # The thresholds travel with the cascade (the teacher, as for every FrozenTeacherModule, does not).
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.net.thresholds is not None:
            checkpoint["dvt_thresholds"] = self.net.thresholds.clone()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        thresholds = checkpoint.get("dvt_thresholds")
        self.net.thresholds = None if thresholds is None else self.net.check_thresholds(thresholds)


__all__ = ["DVTModule"]
