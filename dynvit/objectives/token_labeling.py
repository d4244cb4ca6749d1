"""Token labeling (Jiang et al., 2021): a soft label for every patch token, and MixToken.

Besides the class loss on the class token, every patch token gets a location-specific soft label from
a *machine annotator* and the model's auxiliary head is trained against it with soft cross-entropy.
**MixToken** cuts a box in the patch-token grid and swaps it between images of the batch (after the
patch embedding); the token labels move with their tokens and the class targets are mixed by the
box area.

Annotators: :class:`TeacherAnnotator` labels a batch with a frozen network's own dense predictions
(the default); :func:`load_token_labels` reads precomputed score maps, one file per image, in the
format the paper released (see there). One training step, in this order::

    token_targets = annotator(images, grid_size)                      # (B, N, C), on the *unmixed* images
    box = sample_token_box(model.patch_embed.grid_size)               # MixToken box, lam ~ Beta(1, 1)
    cls_logits, aux_logits = model(images, mix_box=box)               # LVViT swaps the box's tokens
    token_targets = mix_tokens(token_targets, box)                    # labels move with their tokens
    targets = mix_class_targets(labels, box, num_classes)             # class targets weighted by box area
    loss = token_labeling_loss(cls_logits, aux_logits, targets, token_targets).loss

``mix_tokens`` pairs image ``i`` with image ``B-1-i`` (the batch reversed), so it is its own inverse:
applying it twice with the same box restores the input (use it to move predictions back to their
source images). Do not combine MixToken with pixel-level mixup/CutMix unless the token labels are
mixed the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchvision.ops import roi_align

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
    weight: float = 0.5,
) -> TokenLabelingLoss:
    """``CE(cls_logits, targets) + weight · mean over tokens of soft-CE(aux_logits, token_targets)``.

    Args:
        cls_logits: Class-token logits (B, C).
        aux_logits: Aux-head logits of every patch token (B, N, C).
        targets: Class indices (B,) or soft class targets (B, C), e.g. from :func:`mix_class_targets`.
        token_targets: Soft label of every patch token (B, N, C), rows summing to 1.
        weight: Weight of the token term (0.5 in LV-ViT).
    """
    if aux_logits.shape != token_targets.shape:
        raise ValueError(
            f"aux_logits {tuple(aux_logits.shape)} and token_targets {tuple(token_targets.shape)} must have the "
            "same (B, N, classes) shape; resize the labels to the model's token grid (resize_token_labels)"
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


def resize_token_labels(labels: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """Resample per-token distributions (B, h·w, C) from one token grid to another (B, H·W, C).

    Antialiased bilinear weights are convex, so every output row is still a distribution.
    """
    B, N, C = labels.shape
    rows, cols = src_grid
    if rows * cols != N:
        raise ValueError(f"labels have {N} tokens, not the {rows * cols} of a {rows}x{cols} grid")
    if tuple(src_grid) == tuple(dst_grid):
        return labels
    grid = labels.transpose(1, 2).reshape(B, C, *src_grid)
    grid = F.interpolate(grid, size=tuple(dst_grid), mode="bilinear", align_corners=False, antialias=True)
    return grid.flatten(2).transpose(1, 2)


def dense_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per-patch class logits (B, N, classes) of a network: its own dense head if it has one.

    LV-ViT-like models provide ``forward_dense`` (their aux head); for any other timm ViT the
    classifier is applied to every final patch token, as the paper's annotator applies its classifier
    to every location of a feature map.
    """
    if hasattr(model, "forward_dense"):
        return model.forward_dense(images)[1]
    head = model.get_classifier()
    if not isinstance(head, nn.Module):
        raise TypeError(f"{type(model).__name__} has several classifiers; annotate with a single-head model")
    return head(model.forward_features(images)[:, model.num_prefix_tokens :])


class TeacherAnnotator(nn.Module):
    """Machine annotator from a frozen network: ``softmax(dense logits / temperature)`` per patch token.

    It stays in eval mode and without gradients whatever ``train()`` says, so it can live inside a
    LightningModule (which moves it to the device with the model).

    Args:
        teacher: An LV-ViT (its aux head labels the tokens) or any timm ViT (its classifier does).
        temperature: Softens (> 1) or sharpens (< 1) the labels.
    """

    def __init__(self, teacher: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature

    def train(self, mode: bool = True) -> TeacherAnnotator:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Token labels (B, N, classes) of ``images``, resampled to ``grid_size`` if given and different."""
        probs = (dense_logits(self.teacher, images).float() / self.temperature).softmax(dim=-1)
        if grid_size is not None:
            probs = resize_token_labels(probs, tuple(self.teacher.patch_embed.grid_size), grid_size)
        return probs


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


def score_map_to_token_labels(
    scores: torch.Tensor,
    indices: torch.Tensor,
    num_classes: int,
    grid_size: tuple[int, int],
    crop: tuple[float, float, float, float] | None = None,
    flip: bool = False,
) -> torch.Tensor:
    """Token labels (N, num_classes) of one image's crop from its top-k score map.

    The top-k logits at each location become a distribution by a softmax over those k classes (the rest
    get 0). The map is then cut to the crop the image went through and resampled to the token grid
    with RoI-Align (bin averages, so rows stay distributions), and mirrored if the image was.

    Args:
        scores, indices: Top-k logits and class indices (k, h, w), as from :func:`read_score_map`.
        grid_size: (rows, columns) of the model's patch tokens.
        crop: (top, left, height, width) of the crop as fractions of the full image, e.g. torchvision's
            ``RandomResizedCrop.get_params`` divided by the image size; ``None`` is the whole image.
        flip: The crop was mirrored left-right after cropping.
    """
    if scores.shape != indices.shape or scores.ndim != 3:
        raise ValueError(
            f"scores and indices must both be (k, h, w), got {tuple(scores.shape)}, {tuple(indices.shape)}"
        )
    if int(indices.max()) >= num_classes or int(indices.min()) < 0:
        raise ValueError(f"score map has class indices outside 0..{num_classes - 1}: wrong num_classes?")
    _, h, w = scores.shape
    dense = scores.new_zeros(num_classes, h, w).scatter_(0, indices, scores.float().softmax(dim=0))
    top, left, height, width = crop if crop is not None else (0.0, 0.0, 1.0, 1.0)
    if height <= 0 or width <= 0 or top < 0 or left < 0 or top + height > 1 + 1e-6 or left + width > 1 + 1e-6:
        raise ValueError(f"crop {crop} must be (top, left, height, width) fractions inside the image")
    box = torch.tensor([[0.0, left * w, top * h, (left + width) * w, (top + height) * h]])
    labels = roi_align(dense[None], box, output_size=tuple(grid_size), aligned=True)[0]
    if flip:
        labels = labels.flip(-1)
    return labels.flatten(1).T


def load_token_labels(
    path: str | Path,
    num_classes: int,
    grid_size: tuple[int, int],
    crop: tuple[float, float, float, float] | None = None,
    flip: bool = False,
) -> torch.Tensor:
    """Read a score-map file (:func:`read_score_map`) and align it with the image's crop and flip.

    For a dataset: draw ``i, j, h, w = RandomResizedCrop.get_params(img, scale, ratio)`` and a flip,
    apply them to the image, and pass ``crop=(i / H, j / W, h / H, w / W)`` and ``flip`` here.

    Returns:
        Token labels (N, num_classes), rows summing to 1.
    """
    scores, indices = read_score_map(path)
    return score_map_to_token_labels(scores, indices, num_classes, grid_size, crop=crop, flip=flip)


__all__ = [
    "TeacherAnnotator",
    "TokenBox",
    "TokenLabelingLoss",
    "dense_logits",
    "load_token_labels",
    "mix_class_targets",
    "mix_tokens",
    "read_score_map",
    "resize_token_labels",
    "sample_token_box",
    "score_map_to_token_labels",
    "token_labeling_loss",
]
