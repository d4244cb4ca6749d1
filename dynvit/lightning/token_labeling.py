"""Token labeling (Jiang et al., 2021) as a LightningModule: an LV-ViT trained on dense token targets.

Each training step follows :mod:`dynvit.objectives.token_labeling`: class and token targets from a
machine annotator on the *unmixed* images (by default made as the official LV-ViT script makes them),
a MixToken box on the token grid, the model's class and aux-head logits on the mixed tokens, the
token targets and class targets mixed by the same box, and ``CE(cls) + token_weight · soft-CE(aux,
token targets)``. Validation and test score LV-ViT's inference prediction ``head(cls) + 0.5 · max aux``.

Two annotators: a frozen network (``annotator_name`` + ``annotator_checkpoint``, any timm ViT or
LV-ViT, labelling each patch with its own dense prediction) or precomputed score maps in the format
LV-ViT released (``score_map_root``, see :class:`ScoreMapDataset` for what that path supports).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from timm.data.transforms import str_to_interp_mode
from torch.utils.data import Dataset
from torchvision.datasets import DatasetFolder
from torchvision.transforms import functional as TF

from dynvit.data import ImageFolderDataModule
from dynvit.lightning.base import ImageClassification, model_build_args
from dynvit.models import LVViT, create_teacher, load_checkpoint
from dynvit.models.factory import family_of
from dynvit.objectives.token_labeling import (
    CLASS_TARGETS,
    TOKEN_TARGETS,
    AnnotatorTargets,
    TeacherAnnotator,
    annotator_targets,
    blend_with_ground_truth,
    check_choice,
    mix_class_targets,
    mix_tokens,
    read_score_map,
    sample_token_box,
    smoothed_labels,
    token_labeling_loss,
)

_ANNOTATOR = "annotator."


class TokenLabelingModule(ImageClassification):
    """An LV-ViT trained with the class loss, the token-labeling loss and MixToken.

    The annotator network is frozen: it stays in eval mode, gets no gradients, is not in the optimiser
    and is not written into checkpoints (it is rebuilt from ``annotator_checkpoint`` on load). Pixel-level
    mixup/CutMix are not offered: MixToken replaces CutMix, and the token labels could not follow a
    pixel blend.

    Args:
        model_name: The model trained: a registered LV-ViT (``lvvit_s``, ``lvvit_m``, ``lvvit_digits``, …),
            whose aux head gives the dense outputs token labeling trains.
        num_classes, in_chans: Linked from the DataModule by the CLI.
        img_size: Input resolution; ``None`` (default) builds the model at its own (timm's
            ``pretrained_cfg``). The DataModule follows the model (``follow``).
        checkpoint: Weights to start the model from (e.g. a released LV-ViT, to fine-tune).
        reset_head: Start new heads when ``checkpoint`` has another class count.
        model_kwargs: Extra timm kwargs of the model (``drop_path_rate``, ``depth``, …).
        annotator_name: timm name of the annotator network (any timm ViT or LV-ViT); it sees the same
            images as the model and its per-patch predictions are resized to the model's token grid.
        annotator_checkpoint: The annotator's trained weights (DeiT/timm/Lightning checkpoint).
        annotator_pretrained: Take the annotator's weights from timm's hub instead.
        annotator_kwargs: Extra timm kwargs of the annotator (``patch_size``, ``depth``, …).
        annotator_temperature: The annotator network's logits are divided by it before the targets are made.
        annotator_topk: Classes the annotator network keeps per patch (5, as the released label files;
            ``None``: all).
        score_map_root: Precomputed score maps instead of an annotator network (ImageFolderDataModule
            only, without random crops: see :class:`ScoreMapDataset`).
        token_weight: Weight of the token-labeling term (1.0, the official script's ``--dense-weight``).
        token_targets: ``"official"`` (softmax over all classes after RoI-Align, label smoothing) or
            ``"dynvit"`` (softmax over the annotator's top-k first, no smoothing; dynvit's earlier way).
        class_target: ``"official"`` (the annotator's soft label of the crop), ``"official_ground_truth"``
            (the script's ``--ground-truth`` blend with the true label) or ``"dynvit_label"`` (the
            smoothed true label; dynvit's earlier way).
        mixtoken: Apply MixToken in training.
        mixtoken_alpha: Beta(alpha, alpha) of the MixToken area (1: uniform, as LV-ViT).
        label_smoothing: ε of the class targets and of the official token targets (before MixToken
            mixes them); 0.1 as the official script.
        Remaining arguments: see :class:`~dynvit.lightning.base.ImageClassification`.
    """

    def __init__(
        self,
        model_name: str = "lvvit_s",
        num_classes: int = 1000,
        img_size: int | None = None,
        in_chans: int = 3,
        checkpoint: str | None = None,
        reset_head: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        annotator_name: str | None = None,
        annotator_checkpoint: str | None = None,
        annotator_pretrained: bool = False,
        annotator_kwargs: dict[str, Any] | None = None,
        annotator_temperature: float = 1.0,
        annotator_topk: int | None = 5,
        score_map_root: str | None = None,
        token_weight: float = 1.0,
        token_targets: str = "official",
        class_target: str = "official",
        mixtoken: bool = True,
        mixtoken_alpha: float = 1.0,
        lr: float = 1.6e-3,
        lr_base_batch_size: int | None = 1024,
        weight_decay: float = 0.05,
        warmup_epochs: float = 5.0,
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__(num_classes, label_smoothing, mixup=0.0, cutmix=0.0)
        self.save_hyperparameters()
        if (annotator_name is None) == (score_map_root is None):
            raise ValueError(
                "token labeling needs exactly one annotator: annotator_name (with annotator_checkpoint) for a "
                f"frozen network, or score_map_root for precomputed score maps; got annotator_name={annotator_name!r}"
                f", score_map_root={score_map_root!r}"
            )
        family = family_of(annotator_name) if annotator_name is not None else None
        if family is not None:
            # Its tokens are what is labelled; a hierarchical map used to fail inside the model build instead.
            raise TypeError(
                f"the annotator labels each patch token with its own per-patch predictions, so it is a timm ViT or "
                f"LV-ViT; {annotator_name} is a {family.backbone.__name__}: use a ViT annotator, or precomputed "
                "score maps (score_map_root)"
            )
        if annotator_name is not None and annotator_checkpoint is None and not annotator_pretrained:
            raise ValueError(
                f"the annotator {annotator_name} would label tokens with random weights: set annotator_checkpoint "
                "to its trained weights (or annotator_pretrained: true for timm's)"
            )
        if token_weight < 0:
            raise ValueError(f"token_weight must be >= 0, got {token_weight}")
        check_choice("token_targets", token_targets, TOKEN_TARGETS)
        check_choice("class_target", class_target, CLASS_TARGETS)
        if mixtoken and mixtoken_alpha <= 0:
            raise ValueError(f"mixtoken_alpha must be positive, got {mixtoken_alpha}")

        build = dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans)
        self.net = create_teacher(model_name, **model_build_args(num_classes, img_size, in_chans, model_kwargs))
        if not isinstance(self.net, LVViT):
            raise TypeError(
                f"token labeling trains a model with dense per-token outputs and MixToken (an LV-ViT such as "
                f"lvvit_s or lvvit_digits); {model_name} is a {type(self.net).__name__} without them. Train it "
                "with ClassifierModule instead"
            )
        if checkpoint is not None:
            load_checkpoint(self.net, checkpoint, reset_head=reset_head)

        self.annotator: TeacherAnnotator | None = None
        if annotator_name is not None:
            # The annotator sees the model's images, whatever its own native resolution.
            teacher = create_teacher(
                annotator_name,
                checkpoint=annotator_checkpoint,
                pretrained=annotator_pretrained,
                **{**build, "img_size": self.net.patch_embed.img_size},
                **(annotator_kwargs or {}),
            )
            self.annotator = TeacherAnnotator(
                teacher,
                temperature=annotator_temperature,
                topk=annotator_topk,
                token_targets=token_targets,
                smoothing=label_smoothing,
            )
        elif not Path(score_map_root).is_dir():
            raise FileNotFoundError(f"score_map_root {score_map_root} is not a folder of score maps")

    def frozen_networks(self) -> list[torch.nn.Module]:
        return [self.annotator.teacher] if self.annotator is not None else []

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, columns) of the model's patch tokens."""
        return tuple(self.net.patch_embed.grid_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # -- score maps: the training split carries its token labels -----------------------------------
    def setup(self, stage: str) -> None:
        if self.hparams.score_map_root is None or stage != "fit":
            return
        dm = self.trainer.datamodule
        if not isinstance(dm, ImageFolderDataModule):
            raise TypeError(
                "score_map_root needs an ImageFolderDataModule: score maps are looked up by image file name, "
                f"got {type(dm).__name__}. Use annotator_name/annotator_checkpoint with other data"
            )
        train = dm.datasets["train"]
        if isinstance(train, ScoreMapDataset):
            return
        dm.datasets["train"] = ScoreMapDataset(
            train,
            self.hparams.score_map_root,
            self.hparams.num_classes,
            img_size=dm.img_size,
            crop_pct=dm.crop_pct,
            interpolation=dm.interpolation,
            mean=dm.mean,
            std=dm.std,
            hflip=dm.hparams.hflip,
        )
        rank_zero_warn(
            "score_map_root: training images get the evaluation resize and centre crop plus a random flip, not "
            "the data module's training augmentation (random resized crop, RandAugment, random erasing), "
            "because the score maps can only follow crops and flips made where they are known"
        )

    # -- training ------------------------------------------------------------------------------------
    def annotator_targets(self, x: torch.Tensor, extra: Sequence[torch.Tensor]) -> AnnotatorTargets:
        """The annotator's class and token targets (B, classes), (B, N, classes) of the unmixed images."""
        if self.annotator is not None:
            return self.annotator(x, self.grid_size)
        if len(extra) < 2 or extra[0].ndim != 5 or extra[1].shape != (x.shape[0], 5):
            raise ValueError(
                "score_map_root is set but the training batch carries no score maps (B, 2, k, h, w) and crop "
                "geometry (B, 5): the training split must be the ScoreMapDataset this module installs in setup('fit')"
            )
        maps, geometry = extra[0], extra[1].float()
        return annotator_targets(
            maps[:, 0].float(),
            maps[:, 1].round().long(),
            self.hparams.num_classes,
            self.grid_size,
            crops=geometry[:, :4],
            flips=geometry[:, 4] > 0.5,
            token_targets=self.hparams.token_targets,
            smoothing=self.hparams.label_smoothing,
        )

    def class_targets(self, y: torch.Tensor, annotator_cls: torch.Tensor) -> torch.Tensor:
        """Class targets (B, classes) as ``class_target`` says, ready to be mixed by MixToken."""
        eps = self.hparams.label_smoothing
        if self.hparams.class_target == "official":
            return annotator_cls
        if self.hparams.class_target == "official_ground_truth":
            return blend_with_ground_truth(annotator_cls, y, eps)
        return smoothed_labels(y, self.hparams.num_classes, eps)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y, *extra = batch
        labels = self.annotator_targets(x, extra)
        token_targets, targets = labels.tokens, self.class_targets(y, labels.cls)
        box = sample_token_box(self.grid_size, self.hparams.mixtoken_alpha) if self.hparams.mixtoken else None
        out = self.net(x, mix_box=box)
        if box is not None:
            # The labels move with their tokens; the class targets are weighted by the box's area.
            token_targets = mix_tokens(token_targets, box)
            targets = mix_class_targets(targets, box)
        terms = token_labeling_loss(out.logits, out.aux_logits, targets, token_targets, self.hparams.token_weight)
        logged = {"cls": terms.cls_loss, "token": terms.token_loss}
        self.check_finite(terms.loss, logged)
        self.log("train/loss", terms.loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in logged.items()})
        return terms.loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y, *_ = batch
        self.evaluate(self.net(x), y, "val")

    def test_step(self, batch: tuple, batch_idx: int) -> None:
        x, y, *_ = batch
        self.evaluate(self.net(x), y, "test")

    # The annotator is rebuilt from its own checkpoint; storing it in every checkpoint would waste space
    # and make the file look like an LV-ViT with extra keys.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        sd = checkpoint["state_dict"]
        for key in [k for k in sd if k.startswith(_ANNOTATOR)]:
            del sd[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.annotator is not None:
            checkpoint["state_dict"].update({_ANNOTATOR + k: v for k, v in self.annotator.state_dict().items()})


class ScoreMapDataset(Dataset):
    """Image-folder samples with their score maps and crop geometry: ``(image, label, score_map, geometry)``.

    A score map covers the whole image, so its targets must be cut to the crop the image went through.
    The data pipeline does not report its random crops, so this dataset makes the geometry itself,
    where it is known: the evaluation resize (short side to ``img_size / crop_pct``) and centre crop of
    ``ImageFolderDataModule``, then a random horizontal flip. It returns the stored map (2, k, h, w)
    float16 as read and ``geometry`` (5,) = (top, left, height, width, flip) of the crop as fractions of
    the image; :class:`TokenLabelingModule` makes the targets on the batch
    (:func:`~dynvit.objectives.token_labeling.annotator_targets`), as the official script does on the
    GPU. **Limitation:** no random resized crop, RandAugment or random erasing, so training sees far
    less augmentation than LV-ViT's recipe; for that, label with an annotator network instead.

    Maps are read from ``<root>/<class folder>/<image stem>.pt`` (the released layout); a missing file is
    an error naming it. Every map must hold the same k and size, so batches stack.

    Args:
        dataset: The image folder (its ``samples`` and ``loader`` are used, not its transform).
        root: Folder of the score maps.
        num_classes: Classes of the score maps.
        img_size, crop_pct, interpolation, mean, std: The evaluation geometry and normalisation.
        hflip: Probability of the horizontal flip.
    """

    def __init__(
        self,
        dataset: DatasetFolder,
        root: str | Path,
        num_classes: int,
        img_size: int,
        crop_pct: float,
        interpolation: str,
        mean: Sequence[float],
        std: Sequence[float],
        hflip: float = 0.5,
    ) -> None:
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.samples: list[tuple[str, int]] = list(dataset.samples)
        self.loader: Callable[[str], Image.Image] = dataset.loader
        self.root = Path(root)
        self.num_classes = num_classes
        self.img_size = img_size
        self.resize = math.floor(img_size / crop_pct)
        self.interpolation = str_to_interp_mode(interpolation)
        self.mean, self.std = list(mean), list(std)
        self.hflip = hflip
        # Fail before training when the folder is not the one the images were labelled in.
        if self.samples:
            self.score_map(self.samples[0][0])

    def map_path(self, image_path: str) -> Path:
        """Score-map file of an image: ``<root>/<class folder>/<image stem>.pt``."""
        image_path = Path(image_path)
        return self.root / image_path.parent.name / f"{image_path.stem}.pt"

    def score_map(self, image_path: str) -> torch.Tensor:
        """The image's stored map (2, k, h, w) float16, checked against ``num_classes``."""
        path = self.map_path(image_path)
        if not path.is_file():
            raise FileNotFoundError(f"no score map {path} for image {image_path} (expected <root>/<class>/<stem>.pt)")
        scores, indices = read_score_map(path)
        if int(indices.max()) >= self.num_classes or int(indices.min()) < 0:
            raise ValueError(
                f"score map {path} has class indices outside 0..{self.num_classes - 1}: wrong num_classes?"
            )
        return torch.stack([scores, indices.float()]).half()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
        path, label = self.samples[index]
        image = TF.resize(self.loader(path), self.resize, interpolation=self.interpolation)
        width, height = image.size
        s = self.img_size
        # torchvision's centre crop offsets, as fractions of the resized (= original) image.
        top, left = int(round((height - s) / 2.0)), int(round((width - s) / 2.0))
        image = TF.normalize(TF.to_tensor(TF.center_crop(image, [s, s])), self.mean, self.std)
        flip = bool(torch.rand(()) < self.hflip)
        if flip:
            image = image.flip(-1)
        geometry = torch.tensor([top / height, left / width, s / height, s / width, float(flip)])
        return image, label, self.score_map(path), geometry


__all__ = ["ScoreMapDataset", "TokenLabelingModule"]
