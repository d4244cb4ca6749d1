"""What the teacher and student modules share: metrics, optimisation, mixup and the NaN guard."""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning as L
import numpy as np
import torch
from timm.data import Mixup
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from dynvit.lightning.optim import param_groups, warmup_cosine


class ImageClassification(L.LightningModule):
    """Base for modules that classify images with one network ``self.net`` (the model being trained).

    Args:
        num_classes: Classes of the dataset (linked from the DataModule by the CLI).
        label_smoothing: For hard targets; passed to timm's Mixup when mixup/cutmix are on.
        mixup, cutmix: Alpha of timm's Mixup/CutMix (0 disables); targets then become soft.

    Subclasses call ``save_hyperparameters()`` with these optimisation arguments, read from ``hparams``:
        lr: Learning rate at ``lr_base_batch_size`` images per optimiser step; scaled linearly to the
            actual global batch (batch × accumulation × devices) unless ``lr_base_batch_size`` is None.
        weight_decay: AdamW weight decay (not applied to norms, biases, pos_embed, cls_token).
        warmup_epochs: Linear warm-up length (fractional epochs allowed), stepped per iteration.
        min_lr_ratio: Cosine floor as a fraction of the peak learning rate.
    """

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0) -> None:
        super().__init__()
        self.mixup_fn = (
            Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)
            if mixup > 0 or cutmix > 0
            else None
        )
        top5 = min(5, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.test_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")

    net: nn.Module

    # -- what each subclass defines -------------------------------------------------------------
    def lr_scales(self) -> Mapping[str, float]:
        """Learning-rate multipliers by parameter-name prefix within ``self.net``."""
        return {"": 1.0}

    # -- shared steps ---------------------------------------------------------------------------
    def training_inputs(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, *_ = batch
        if self.mixup_fn is not None:
            x, y = self.mixup_fn(x, y)
        return x, y

    def check_finite(self, loss: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> None:
        """Stop with a clear message rather than train on (and checkpoint) NaN/inf weights."""
        if not torch.isfinite(loss):
            detail = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
            raise FloatingPointError(
                f"non-finite loss at step {self.global_step} ({detail}); the last good checkpoint is kept. "
                "Lower model.lr, set trainer.gradient_clip_val (e.g. 1.0), or use precision 32 to continue."
            )

    def evaluate(self, logits: torch.Tensor, y: torch.Tensor, stage: str) -> None:
        top1, top5 = (self.val_top1, self.val_top5) if stage == "val" else (self.test_top1, self.test_top5)
        top1(logits, y)
        top5(logits, y)
        self.log(f"{stage}/top1", top1, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/top5", top5, sync_dist=True)

    def predict_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.net(x).softmax(dim=-1)

    # -- exact resume ----------------------------------------------------------------------------
    # Lightning restores weights, optimiser and loop state but not the random generators, so Gumbel
    # noise, shuffling and mixup would diverge after `--ckpt_path last`. Single-process runs carry
    # them in the checkpoint (as tensors, so the file still loads with weights_only=True).
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), torch.tensor([pos, has_gauss]), torch.tensor(cached)],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if states is None or self._trainer is None or self.trainer.world_size != 1:
            return
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        keys, (pos, has_gauss), cached = states["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))

    # -- optimisation ---------------------------------------------------------------------------
    def global_batch_size(self) -> int:
        batch = getattr(self.trainer.datamodule, "batch_size", None) if self.trainer.datamodule else None
        if batch is None:
            batch = self.trainer.train_dataloader.batch_size
        return batch * self.trainer.accumulate_grad_batches * self.trainer.world_size

    def peak_lr(self) -> float:
        base = self.hparams.lr_base_batch_size
        return self.hparams.lr if base is None else self.hparams.lr * self.global_batch_size() / base

    def steps_per_epoch(self, total_steps: int) -> float:
        """Optimiser steps per epoch, to turn ``warmup_epochs`` into steps."""
        t = self.trainer
        if t.max_steps == -1 and t.max_epochs and t.max_epochs > 0:
            return total_steps / t.max_epochs
        # Step-limited runs: count one epoch of batches (per process) directly.
        batches = len(t.datamodule.train_dataloader()) if t.datamodule else t.num_training_batches
        return math.ceil(batches / t.world_size) / t.accumulate_grad_batches

    def configure_optimizers(self):
        groups = param_groups(self.net, self.peak_lr(), self.hparams.weight_decay, self.lr_scales())
        optimizer = torch.optim.AdamW(groups)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = min(total // 2, round(self.hparams.warmup_epochs * self.steps_per_epoch(total)))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup, self.hparams.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
