"""Train, fine-tune and evaluate an unpruned ViT: the teacher users need for their own data."""

from __future__ import annotations

from typing import Any

import torch

from dynvit.lightning.base import ImageClassification, model_build_args
from dynvit.models import create_teacher, load_checkpoint
from dynvit.objectives.dynamicvit import classification_loss
from dynvit.reducers import apply_reducer


class ClassifierModule(ImageClassification):
    """A timm ViT (or a registered seed backbone) trained with cross-entropy.

    Args:
        model_name: timm model name, e.g. ``deit_small_patch16_224`` or ``vit_digits_conv``.
        num_classes, in_chans: Linked from the DataModule by the CLI.
        img_size: Input resolution; ``None`` (default) builds the model at its own (timm's
            ``pretrained_cfg``). The DataModule follows the model (``follow``).
        checkpoint: Weights to start from (DeiT/timm/Lightning); see :func:`dynvit.load_checkpoint`.
        reset_head: Start a new head when the checkpoint has another class count (fine-tuning).
        pretrained: Start from timm's pretrained weights (needs the model hub).
        model_kwargs: Extra timm kwargs (``depth``, ``embed_dim``, ``drop_path_rate``, …).
        reducer: A training-free method of the registry (``dynvit.methods.registered()``: ``tome``, ``evit``,
            ``topk``, ``ats``, ``random``, …) applied to the network after its weights are loaded, e.g. to
            validate or predict with it on a teacher's checkpoint; ``reducer_params`` are its parameters
            (``{r: 8}`` for ToMe, ``{keep_rate: 0.7}`` for EViT, …).
        Remaining arguments: see :class:`~dynvit.lightning.base.ImageClassification`.
    """

    def __init__(
        self,
        model_name: str = "deit_small_patch16_224",
        num_classes: int = 1000,
        img_size: int | None = None,
        in_chans: int = 3,
        checkpoint: str | None = None,
        reset_head: bool = False,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        reducer: str | None = None,
        reducer_params: dict[str, Any] | None = None,
        lr: float = 5e-4,
        lr_base_batch_size: int | None = 512,
        weight_decay: float = 0.05,
        warmup_epochs: float = 5.0,
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.1,
        mixup: float = 0.0,
        cutmix: float = 0.0,
    ) -> None:
        super().__init__(num_classes, label_smoothing, mixup, cutmix)
        self.save_hyperparameters()
        self.net = create_teacher(
            model_name, pretrained=pretrained, **model_build_args(num_classes, img_size, in_chans, model_kwargs)
        )
        if checkpoint is not None:
            load_checkpoint(self.net, checkpoint, reset_head=reset_head)
        if reducer is not None:
            # Reducers add no parameters: the network keeps the teacher's state-dict layout.
            self.net = apply_reducer(self.net, reducer, **(reducer_params or {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = self.training_inputs(batch)
        loss = classification_loss(self.net(x), y, self.hparams.label_smoothing)
        self.check_finite(loss, {"cls": loss})
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y, *_ = batch
        self.evaluate(self.net(x), y, "val")

    def test_step(self, batch: tuple, batch_idx: int) -> None:
        x, y, *_ = batch
        self.evaluate(self.net(x), y, "test")
