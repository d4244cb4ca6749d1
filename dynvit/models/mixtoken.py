"""MixToken (Jiang et al., 2021): swap a box of patch tokens between images of a batch.

The model applies it after its patch embedding (:class:`~dynvit.models.lvvit.LVViT` takes a ``mix_box``);
the token labels move with their tokens (:func:`mix_tokens`) and the class targets are mixed by the box
area (:func:`mix_class_targets`). ``mix_tokens`` pairs image ``i`` with image ``B-1-i`` (the batch
reversed), so it is its own inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TokenBox:
    """A box of the patch-token grid: rows ``top:top+height``, columns ``left:left+width``.

    Args:
        top, left, height, width: The box in token units (it may be empty).
        grid_size: (rows, columns) of the token grid it lives in.
    """

    top: int
    left: int
    height: int
    width: int
    grid_size: tuple[int, int]

    def __post_init__(self) -> None:
        rows, cols = self.grid_size
        if min(self.top, self.left, self.height, self.width) < 0 or (
            self.top + self.height > rows or self.left + self.width > cols
        ):
            raise ValueError(f"{self} does not fit its {rows}x{cols} token grid")

    @property
    def area(self) -> float:
        """Fraction of the grid's tokens inside the box."""
        return self.height * self.width / (self.grid_size[0] * self.grid_size[1])

    def mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean (N,) over the row-major token grid, True inside the box."""
        rows, cols = self.grid_size
        grid = torch.zeros(rows, cols, dtype=torch.bool, device=device)
        grid[self.top : self.top + self.height, self.left : self.left + self.width] = True
        return grid.flatten()


def sample_token_box(grid_size: tuple[int, int], alpha: float = 1.0, lam: float | None = None) -> TokenBox:
    """A random MixToken box, drawn as LV-ViT's official ``rand_bbox`` draws it.

    ``lam ~ Beta(alpha, alpha)``; the box side along each axis is ``int(size · sqrt(1 - lam))``
    (truncated); its centre is uniform over the grid cells (rows first, then columns); its edges are
    ``centre ± side // 2``, clipped to the grid. So an odd side gives a box one token *smaller* than the
    side, and clipping shrinks boxes near the border: :attr:`TokenBox.area` is the exact fraction
    mixed. timm's ``cutmix_bbox_and_lam`` differs (upper edge ``centre + (side + 1) // 2``: a larger
    box, mean area 0.298 instead of 0.271 on a 14×14 grid); see docs/reference.md "Fidelity".

    Uses NumPy's global generator in the official order (beta, row centre, column centre), so the same
    seed gives the official boxes; Lightning's ``seed_everything`` seeds it.

    Args:
        grid_size: (rows, columns) of patch tokens, e.g. ``model.patch_embed.grid_size``.
        alpha: Beta distribution parameter (LV-ViT uses 1: a uniform ``lam``).
        lam: Use this ``lam`` instead of sampling one.
    """
    rows, cols = (int(s) for s in grid_size)
    if lam is None:
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        lam = float(np.random.beta(alpha, alpha))
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    cut = np.sqrt(1.0 - lam)
    cut_rows, cut_cols = int(rows * cut), int(cols * cut)
    centre_row, centre_col = np.random.randint(rows), np.random.randint(cols)
    top, bottom = (int(np.clip(centre_row + d, 0, rows)) for d in (-(cut_rows // 2), cut_rows // 2))
    left, right = (int(np.clip(centre_col + d, 0, cols)) for d in (-(cut_cols // 2), cut_cols // 2))
    return TokenBox(top, left, bottom - top, right - left, (rows, cols))


def mix_tokens(x: torch.Tensor, box: TokenBox) -> torch.Tensor:
    """MixToken: inside ``box``, image ``i`` takes the tokens of image ``B-1-i``.

    Works on anything laid out per patch token: embeddings (B, N, C), token labels (B, N, classes),
    masks (B, N). An involution: ``mix_tokens(mix_tokens(x, box), box)`` is ``x``.

    Args:
        x: Per-token tensor (B, N, …) with N = rows × columns of ``box.grid_size`` (no class token).
    """
    rows, cols = box.grid_size
    if x.ndim < 2 or x.shape[1] != rows * cols:
        raise ValueError(
            f"mix_tokens needs per-patch-token tensors (B, {rows * cols}, ...) for the {rows}x{cols} grid, got "
            f"{tuple(x.shape)}; drop the class token first"
        )
    inside = box.mask(x.device).view(1, -1, *([1] * (x.ndim - 2)))
    return torch.where(inside, x.flip(0), x)


def mix_class_targets(targets: torch.Tensor, box: TokenBox, num_classes: int | None = None) -> torch.Tensor:
    """Class targets after MixToken: ``(1 - area) · y_i + area · y_{B-1-i}`` (B, num_classes).

    Args:
        targets: Class indices (B,) or soft targets (B, num_classes).
        num_classes: Needed for class indices.
    """
    if targets.ndim == 1:
        if num_classes is None:
            raise ValueError("mix_class_targets needs num_classes to one-hot class indices")
        targets = F.one_hot(targets, num_classes).float()
    elif targets.ndim != 2:
        raise ValueError(f"targets must be class indices (B,) or soft targets (B, C), got {tuple(targets.shape)}")
    return (1.0 - box.area) * targets + box.area * targets.flip(0)
