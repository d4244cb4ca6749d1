"""What the teacher and student modules share: metrics, optimisation, mixup and the NaN guard."""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from timm.data import Mixup
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from dynvit.lightning.optim import param_groups, warmup_cosine
from dynvit.measure.groups import token_groups
from dynvit.models.checkpoint import CheckpointMismatch
from dynvit.models.contract import reports


class ImageClassification(L.LightningModule):
    """Base for modules that classify images with one network ``self.net`` (the model being trained).

    Args:
        num_classes: Classes of the dataset (linked from the DataModule by the CLI); at least 2.
        label_smoothing: For hard targets, in [0, 1); passed to timm's Mixup when mixup/cutmix are on.
        mixup, cutmix: Alpha (>= 0) of timm's Mixup/CutMix (0 disables); targets then become soft. Either
            needs an even batch_size (:meth:`check_batch_size`).

    Checkpoints carry the class names of the data the module was fitted on (``checkpoint["class_names"]``,
    restored as ``class_names``), so predictions can be named without the training folders.

    Subclasses call ``save_hyperparameters()`` with these optimisation arguments, read from ``hparams``:
        lr: Learning rate at ``lr_base_batch_size`` images per optimiser step; scaled linearly to the
            actual global batch (batch × accumulation × devices) unless ``lr_base_batch_size`` is None.
        weight_decay: AdamW weight decay (not applied to norms, biases, pos_embed, cls_token).
        warmup_epochs: Linear warm-up length (fractional epochs allowed), stepped per iteration.
        min_lr_ratio: Cosine floor as a fraction of the peak learning rate.
    """

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0) -> None:
        super().__init__()
        check_classification_options(num_classes, label_smoothing, mixup, cutmix)
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
        self.class_names: list[str] | None = None

    net: nn.Module

    # -- what each subclass defines -------------------------------------------------------------
    def lr_scales(self) -> Mapping[str, float]:
        """Learning-rate multipliers by parameter-name prefix within ``self.net``."""
        return {"": 1.0}

    def frozen_networks(self) -> list[nn.Module]:
        """Networks kept frozen in eval mode on purpose (a teacher, an annotator)."""
        return []

    def check_batch_size(self, batch_size: int | None) -> None:
        """``ValueError`` when mixup/cutmix are on and ``batch_size`` (per device) is odd: timm's Mixup
        pairs each image with its mirror in the batch and refuses odd batches with an assertion, at the
        first training step. The CLI calls it as soon as the model and data are built; ``on_fit_start``
        again, for runs started from Python."""
        if self.mixup_fn is not None and batch_size is not None and batch_size % 2:
            even = f"{batch_size - 1} or {batch_size + 1}" if batch_size > 1 else "2"
            raise ValueError(
                f"mixup/cutmix need an even batch_size (timm's Mixup pairs the images of a batch), got batch_size "
                f"{batch_size} with mixup={self.mixup_fn.mixup_alpha:g}, cutmix={self.mixup_fn.cutmix_alpha:g}: "
                f"use batch_size {even}, or set mixup and cutmix to 0"
            )

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        self.check_batch_size(getattr(datamodule, "batch_size", None) if datamodule is not None else None)
        # Lightning warns when any module is in eval mode as training starts. The frozen networks are, on
        # purpose; any other module in eval mode changes the count, and the warning then still shows.
        frozen = sum(not m.training for net in self.frozen_networks() for m in net.modules())
        if frozen:
            warnings.filterwarnings(
                "ignore", message=rf"Found {frozen} module\(s\) in eval mode", category=PossibleUserWarning
            )

    # -- shared steps ---------------------------------------------------------------------------
    def training_inputs(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, *_ = batch
        if self.mixup_fn is not None:
            x, y = self.mixup_fn(x, y)
        return x, y

    def check_finite(self, loss: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> None:
        """Stop with a clear message rather than train on (and checkpoint) NaN/inf weights."""
        if not torch.isfinite(loss):
            detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
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

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Class probabilities ``probs`` (B, classes); for a network that drops tokens, ``masks``
        (B, stages, N): the patches still kept after each stage; for one that merges or clusters them,
        ``groups`` (B, columns, N) int64: the token each patch went to (-1: none;
        :func:`dynvit.measure.groups.token_groups`). Batches are images or (images, ...)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        offers = reports(self.net)
        if "masks" in offers:
            logits, masks = self.net.predict_with_masks(x)
            out = {"probs": logits.softmax(dim=-1), "masks": torch.stack(masks, dim=1)}
        else:
            out = {"probs": self.net(x).softmax(dim=-1)}
        groups = token_groups(self.net, x)
        if groups is not None:
            out["groups"] = torch.stack(groups, dim=1)
        return out

    # -- exact resume ----------------------------------------------------------------------------
    # Lightning restores weights, optimiser and loop state but not the random generators, so Gumbel
    # noise, shuffling and mixup would diverge after `--ckpt_path last`. Single-process runs carry
    # them in the checkpoint (as tensors, so the file still loads with weights_only=True).
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        names = self.class_names
        if self._trainer is not None and self.trainer.datamodule is not None:
            names = getattr(self.trainer.datamodule, "class_names", None) or names
        if names is not None:
            checkpoint["class_names"] = [str(n) for n in names]
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), torch.tensor([pos, has_gauss]), torch.tensor(cached)],
            # Python's generator drives timm's RandAugment and RandomErasing (in the main process when
            # num_workers is 0); without it a resumed run augments its images differently.
            "python": python_rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_fits(checkpoint)
        self.class_names = checkpoint.get("class_names", self.class_names)
        states = checkpoint.get("rng_states")
        if states is None or self._trainer is None or self.trainer.world_size != 1:
            return
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        keys, (pos, has_gauss), cached = states["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
        if "python" in states:  # checkpoints written before it was stored lack it
            set_python_rng_state(states["python"])

    def check_fits(self, checkpoint: dict[str, Any]) -> None:
        """Raise a clear error when a Lightning checkpoint's network does not fit ``self.net`` (another class
        count, another architecture), instead of Lightning's ``size mismatch for net.head.weight``."""
        source = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        source = f"checkpoint {source}" if source else "the checkpoint"
        saved = checkpoint.get("hyper_parameters", {}).get("num_classes")
        classes = self.hparams.get("num_classes")
        if saved is not None and classes is not None and saved != classes:
            raise CheckpointMismatch(
                f"{source} was trained for {saved} classes, but this model is built for {classes} (the data's "
                f"class count): evaluate it on data with {saved} classes, or fine-tune it with a new head"
            )
        state = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
        own = self.net.state_dict()
        problems = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in state and state[k].shape != own[k].shape
        ]
        problems += [f"missing from the checkpoint: {k}" for k in own if k not in state]
        problems += [f"not in the model: {k}" for k in state if k not in own]
        if problems:
            shown = "\n  ".join(problems[:8]) + (f"\n  … ({len(problems) - 8} more)" if len(problems) > 8 else "")
            raise CheckpointMismatch(
                f"{source} does not fit this {type(self.net).__name__}:\n  {shown}\n"
                "Was it written by another config (model_name, model_kwargs, pruning_loc)?"
            )

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


def model_build_args(
    num_classes: int, img_size: int | None, in_chans: int, model_kwargs: Mapping[str, Any] | None
) -> dict[str, Any]:
    """A module's backbone arguments: its own ``num_classes``, ``img_size`` and ``in_chans`` (the CLI links the
    first and last from the DataModule), then ``model_kwargs``, which must not give them a second time (that
    was a bare "got multiple values for keyword argument" from deep inside the build)."""
    own = dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    twice = sorted(own.keys() & (model_kwargs or {}).keys())
    if twice:
        raise ValueError(
            f"model_kwargs sets {', '.join(twice)}, which the module takes as its own argument (the CLI links "
            f"num_classes and in_chans from the DataModule): remove it from model_kwargs, or set "
            f"{', '.join(f'model.init_args.{k}' for k in twice)}"
        )
    return {**own, **(model_kwargs or {})}


def check_classification_options(num_classes: int, label_smoothing: float, mixup: float, cutmix: float) -> None:
    """``ValueError`` naming the option for a class count below 2 or a ``label_smoothing``, ``mixup`` or
    ``cutmix`` out of range, before torchmetrics or timm refuse them with a traceback (or accept them:
    a smoothing above 1 makes targets negative)."""
    if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 2):
        raise ValueError(
            f"num_classes must be >= 2, got {num_classes}: a classifier needs at least 2 classes (an image "
            "folder: at least 2 class folders in train/)"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    for name, alpha in (("mixup", mixup), ("cutmix", cutmix)):
        if not alpha >= 0.0:  # `not >=`: NaN is refused too
            raise ValueError(f"{name} must be >= 0 (its Beta distribution's alpha; 0 turns it off), got {alpha}")


def python_rng_state() -> list[torch.Tensor]:
    """``random.getstate()`` as tensors (version, the 625 words of its Mersenne Twister, the cached
    Gaussian or none), so that a checkpoint holding it still loads with ``weights_only=True``."""
    version, words, gauss = random.getstate()
    cached = torch.tensor([] if gauss is None else [gauss], dtype=torch.float64)
    return [torch.tensor([version]), torch.tensor(words, dtype=torch.int64), cached]


def set_python_rng_state(state: list[torch.Tensor]) -> None:
    """Restore Python's generator from :func:`python_rng_state`'s tensors."""
    version, words, cached = state
    gauss = float(cached[0]) if cached.numel() else None
    random.setstate((int(version[0]), tuple(int(w) for w in words), gauss))
