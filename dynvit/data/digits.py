"""Cluttered digits: real 8×8 digit scans placed on a larger cluttered canvas, with a patch mask of the digit.

The embedded default dataset. It needs no download (scikit-learn ships the 1,797 scans of
``sklearn.datasets.load_digits``), trains in minutes on a CPU, and leaves most patches uninformative,
so a token-pruning model has something to prune and its kept tokens can be scored against the mask.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from dynvit.data._common import (
    check_batching,
    followed_img_size,
    loader_kwargs,
    model_data_config,
    resolve_pin_memory,
    trainer_model,
)

# Pixel statistics of the raw canvas (before normalisation) for the default settings, measured over
# 20,000 training samples (seed 0): images are returned as (canvas - DIGITS_MEAN) / DIGITS_STD.
# Other settings (canvas size, clutter) shift them a little; pass ``mean``/``std`` to override.
# The canvas and patch sides without a model to follow.
DEFAULT_IMG_SIZE = 64
DEFAULT_PATCH_SIZE = 8
DIGITS_MEAN = 0.0263
DIGITS_STD = 0.1192

# Scan values are 0..16; after scaling to 0..1 and upscaling, a pixel is digit "ink" above this level.
# Fainter pixels (bilinear fringes) are set to zero so that the image and the patch mask agree exactly.
INK_THRESHOLD = 0.1

# Seed-stream tags: each split draws from its own random stream.
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_NOISE_STREAM = 2**31  # seed tag of the noise bank, apart from every sample key
_NOISE_BANK = 2**18  # noise bank length (1 MiB): that many distinct noise windows


def upscale_glyphs(scans: np.ndarray, scale: int) -> np.ndarray:
    """Scans (n, 8, 8) with values 0..16 → float32 glyphs (n, 8·scale, 8·scale) in [0, 1], bilinear.

    Pixels at or below :data:`INK_THRESHOLD` are zeroed, so every non-zero glyph pixel is ink.
    """
    x = torch.from_numpy(scans.astype(np.float32) / 16.0)[:, None]
    if scale != 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    glyphs = x[:, 0].clamp_(0.0, 1.0).numpy()
    glyphs[glyphs <= INK_THRESHOLD] = 0.0
    return np.ascontiguousarray(glyphs)


def max_patches_spanned(box: int, img_size: int, patch_size: int) -> int:
    """Most patches a ``box``×``box`` square placed anywhere on an ``img_size`` canvas can touch."""
    offsets = np.arange(img_size - box + 1)
    per_axis = int(((offsets + box - 1) // patch_size - offsets // patch_size + 1).max())
    return per_axis * per_axis


class EpochSampler(Sampler[int]):
    """Yields the sample keys of one epoch: ``epoch·n, …, epoch·n + n - 1``.

    Lightning's fit loop calls :meth:`set_epoch` on the training loader's sampler before every epoch
    (also when it is wrapped in Lightning's ``DistributedSamplerWrapper`` under DDP, which forwards the
    call and then shards the keys between ranks). A key fixes a sample, so epoch ``e`` shows the same
    data in every run, resumed or not, and ranks see disjoint keys. Outside Lightning, call
    ``set_epoch`` yourself: without it every pass repeats epoch 0.
    """

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.num_samples
        return iter(range(start, start + self.num_samples))


class ClutteredDigits(Dataset):
    """Renders cluttered-digit samples on demand; sample ``key`` is a pure function of (seed, split, key).

    Drawing order per sample: digit scan, intensity and position first, then clutter, then noise; so
    two datasets that differ only in clutter or noise put the same digit at the same place.

    Args:
        glyphs: Upscaled scans of this split, (n, d, d) float32 in [0, 1] (see :func:`upscale_glyphs`).
        labels: Digit class of each glyph, (n,).
        num_samples: Length reported to samplers; keys beyond it are valid too (later epochs).
        seed: Base seed.
        split: ``"train"``, ``"val"`` or ``"test"``; each has its own random stream.
        img_size: Canvas side in pixels.
        patch_size: Patch side; the mask has ``(img_size // patch_size) ** 2`` entries, row-major.
        num_fragments: Clutter pieces per image: crops of *other* scans of the same split.
        fragment_scale: Range of a fragment's side as a fraction of the digit's side.
        fragment_intensity: Range of a fragment's brightness multiplier.
        digit_intensity: Range of the digit's brightness multiplier.
        noise_std: Std of the Gaussian pixel noise added to the whole canvas.
        mean: Subtracted from the raw canvas.
        std: Divides the centred canvas.
        return_mask: Return ``(image, label, patch_mask)`` instead of ``(image, label)``.
    """

    def __init__(
        self,
        glyphs: np.ndarray,
        labels: np.ndarray,
        num_samples: int,
        seed: int,
        split: str,
        img_size: int,
        patch_size: int,
        num_fragments: int,
        fragment_scale: tuple[float, float],
        fragment_intensity: tuple[float, float],
        digit_intensity: tuple[float, float],
        noise_std: float,
        mean: float,
        std: float,
        return_mask: bool,
    ) -> None:
        if len(glyphs) < 2:
            raise ValueError(
                f"the {split} split needs at least 2 scans (one digit, one for clutter), got {len(glyphs)}"
            )
        self.glyphs = glyphs
        self.labels = labels.astype(np.int64)
        self.num_samples = num_samples
        self.seed = seed
        self.split_code = _SPLIT_CODES[split]
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.digit_size = glyphs.shape[-1]
        d = self.digit_size
        self.fragment_sizes = (max(1, round(fragment_scale[0] * d)), max(1, round(fragment_scale[1] * d)))
        self.num_fragments = num_fragments
        self.fragment_intensity = fragment_intensity
        self.digit_intensity = digit_intensity
        self.noise_std = noise_std
        self.mean = mean
        self.std = std
        self.return_mask = return_mask
        # Noise comes from windows of one fixed bank: drawing 4,096 fresh normals costs more than the
        # rest of a sample, and a random window of a large bank is just as good for mild pixel noise.
        bank_rng = np.random.default_rng((seed, self.split_code, _NOISE_STREAM))
        self.noise_bank = bank_rng.standard_normal(_NOISE_BANK + img_size * img_size, dtype=np.float32)

    def __len__(self) -> int:
        return self.num_samples

    def render(self, key: int) -> tuple[np.ndarray, int, np.ndarray]:
        """Raw canvas (H, W) float32 before normalisation, label, and patch mask (N,) bool for ``key``."""
        rng = np.random.default_rng((self.seed, self.split_code, key))
        n, d, size = len(self.glyphs), self.digit_size, self.img_size
        i = int(rng.integers(n))
        glyph = self.glyphs[i]
        alpha = rng.uniform(*self.digit_intensity)
        r, c = rng.integers(0, size - d + 1, size=2)

        canvas = np.zeros((size, size), dtype=np.float32)
        if self.num_fragments:
            self._paste_fragments(canvas, rng, i, r, c)
        # Fragments never overlap the digit's box, so the digit can simply be written over.
        canvas[r : r + d, c : c + d] = alpha * glyph
        if self.noise_std > 0:
            start = int(rng.integers(_NOISE_BANK))
            canvas += self.noise_std * self.noise_bank[start : start + size * size].reshape(size, size)

        ink = np.zeros((size, size), dtype=bool)
        ink[r : r + d, c : c + d] = glyph > 0
        g, p = self.grid, self.patch_size
        mask = ink.reshape(g, p, g, p).any(axis=(1, 3)).reshape(-1)
        return canvas, int(self.labels[i]), mask

    def _paste_fragments(self, canvas: np.ndarray, rng: np.random.Generator, digit: int, r: int, c: int) -> None:
        # All candidates are drawn at once (numpy calls dominate the cost); a fragment whose box would
        # overlap the digit's box is dropped, and spare candidates (3 per fragment) replace it.
        k, d, size = 3 * self.num_fragments, self.digit_size, self.img_size
        lo, hi = self.fragment_sizes
        f = rng.integers(lo, hi + 1, size=k)
        src = rng.integers(0, len(self.glyphs) - 1, size=k)
        src += src >= digit  # any scan but the digit's own
        crop_rc = (rng.random((k, 2)) * (d - f + 1)[:, None]).astype(np.int64)
        pos = (rng.random((k, 2)) * (size - f + 1)[:, None]).astype(np.int64)
        gain = rng.uniform(*self.fragment_intensity, size=k)
        clear = (pos[:, 0] + f <= r) | (pos[:, 0] >= r + d) | (pos[:, 1] + f <= c) | (pos[:, 1] >= c + d)
        keep = np.flatnonzero(clear)[: self.num_fragments]
        # Python scalars: indexing numpy arrays element by element in the loop costs more than the pasting.
        rows = zip(
            f[keep].tolist(),
            src[keep].tolist(),
            crop_rc[keep].tolist(),
            pos[keep].tolist(),
            gain[keep].tolist(),
            strict=True,
        )
        for fj, sj, (sr, sc), (pr, pc), gj in rows:
            region = canvas[pr : pr + fj, pc : pc + fj]
            np.maximum(region, gj * self.glyphs[sj, sr : sr + fj, sc : sc + fj], out=region)

    def __getitem__(self, key: int) -> tuple:
        canvas, label, mask = self.render(int(key))
        canvas -= self.mean
        canvas /= self.std
        image = torch.from_numpy(canvas)[None]
        # The label stays a Python int: default collation turns a batch of them into one int64 tensor.
        return (image, label, torch.from_numpy(mask)) if self.return_mask else (image, label)


class ClutteredDigitsDataModule(L.LightningDataModule):
    """One real handwritten digit per image on a larger canvas full of clutter; 10 classes, 1 channel.

    Each image holds one scan from ``sklearn.datasets.load_digits`` (1,797 real 8×8 scans, no download),
    upscaled ``digit_scale``× (bilinear) with random brightness, at a random place on an ``img_size``
    canvas; ``num_fragments`` crops of other scans (at most half the digit's side, dimmer) are pasted
    at random places that do not overlap the digit's box, and Gaussian noise is added. Images are
    normalised as ``(canvas - mean) / std`` with :data:`DIGITS_MEAN` = 0.0263, :data:`DIGITS_STD` = 0.1192
    by default (zero mean, unit std for the default settings; background ≈ -0.2, digit strokes up to ≈ 8,
    all values within about [-2.5, 10]).

    **Coverage.** The digit's box spans at most ``max_digit_patches`` patches; with the defaults
    (16 px digit, 64 px canvas, 8 px patches) that is 3×3 = 9 of 64 patches, a fraction of 0.141
    (``max_digit_fraction``; 6.3 patches on average). Settings that allow more than a sixth of the grid
    are refused.

    **Patch mask.** ``(B, N)`` bool, row-major over the ``img_size // patch_size`` grid: a patch is
    True iff a digit pixel above :data:`INK_THRESHOLD` lies in it. Validation, test and predict batches
    are ``(images, labels, patch_mask)``; training batches are ``(images, labels)`` unless
    ``train_patch_mask=True``.

    **Splits and determinism.** The scans are split by source scan (stratified, seeded), so validation
    and test digits never appear in training, not even as clutter. Validation and test samples are fixed
    by ``seed``. Training samples are new every epoch yet a pure function of (seed, epoch, index), via
    :class:`EpochSampler`, so a resumed run sees the same data and DDP ranks see different samples.

    **The model decides the geometry.** :meth:`follow` (called by ``setup()`` with the Trainer's model, and by
    ``cli.py``) takes the canvas side and patch size from the model; explicit values must equal the model's.
    Without a model: 64 px and 8 px patches.

    Args:
        img_size: Canvas side in pixels, a multiple of ``patch_size``; ``None`` follows the model.
        patch_size: Side of the model's patches, for the patch mask; ``None`` follows the model.
        digit_scale: Integer upscaling of the 8×8 scans (2 → 16×16 px).
        num_fragments: Clutter fragments per image.
        fragment_scale: Range of a fragment's side as a fraction of the digit's side.
        fragment_intensity: Range of a fragment's brightness (the digit's is ``digit_intensity``).
        digit_intensity: Range of the digit's brightness, scan values being scaled to [0, 1].
        noise_std: Std of the Gaussian pixel noise, on the [0, 1] scale.
        train_samples_per_epoch: Training samples per epoch.
        num_val: Validation samples.
        num_test: Test samples.
        val_fraction: Fraction of the 1,797 scans held out for validation.
        test_fraction: Fraction of the scans held out for testing.
        train_patch_mask: Also return the patch mask in training batches.
        mean: Normalisation mean of the raw canvas.
        std: Normalisation std of the raw canvas.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory; ``None`` means "when CUDA is available".
        seed: Seed of the scan split and of every sample.
    """

    num_classes: int = 10
    in_chans: int = 1
    class_names: tuple[str, ...] = tuple(str(k) for k in range(10))

    def __init__(
        self,
        img_size: int | None = None,
        patch_size: int | None = None,
        digit_scale: int = 2,
        num_fragments: int = 6,
        fragment_scale: tuple[float, float] = (0.25, 0.5),
        fragment_intensity: tuple[float, float] = (0.3, 0.6),
        digit_intensity: tuple[float, float] = (0.75, 1.0),
        noise_std: float = 0.05,
        train_samples_per_epoch: int = 10_000,
        num_val: int = 1000,
        num_test: int = 1000,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        train_patch_mask: bool = False,
        mean: float = DIGITS_MEAN,
        std: float = DIGITS_STD,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # The geometry is the model's to decide: a None here must not clash with the model's hparam.
        self.save_hyperparameters(ignore=["img_size"])
        self.digit_size = 8 * digit_scale
        self.datasets: dict[str, ClutteredDigits] = {}
        self.requested_geometry = (img_size, patch_size)
        # A size left to the model is checked against the digit once it is known (follow, or setup's
        # defaults without a model): the defaults may not suit a digit_scale meant for the model's size.
        self._set_geometry(
            DEFAULT_IMG_SIZE if img_size is None else img_size,
            DEFAULT_PATCH_SIZE if patch_size is None else patch_size,
            check=None not in self.requested_geometry,
        )
        if not (0 < fragment_scale[0] <= fragment_scale[1] <= 1):
            raise ValueError(f"fragment_scale must satisfy 0 < low <= high <= 1, got {fragment_scale}")
        if min(val_fraction, test_fraction) <= 0 or val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be > 0, sum < 1")
        for name in ("train_samples_per_epoch", "num_val", "num_test"):
            if getattr(self.hparams, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self.hparams, name)}")
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        check_batching(batch_size, num_workers)
        self.batch_size = batch_size
        self.num_workers = num_workers
        if train_samples_per_epoch < batch_size:
            raise ValueError(
                f"train_samples_per_epoch ({train_samples_per_epoch}) < batch_size ({batch_size}): training drops the last partial batch, so no batch would remain"
            )
        self.pin_memory = resolve_pin_memory(pin_memory)
        self.seed = seed
        self.split_scans: dict[str, np.ndarray] = {}

    def _set_geometry(self, img_size: int, patch_size: int, check: bool = True) -> None:
        """Set the canvas and patch sides (and what follows from them: the patch count, coverage);
        with ``check``, first make sure the digit suits them."""
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        num_patches = (img_size // patch_size) ** 2
        max_digit_patches = max_patches_spanned(min(self.digit_size, img_size), img_size, patch_size)
        if check and (self.hparams.digit_scale < 1 or self.digit_size > img_size):
            raise ValueError(
                f"digit_scale={self.hparams.digit_scale} gives a {self.digit_size} px digit; need 1 <= it <= img_size"
            )
        if check and max_digit_patches / num_patches > 1 / 6:
            raise ValueError(
                f"a {self.digit_size} px digit can cover {max_digit_patches} of {num_patches} patches "
                f"({max_digit_patches / num_patches:.2f}) at img_size {img_size}, patch_size {patch_size}; keep it "
                "at most 1/6 with a smaller digit_scale, a larger img_size or a smaller patch_size"
            )
        if self.datasets and (img_size, patch_size) != (self.img_size, self.patch_size):
            self.datasets = {}  # made for another geometry: setup() makes them again
        self.img_size, self.patch_size = img_size, patch_size
        self.num_patches, self.max_digit_patches = num_patches, max_digit_patches
        self.max_digit_fraction = max_digit_patches / num_patches

    def follow(self, model: nn.Module) -> None:
        """Draw canvases and patch masks for ``model`` (a network, or a LightningModule with ``net``): its
        input size and patch size, which an explicit ``img_size``/``patch_size`` must equal.

        Raises:
            ValueError: an explicit size differs from the model's, or the model's geometry does not suit the
                digits (e.g. a digit would cover more than a sixth of the patches).
        """
        config = model_data_config(model)
        if config is None:
            return
        owner = type(self).__name__
        img_size = followed_img_size(self.requested_geometry[0], config, self.in_chans, owner)
        patch, requested = config.patch_size, self.requested_geometry[1]
        if patch is None:  # no patch tokens to follow: the mask keeps the DataModule's own grid
            patch = (self.patch_size, self.patch_size)
        if patch[0] != patch[1] or (requested is not None and requested != patch[0]):
            raise ValueError(
                f"{owner} has patch_size={requested} but the model's patches are {patch[0]}x{patch[1]}: drop the "
                "DataModule's patch_size (it follows the model)"
            )
        self._set_geometry(img_size, patch[0])

    def split_indices(self) -> dict[str, np.ndarray]:
        """Indices into ``load_digits()`` of the scans of each split (stratified by class, seeded)."""
        targets = load_digits().target
        hp = self.hparams
        idx = np.arange(len(targets))
        rest, test = train_test_split(idx, test_size=hp.test_fraction, stratify=targets, random_state=self.seed)
        val_share = hp.val_fraction / (1 - hp.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, stratify=targets[rest], random_state=self.seed)
        return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}

    def setup(self, stage: str | None = None) -> None:
        model = trainer_model(self)
        if model is not None:
            self.follow(model)
        if self.datasets:
            return
        self._set_geometry(self.img_size, self.patch_size)
        digits = load_digits()
        glyphs = upscale_glyphs(digits.images, self.hparams.digit_scale)
        self.split_scans = self.split_indices()
        hp = self.hparams
        sizes = {"train": hp.train_samples_per_epoch, "val": hp.num_val, "test": hp.num_test}
        for split, scans in self.split_scans.items():
            self.datasets[split] = ClutteredDigits(
                glyphs[scans],
                digits.target[scans],
                num_samples=sizes[split],
                seed=self.seed,
                split=split,
                img_size=self.img_size,
                patch_size=self.patch_size,
                num_fragments=hp.num_fragments,
                fragment_scale=tuple(hp.fragment_scale),
                fragment_intensity=tuple(hp.fragment_intensity),
                digit_intensity=tuple(hp.digit_intensity),
                noise_std=hp.noise_std,
                mean=hp.mean,
                std=hp.std,
                return_mask=split != "train" or hp.train_patch_mask,
            )

    def _loader(self, split: str, **kwargs) -> DataLoader:
        if not self.datasets:
            raise RuntimeError("call setup() before asking for dataloaders")
        return DataLoader(
            self.datasets[split], **loader_kwargs(self.batch_size, self.num_workers, self.pin_memory), **kwargs
        )

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSampler(self.hparams.train_samples_per_epoch)
        return self._loader("train", sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
