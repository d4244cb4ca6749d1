"""Token labeling (Jiang et al., 2021): a soft label for every patch token, and MixToken.

Besides the class loss on the class token, every patch token gets a location-specific soft label from
a *machine annotator* and the model's auxiliary head is trained against it with soft cross-entropy.
**MixToken** cuts a box in the patch-token grid and swaps it between images of the batch (after the
patch embedding); the token labels move with their tokens and the class targets are mixed by the
box area.

Targets, as the official training script (``zihangJiang/TokenLabeling``) makes them from the
annotator's dense score map (top-k scores and class indices at every location of the image), the
default ``token_targets="official"``:

- the top-k scores are scattered into zeros over all classes, the map is RoI-aligned to the crop the
  image went through (the token grid for token targets, one bin for the class target), and a softmax
  over *all* classes follows, then label smoothing ε: ``p · (1 − ε + ε/C) + ε/C`` (so a target sums to
  1 + ε/C, as there);
- the class target is the annotator's soft label of the whole crop (``class_target="official"``);
  ``"official_ground_truth"`` is the script's ``--ground-truth`` blend with the true label.

dynvit's earlier variants stay as options, named as ours: ``token_targets="dynvit"`` takes the softmax
over the stored top-k classes first and applies no smoothing, ``class_target="dynvit_label"`` uses the
smoothed true label. The token term's weight is 1.0, the script's ``--dense-weight``. Where dynvit
departs from the official code (its RoI-Align boxes swap rows and columns): docs/reference.md,
"Fidelity".

Annotators: :class:`TeacherAnnotator` labels a batch with a frozen network's dense predictions (its
top-k logits at every patch, the same score map the released label files hold); :func:`read_score_map`
reads precomputed score maps, one file per image, in the released format. One training step::

    targets = annotator(images, grid_size)                            # AnnotatorTargets, unmixed images
    box = sample_token_box(model.patch_embed.grid_size)               # MixToken box, lam ~ Beta(1, 1)
    cls_logits, aux_logits = model(images, mix_box=box)               # LVViT swaps the box's tokens
    token_targets = mix_tokens(targets.tokens, box)                   # labels move with their tokens
    class_targets = mix_class_targets(targets.cls, box)               # class targets weighted by box area
    loss = token_labeling_loss(cls_logits, aux_logits, class_targets, token_targets).loss

``mix_tokens`` pairs image ``i`` with image ``B-1-i`` (the batch reversed), so it is its own inverse:
applying it twice with the same box restores the input (the official model un-mixes its dense output
that way; mixing the targets instead gives the same loss). Do not combine MixToken with pixel-level
mixup/CutMix unless the token labels are mixed the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchvision.ops import roi_align

from dynvit.models.contract import DensePredicting
from dynvit.models.mixtoken import TokenBox, mix_class_targets, mix_tokens, sample_token_box


class TokenLabelingLoss(NamedTuple):
    """The token-labeling objective and its two terms (log them one by one)."""

    loss: torch.Tensor
    cls_loss: torch.Tensor
    token_loss: torch.Tensor


def token_labeling_loss(
    cls_logits: torch.Tensor,
    aux_logits: torch.Tensor,
    targets: torch.Tensor,
    token_targets: torch.Tensor,
    weight: float = 1.0,
) -> TokenLabelingLoss:
    """``CE(cls_logits, targets) + weight · mean over tokens of soft-CE(aux_logits, token_targets)``.

    Args:
        cls_logits: Class-token logits (B, C).
        aux_logits: Aux-head logits of every patch token (B, N, C).
        targets: Class indices (B,) or soft class targets (B, C), e.g. from :func:`mix_class_targets`.
        token_targets: Soft label of every patch token (B, N, C).
        weight: Weight of the token term (1.0: the official script's ``--dense-weight`` default).
    """
    if aux_logits.shape != token_targets.shape:
        raise ValueError(
            f"aux_logits {tuple(aux_logits.shape)} and token_targets {tuple(token_targets.shape)} must have the "
            "same (B, N, classes) shape; make the targets on the model's token grid (grid_size)"
        )
    if aux_logits.ndim != 3 or cls_logits.shape != (aux_logits.shape[0], aux_logits.shape[-1]):
        raise ValueError(
            f"expected cls_logits (B, C) and aux_logits (B, N, C), got {tuple(cls_logits.shape)} and "
            f"{tuple(aux_logits.shape)}"
        )
    soft_ce = SoftTargetCrossEntropy()
    cls_loss = F.cross_entropy(cls_logits, targets) if targets.ndim == 1 else soft_ce(cls_logits, targets)
    token_loss = soft_ce(aux_logits, token_targets)
    return TokenLabelingLoss(cls_loss + weight * token_loss, cls_loss, token_loss)


# How token (and annotator class) targets are made from a score map: the official script's way, or
# dynvit's earlier one (softmax over the stored classes first, no smoothing).
TOKEN_TARGETS = ("official", "dynvit")
# The class target: the annotator's soft label of the crop (official), the official --ground-truth
# blend of it with the true label, or dynvit's earlier smoothed true label.
CLASS_TARGETS = ("official", "official_ground_truth", "dynvit_label")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the choices unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def smooth(probs: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing as the official script applies it to an annotator's distribution:
    ``p · (1 − ε + ε/C) + ε/C``, which sums to 1 + ε/C (true labels are smoothed by :func:`smoothed_labels`).
    """
    off = smoothing / probs.shape[-1]
    return probs * (1.0 - smoothing + off) + off


def smoothed_labels(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Smoothed one-hot targets (B, num_classes) of class indices (B,): 1 − ε + ε/C on the class, ε/C elsewhere."""
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + smoothing / num_classes


def blend_with_ground_truth(cls_targets: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """The official ``--ground-truth`` class target: the annotator's label blended with the true one.

    ``r · annotator + (1 − r) · smoothed true label``, with r = 0.5 where the two agree on the top class
    and 0.9 where they do not (the script's ``0.9 − 0.4 · [argmax agree]``).
    """
    truth = smoothed_labels(labels, cls_targets.shape[-1], smoothing)
    ratio = (0.9 - 0.4 * (truth.argmax(-1) == cls_targets.argmax(-1)).float()).unsqueeze(-1)
    return cls_targets * ratio + truth * (1 - ratio)


class AnnotatorTargets(NamedTuple):
    """What a machine annotator says about a batch of (cropped) images.

    Attributes:
        cls: Soft label of each whole crop (B, C): the official class target.
        tokens: Soft label of every patch token (B, N, C), row-major over the token grid.
    """

    cls: torch.Tensor
    tokens: torch.Tensor


def annotator_targets(
    scores: torch.Tensor,
    indices: torch.Tensor,
    num_classes: int,
    grid_size: tuple[int, int],
    crops: torch.Tensor | None = None,
    flips: torch.Tensor | None = None,
    token_targets: str = "official",
    smoothing: float = 0.1,
) -> AnnotatorTargets:
    """Class and token targets of a batch of crops from the annotator's score maps of the whole images.

    ``token_targets="official"``: the scores are scattered into zeros over all classes, RoI-aligned to
    the crop (``grid_size`` bins for the tokens, one bin for the class target), then a softmax over
    all classes and :func:`smooth`. ``"dynvit"``: a softmax over the k stored classes first, then
    scattered and RoI-aligned (bin averages of distributions, so rows sum to 1), no smoothing.

    RoI-Align boxes are (x1, y1, x2, y2) = (left, top, right, bottom) in map cells, pixel-centre aligned.
    The official script passes (top, left, bottom, right) there, rows and columns swapped; dynvit does
    not copy that (docs/reference.md, "Fidelity").

    Args:
        scores, indices: Top-k scores and their class indices (B, k, h, w) over the whole image; k may be
            ``num_classes`` (a full map).
        num_classes: Classes of the targets.
        grid_size: (rows, columns) of the model's patch tokens.
        crops: (B, 4) crop of each image as fractions of the whole image: (top, left, height, width),
            e.g. torchvision's ``RandomResizedCrop.get_params`` divided by the image size; ``None``: the
            whole image.
        flips: (B,) bool: the crop was mirrored left-right after cropping; ``None``: no flips.
        token_targets: One of :data:`TOKEN_TARGETS`.
        smoothing: Label smoothing ε of the official targets.
    """
    check_choice("token_targets", token_targets, TOKEN_TARGETS)
    if scores.shape != indices.shape or scores.ndim != 4:
        raise ValueError(
            f"scores and indices must both be (B, k, h, w), got {tuple(scores.shape)}, {tuple(indices.shape)}"
        )
    if int(indices.max()) >= num_classes or int(indices.min()) < 0:
        raise ValueError(f"score map has class indices outside 0..{num_classes - 1}: wrong num_classes?")
    B, _, h, w = scores.shape
    values = scores.float() if token_targets == "official" else scores.float().softmax(dim=1)
    dense = values.new_zeros(B, num_classes, h, w).scatter_(1, indices.long(), values)
    if crops is None:
        crops = dense.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(B, 4)
    crops = crops.to(dense)
    top, left, height, width = crops.unbind(1)
    if (
        (height <= 0).any()
        or (width <= 0).any()
        or (crops[:, :2] < 0).any()
        or ((top + height > 1 + 1e-6) | (left + width > 1 + 1e-6)).any()
    ):
        raise ValueError(f"crops {crops.tolist()} must be (top, left, height, width) fractions inside the image")
    batch = torch.arange(B, device=dense.device, dtype=dense.dtype)
    boxes = torch.stack([batch, left * w, top * h, (left + width) * w, (top + height) * h], dim=1)
    tokens = roi_align(dense, boxes, output_size=tuple(grid_size), aligned=True)
    whole = roi_align(dense, boxes, output_size=(1, 1), aligned=True)[:, :, 0, 0]
    if flips is not None:
        tokens = torch.where(flips.view(B, 1, 1, 1).to(tokens.device), tokens.flip(-1), tokens)
    tokens = tokens.flatten(2).transpose(1, 2)
    if token_targets == "official":
        tokens, whole = smooth(tokens.softmax(dim=-1), smoothing), smooth(whole.softmax(dim=-1), smoothing)
    return AnnotatorTargets(whole, tokens)


def dense_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per-patch class logits (B, N, classes) of a network: its own dense head if it has one.

    LV-ViT-like models provide ``forward_dense`` (their aux head); for any other timm ViT the
    classifier is applied to every final patch token, as the paper's annotator applies its classifier
    to every location of a feature map.
    """
    if isinstance(model, DensePredicting):
        return model.forward_dense(images)[1]
    head = model.get_classifier()
    if not isinstance(head, nn.Module):
        raise TypeError(f"{type(model).__name__} has several classifiers; annotate with a single-head model")
    return head(model.forward_features(images)[:, model.num_prefix_tokens :])


class TeacherAnnotator(nn.Module):
    """Machine annotator from a frozen network: its dense logits, kept as a top-k score map.

    The network labels the images the model sees (already cropped), so the score map covers the whole
    input and is RoI-aligned to the model's token grid; the targets are then made as from a released
    label file (:func:`annotator_targets`). It stays in eval mode and without gradients whatever
    ``train()`` says, so it can live inside a LightningModule (which moves it to the device with the model).

    Args:
        teacher: An LV-ViT (its aux head labels the tokens) or any timm ViT (its classifier does).
        temperature: The logits are divided by it: softens (> 1) or sharpens (< 1) the labels.
        topk: Classes kept per location (5, as the released label files); ``None`` keeps all.
        token_targets: One of :data:`TOKEN_TARGETS`.
        smoothing: Label smoothing ε of the official targets.
    """

    def __init__(
        self,
        teacher: nn.Module,
        temperature: float = 1.0,
        topk: int | None = 5,
        token_targets: str = "official",
        smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if topk is not None and topk < 1:
            raise ValueError(f"topk must be >= 1 or None (all classes), got {topk}")
        check_choice("token_targets", token_targets, TOKEN_TARGETS)
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.topk = temperature, topk
        self.token_targets, self.smoothing = token_targets, smoothing

    def train(self, mode: bool = True) -> TeacherAnnotator:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def score_map(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k logits and class indices (B, k, h, w) on its own token grid."""
        logits = dense_logits(self.teacher, images).float() / self.temperature
        B, _, C = logits.shape
        h, w = self.teacher.patch_embed.grid_size
        if self.topk is None or self.topk >= C:
            scores, indices = logits, torch.arange(C, device=logits.device).expand_as(logits)
        else:
            scores, indices = logits.topk(self.topk, dim=-1)
        return scores.transpose(1, 2).reshape(B, -1, h, w), indices.transpose(1, 2).reshape(B, -1, h, w)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid_size: tuple[int, int] | None = None) -> AnnotatorTargets:
        """Class and token targets of ``images`` on ``grid_size`` (default: the teacher's own grid)."""
        scores, indices = self.score_map(images)
        grid = tuple(grid_size) if grid_size is not None else tuple(self.teacher.patch_embed.grid_size)
        num_classes = self.teacher.get_classifier().out_features
        return annotator_targets(
            scores, indices, num_classes, grid, token_targets=self.token_targets, smoothing=self.smoothing
        )


def read_score_map(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k scores and class indices of a precomputed dense score map, each (k, h, w).

    File format (the one LV-ViT released for ImageNet, NFNet-F6 at 576 px: k = 5, 18×18): one ``.pt``
    file per image, ``<root>/<class folder>/<image stem>.pt``, holding a single tensor (2, k, h, w),
    usually float16: ``[0]`` the annotator's top-k logits at each location, ``[1]`` their class indices
    (stored as floats, exact up to 2048 classes).
    """
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, torch.Tensor) or data.ndim != 4 or data.shape[0] != 2:
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"{path} is not a score map: expected one tensor (2, k, h, w), got {shape}")
    return data[0].float(), data[1].round().long()


def load_token_labels(
    path: str | Path,
    num_classes: int,
    grid_size: tuple[int, int],
    crop: tuple[float, float, float, float] | None = None,
    flip: bool = False,
    token_targets: str = "official",
    smoothing: float = 0.1,
) -> AnnotatorTargets:
    """Read one image's score-map file (:func:`read_score_map`) and make its targets for a crop and flip.

    For a dataset: draw ``i, j, h, w = RandomResizedCrop.get_params(img, scale, ratio)`` and a flip,
    apply them to the image, and pass ``crop=(i / H, j / W, h / H, w / W)`` and ``flip`` here.

    Returns:
        :class:`AnnotatorTargets` of the one image: ``cls`` (num_classes,), ``tokens`` (N, num_classes).
    """
    scores, indices = read_score_map(path)
    crops = None if crop is None else torch.tensor([crop], dtype=torch.float32)
    flips = torch.tensor([flip])
    targets = annotator_targets(
        scores[None], indices[None], num_classes, grid_size, crops, flips, token_targets, smoothing
    )
    return AnnotatorTargets(targets.cls[0], targets.tokens[0])


__all__ = [
    "CLASS_TARGETS",
    "TOKEN_TARGETS",
    "AnnotatorTargets",
    "TeacherAnnotator",
    "TokenBox",
    "TokenLabelingLoss",
    "annotator_targets",
    "blend_with_ground_truth",
    "dense_logits",
    "load_token_labels",
    "mix_class_targets",
    "mix_tokens",
    "read_score_map",
    "sample_token_box",
    "smooth",
    "smoothed_labels",
    "token_labeling_loss",
]
