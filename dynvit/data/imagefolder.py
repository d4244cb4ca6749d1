"""ImageNet-layout image folders (``root/train/<class>/*``, ``root/val/<class>/*``) with timm's transforms."""

from __future__ import annotations

import colorsys
import difflib
import os
from collections.abc import Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import Compose

from dynvit.data._common import (
    ShuffleSampler,
    check_batching,
    followed_img_size,
    loader_kwargs,
    model_data_config,
    resolve_pin_memory,
    trainer_model,
)

PREPROCESSING = ("mean", "std", "interpolation", "crop_pct")  # settings taken from the model unless given
_MAX_LISTED = 10  # files or classes named in one error message
DEFAULT_IMG_SIZE = 224  # without a model to follow
_ANNOUNCED_CHECK = 10_000  # images: a check this long says what it is doing
_CHECK_CHUNK = 64  # files per task of the image check: few tasks for a million files, all threads busy for a hundred
# Resize interpolations timm's transforms take by name (timm.data.transforms.str_to_interp_mode).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
# Fills of timm's RandomErasing (case-insensitive).
RE_MODES = ("pixel", "rand", "const")


# Modes of one channel wider than 8 bits: 16-bit PNG/TIFF open as I;16*, some as 32-bit I.
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_rgb(path: str) -> Image.Image:
    """Open ``path`` as an 8-bit RGB PIL image; any failure is re-raised as an ``OSError`` naming the file.

    16-bit greyscale images are scaled to 8 bits (``convert("RGB")`` would clip them, turning most
    pixels white); images of other modes that 8 bits cannot hold (32-bit integer values beyond 16 bits,
    floating point) are refused.
    """
    try:
        return _read_rgb(path)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise OSError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def _read_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        if img.mode in _WIDE_GREY:
            return _wide_grey_to_rgb(img, path)
        if img.mode == "F":
            raise ValueError("floating-point pixels (mode F) have no fixed range to scale to 8 bits")
        return img.convert("RGB")  # decodes every pixel: a truncated file fails here


def _unreadable(paths: Sequence[str]) -> list[str]:
    """``path (error)`` for each of ``paths`` that :func:`load_rgb` cannot read."""
    bad = []
    for path in paths:
        try:
            _read_rgb(path)
        except Exception as e:  # whatever PIL raises, the loader would stop on this file
            bad.append(f"{path} ({type(e).__name__}: {e})")
    return bad


def unreadable_images(paths: Sequence[str], threads: int | None = None) -> list[str]:
    """Decode every image of ``paths`` in full, as the loader will, on ``threads`` threads (default: one
    per CPU this process may use; Pillow decodes without holding the GIL); ``path (error)`` for each
    file that fails, in the order of ``paths``."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    chunks = [paths[i : i + _CHECK_CHUNK] for i in range(0, len(paths), _CHECK_CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(chunks)))) as pool:
        return [entry for bad in pool.map(_unreadable, chunks) for entry in bad]


def _wide_grey_to_rgb(img: Image.Image, path: str) -> Image.Image:
    pixels = np.asarray(img)
    if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 65535:
        raise ValueError(f"mode {img.mode} with values outside 0..65535: not a 16-bit image that can be scaled")
    # 65535 / 257 = 255: the full 16-bit range onto the full 8-bit range.
    grey = np.round(pixels.astype(np.float64) / 257.0).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's auto-augment posterize, with the meaning that keeping 0 bits had before Pillow 13: black.

    RandAugment's ``PosterizeIncreasing`` keeps ``4 - int(4 * magnitude / 10)`` bits, 0 at magnitude 10,
    which ``rand-m9-mstd0.5`` reaches (a magnitude drawn from N(9, 0.5²), clipped to 10) for 2.3 % of the
    posterize draws; AutoAugment's ``v0`` policies keep 0 bits at magnitude 2. Pillow up to 12 masked
    every channel value with ``~(2 ** (8 - bits) - 1)``, which is 0 for ``bits <= 0``; Pillow 13 raises
    ``ValueError`` instead. Other bit counts go to timm's op unchanged.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def with_old_posterize(transform: Compose) -> Compose:
    """``transform`` (timm's ``create_transform`` output) with every auto-augment posterize op replaced by
    :func:`posterize`, in place: the augmentation the recipes were tuned with, on any Pillow."""
    for step in transform.transforms:
        if isinstance(step, (auto_augment.RandAugment, auto_augment.AugMixAugment)):
            ops = step.ops
        elif isinstance(step, auto_augment.AutoAugment):
            ops = [op for sub_policy in step.policy for op in sub_policy]
        else:
            continue
        for op in ops:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize
    return transform


class UnlabelledImages(Dataset):
    """Every image file under ``root``, at any depth, in sorted path order: the predict set of a folder of
    images without labels. Items are transformed images; ``files`` lists the paths in item order.

    Args:
        root: The folder.
        transform: Applied to each RGB image.
    """

    def __init__(self, root: str | Path, transform=None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"predict_root {self.root} does not exist or is not a folder")
        self.files = sorted(
            str(p)
            for p in self.root.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMG_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
        )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image = load_rgb(self.files[index])
        return self.transform(image) if self.transform is not None else image


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(str(i) for i in items[:_MAX_LISTED])
    return shown + (f", … ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _visible_image(split_dir: Path):
    """Whether a file under ``split_dir`` is an image the split holds: an image extension, and no part of its
    path below ``split_dir`` hidden (a macOS ``._x.png`` AppleDouble file, a ``.ipynb_checkpoints`` copy),
    as for ``predict_root``."""

    def valid(path: str) -> bool:
        parts = Path(os.path.relpath(path, split_dir)).parts
        return has_file_allowed_extension(path, IMG_EXTENSIONS) and not any(p.startswith(".") for p in parts)

    return valid


def _choice(name: str, value: str, choices: Sequence[str]) -> None:
    """``ValueError`` naming ``name``, the choices and the nearest one unless ``value`` is one of them."""
    if value in choices:
        return
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ValueError(f"{name} {value!r}: choose from {', '.join(choices)}{hint}")


def _check_fraction(name: str, value: float, low_open: bool = False) -> None:
    """``ValueError`` unless ``value`` is in [0, 1] ((0, 1] with ``low_open``); NaN is refused too."""
    inside = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not inside:
        raise ValueError(f"{name} must be in {'(0' if low_open else '[0'}, 1], got {value}")


def check_augmentation(
    crop_pct: float | None,
    interpolation: str | None,
    auto_augment: str | None,
    re_prob: float,
    re_mode: str,
    re_count: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    hflip: float,
    color_jitter: float,
) -> None:
    """``ValueError`` naming the option and its valid values for each setting timm would refuse only when
    the transforms are built (a ``KeyError``, a bare assertion) or would take silently (a ``crop_pct`` of 0
    becomes 0.875, a probability above 1 means always)."""
    if crop_pct is not None:
        _check_fraction("crop_pct (the centre crop's share of the resized image)", crop_pct, low_open=True)
    if interpolation is not None:
        _choice("interpolation", interpolation, INTERPOLATIONS)
    _check_fraction("re_prob (the random-erasing probability)", re_prob)
    _choice("re_mode", str(re_mode).lower(), RE_MODES)
    if re_count < 1:
        raise ValueError(f"re_count (random-erasing regions per image) must be >= 1, got {re_count}")
    _check_fraction("hflip (the horizontal-flip probability)", hflip)
    if not color_jitter >= 0:
        raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
    low, high = scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(
            f"scale (the random crop's area range, as a share of the image) must be [min, max] with "
            f"0 < min <= max <= 1, got [{low}, {high}]: e.g. [0.08, 1.0]"
        )
    low, high = ratio
    if not 0.0 < low <= high:
        raise ValueError(
            f"ratio (the random crop's aspect-ratio range) must be [min, max] with 0 < min <= max, got "
            f"[{low}, {high}]: e.g. [0.75, 1.3333]"
        )
    if auto_augment:
        # timm parses the policy only as it builds the transform, with a bare assertion on a mistake.
        try:
            create_transform(DEFAULT_IMG_SIZE, is_training=True, auto_augment=auto_augment)
        except Exception as e:  # AssertionError, KeyError, ValueError: whatever timm's parser raises
            raise ValueError(
                f"auto_augment {auto_augment!r} is not a timm augmentation policy ({type(e).__name__}: {e}): use "
                "e.g. 'rand-m9-mstd0.5-inc1' (RandAugment, DeiT's), 'augmix-m5-w4-d2', 'original', 'v0' or '3a', "
                "or null for none"
            ) from e


def _class_folders(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"{split_dir} is missing: expected the ImageNet layout {split_dir.parent}/{{train,val}}/<class>/<image>"
        )
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{split_dir} holds no class folders: expected {split_dir}/<class>/<image>")
    return classes


class ImageFolderDataModule(L.LightningDataModule):
    """Images in class folders, ImageNet style: ``root/train/<class>/*`` and ``root/val/<class>/*``.

    ``test`` uses ``root/test`` when it exists, else the val split; ``predict`` uses the same, or every image
    under ``predict_root`` (any nesting, no labels: batches are images alone). Training uses timm's
    ``create_transform`` augmentation (random resized crop, flip, RandAugment, random erasing; colour
    jitter only without ``auto_augment``, as in timm; posterize keeps the meaning that 0 bits had before
    Pillow 13, a black image, where Pillow 13 raises: see :func:`posterize`); evaluation resizes to
    ``img_size / crop_pct`` and centre-crops ``img_size``. Batches are ``(images, labels)``
    with labels indexing the sorted class folder names (``class_names``). Images are read as RGB, so
    ``in_chans`` is 3. Files whose extension is not an image one (torchvision's ``IMG_EXTENSIONS``: ``.jpg``,
    ``.jpeg``, ``.png``, ``.ppm``, ``.bmp``, ``.pgm``, ``.tif``, ``.tiff``, ``.webp``, in any case; not ``.gif``)
    are ignored, and so are hidden files and folders (names starting with ``.``, such as macOS's ``._x.png``).

    **Errors, all raised by** ``setup()`` **before any training**: ``FileNotFoundError`` when ``root``, its
    ``train`` or ``val`` folder is missing, or a split holds no class folders or no images;
    ``ValueError`` when train and val (or test) class folders differ (the differences are listed), when
    ``train`` holds a single class folder, when a training class folder holds no images, when the training
    set has fewer images than ``batch_size`` (the last partial batch is dropped, so none would remain), or
    when an image file cannot be decoded. Augmentation and preprocessing options out of range (``crop_pct``,
    ``interpolation``, ``auto_augment``, ``re_*``, ``scale``, ``ratio``, ``hflip``, ``color_jitter``) are a
    ``ValueError`` naming the option as the DataModule is built. A val or test class
    folder without images is a warning naming it (a small evaluation set may lack a class; usually it
    is a copy that failed).

    **Image modes.** Images are read as 8-bit RGB; 16-bit greyscale files (PNG mode ``I;16``) are
    scaled to 8 bits, and modes that cannot be scaled (floating point) are an error naming the file.

    **Unreadable images.** With ``verify_images=True`` (default), ``setup()`` decodes every image file of
    the splits it prepares, in full and exactly as the loader will (:func:`load_rgb`), on one thread per
    CPU, and fails naming the files that do not decode: a truncated JPEG (a copy cut short) has a valid
    header, so a header check would pass it and training would stop on it mid-epoch. Decoding costs
    about 3 ms of CPU for a 640×427 JPEG: seconds for ten thousand photos; for ImageNet's 1.3 M files,
    about an hour of CPU, minutes on a many-core machine. Turn it off (``verify_images=False``) for very large sets
    once they are known to be clean; a file that cannot be decoded then makes the loader raise an
    ``OSError`` naming the file: a bad file is never silently skipped.

    **The model decides the input.** :meth:`follow` (called by ``setup()`` with the Trainer's model, and by
    ``cli.py`` right after building both) takes the model's input size and its weights' preprocessing
    (``mean``/``std``, ``interpolation``, ``crop_pct``: timm's ``pretrained_cfg`` of the model) for every
    setting left at ``None``. An explicit ``img_size`` that differs from the model's is an error naming both;
    explicit preprocessing values override the model's. Without a model: 224 px and ImageNet's settings.
    A model whose ``mean``/``std`` are not RGB ones (the one-channel digits models) needs explicit RGB values;
    the error says so. Checkpoints store the preprocessing used (:meth:`state_dict`), and ``cli.py
    validate``/``test``/``predict`` reuse it for every setting left at ``None``.

    ``num_classes`` is known right after construction (it lists ``root/train``) so that a CLI can size the
    model from it. To predict on ``predict_root`` without the training set, leave ``root`` unset and give
    ``num_classes`` (``cli.py predict`` takes it from the checkpoint); class names then come from the
    checkpoint too.

    Args:
        root: Folder holding ``train``, ``val`` and optionally ``test``.
        predict_root: A folder of unlabelled images (any nesting) to predict on instead of test/val.
        num_classes: The class count when there is no ``root`` (predicting only).
        img_size: Side of the (square) model input; ``None`` follows the model.
        mean: Per-channel normalisation mean; ``None``: the model's.
        std: Per-channel normalisation std; ``None``: the model's.
        crop_pct: Evaluation centre-crop fraction; ``None``: the model's (timm's 0.875 without one).
        interpolation: Resize interpolation; ``None``: the model's (``"bicubic"`` without one).
        auto_augment: timm auto-augment policy, e.g. ``"rand-m9-mstd0.5-inc1"`` (DeiT's); ``None`` for none.
        re_prob: Random-erasing probability.
        re_mode: Random-erasing fill, ``"pixel"`` (per-pixel noise), ``"rand"`` or ``"const"``.
        re_count: Random-erasing regions per image.
        scale: Area range of the random resized crop.
        ratio: Aspect-ratio range of the random resized crop.
        hflip: Horizontal flip probability.
        color_jitter: Colour-jitter strength (only used when ``auto_augment`` is ``None``).
        verify_images: Decode every image file in ``setup()`` (see above).
        batch_size: Samples per batch (per device).
        num_workers: DataLoader worker processes (persistent when > 0).
        pin_memory: Pin host memory; ``None`` means "when CUDA is available".
        seed: Seed of the training order (each epoch's order is fixed by (seed, epoch)).
    """

    in_chans: int = 3

    def __init__(
        self,
        root: str | Path | None = None,
        img_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        re_mode: str = "pixel",
        re_count: int = 1,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float = 0.4,
        verify_images: bool = True,
        batch_size: int = 128,
        num_workers: int = 4,
        pin_memory: bool | None = None,
        seed: int = 0,
        predict_root: str | Path | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        # num_classes and img_size are the model's hyper-parameters (the data follows the model's size);
        # Lightning refuses a DataModule one of another value.
        self.save_hyperparameters(ignore=["num_classes", "img_size"])
        # A checkpoint stores these; a Path would make it unloadable with torch.load(weights_only=True).
        for key in ("root", "predict_root"):
            if self.hparams[key] is not None:
                self.hparams[key] = os.fspath(self.hparams[key])
        if root is None and predict_root is None:
            raise ValueError("ImageFolderDataModule needs root (root/train, root/val) or predict_root, or both")
        if root is None and num_classes is None:
            raise ValueError(
                "without root (a folder with train/<class>), give num_classes: the class count of the model "
                "to predict with (`cli.py predict --ckpt_path` reads it from the checkpoint)"
            )
        for name, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) != 3:
                raise ValueError(f"{name} needs 3 values (R, G, B), got {tuple(values)}")
        check_augmentation(
            crop_pct, interpolation, auto_augment, re_prob, re_mode, re_count, scale, ratio, hflip, color_jitter
        )
        self.root = Path(root) if root is not None else None
        self.predict_root = Path(predict_root) if predict_root is not None else None
        self._num_classes = num_classes
        self.requested_img_size = img_size
        self.img_size = img_size if img_size is not None else DEFAULT_IMG_SIZE
        self._set_preprocessing(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "bicubic", DEFAULT_CROP_PCT)
        check_batching(batch_size, num_workers)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = resolve_pin_memory(pin_memory)
        self.seed = seed
        self._class_names: list[str] | None = None
        self.datasets: dict[str, ImageFolder] = {}

    def _set_preprocessing(
        self, mean: Sequence[float], std: Sequence[float], interpolation: str, crop_pct: float
    ) -> None:
        """Explicit settings where given, else these (the model's, or the defaults without one)."""
        hp = self.hparams
        self.mean = tuple(hp.mean if hp.mean is not None else mean)
        self.std = tuple(hp.std if hp.std is not None else std)
        self.interpolation = hp.interpolation if hp.interpolation is not None else interpolation
        self.crop_pct = hp.crop_pct if hp.crop_pct is not None else crop_pct

    def follow(self, model: nn.Module) -> None:
        """Take the input size and preprocessing of ``model`` (a network, or a LightningModule with ``net``).

        Raises:
            ValueError: an explicit ``img_size`` differs from the model's, the model is not an RGB one, or
                its preprocessing (``mean``/``std``) is not for RGB images and the DataModule gives none.
        """
        config = model_data_config(model)
        if config is None:
            return
        self.img_size = followed_img_size(self.requested_img_size, config, self.in_chans, type(self).__name__)
        self._set_preprocessing(config.mean, config.std, config.interpolation, config.crop_pct)
        wrong = [f"{name}={values}" for name, values in (("mean", self.mean), ("std", self.std)) if len(values) != 3]
        if wrong:
            net = getattr(model, "net", model)
            source = (getattr(net, "pretrained_cfg", None) or {}).get("architecture") or type(net).__name__
            raise ValueError(
                f"{type(self).__name__} reads RGB images, but the model gives it {' and '.join(wrong)}: these "
                f"come from the pretrained_cfg of {source}, made for {len(config.mean)}-channel images "
                f"(building it with in_chans={config.in_chans} changed its stem, not these values). Give the "
                "DataModule RGB values, e.g. --data.init_args.mean '[0.5,0.5,0.5]' --data.init_args.std "
                "'[0.5,0.5,0.5]' (ImageNet's: [0.485,0.456,0.406] and [0.229,0.224,0.225]), or use a model "
                "made for RGB images"
            )

    def state_dict(self) -> dict[str, Any]:
        """What Lightning stores in checkpoints under this class's name: the preprocessing the network was
        trained with (``preprocessing``: ``mean``, ``std``, ``interpolation``, ``crop_pct``), which
        ``cli.py`` gives back to a ``validate``/``test``/``predict`` DataModule that leaves them unset
        (:func:`use_stored_preprocessing`)."""
        return {"preprocessing": {name: getattr(self, name) for name in PREPROCESSING}}

    @property
    def class_names(self) -> list[str] | None:
        """Sorted class folder names of ``root/train``; label ``k`` is ``class_names[k]``. None without ``root``."""
        if self.root is None:
            return None
        if self._class_names is None:
            if not self.root.is_dir():
                raise FileNotFoundError(f"dataset root {self.root} does not exist or is not a folder")
            classes = _class_folders(self.root / "train")
            if len(classes) < 2:
                raise ValueError(
                    f"{self.root / 'train'} holds 1 class folder ({classes[0]}): a classifier needs at least 2 "
                    f"class folders, {self.root / 'train'}/<class>/<image>, one per class"
                )
            self._class_names = classes
        return self._class_names

    @property
    def num_classes(self) -> int:
        if self.root is None:
            return self._num_classes
        found = len(self.class_names)
        if self._num_classes is not None and self._num_classes != found:
            raise ValueError(f"num_classes is {self._num_classes} but {self.root / 'train'} holds {found} classes")
        return found

    def train_transform(self):
        """timm's training augmentation with this module's settings (posterize as before Pillow 13: see
        :func:`posterize`)."""
        hp = self.hparams
        transform = create_transform(
            self.img_size,
            is_training=True,
            scale=tuple(hp.scale),
            ratio=tuple(hp.ratio),
            hflip=hp.hflip,
            color_jitter=hp.color_jitter,
            auto_augment=hp.auto_augment,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            re_prob=hp.re_prob,
            re_mode=hp.re_mode,
            re_count=hp.re_count,
        )
        return with_old_posterize(transform)

    def eval_transform(self):
        """Resize to ``img_size / crop_pct``, centre-crop ``img_size``, normalise."""
        return create_transform(
            self.img_size,
            is_training=False,
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
        )

    def _split_dirs(self) -> dict[str, Path]:
        """Folder of each split, after checking that they all hold the training classes."""
        train = self.class_names  # checks root and root/train
        dirs = {"train": self.root / "train", "val": self.root / "val"}
        if (self.root / "test").is_dir():
            dirs["test"] = self.root / "test"
        for split in ("val", "test"):
            if split not in dirs:
                continue
            found = _class_folders(dirs[split])
            if found != train:
                only_train = sorted(set(train) - set(found))
                only_here = sorted(set(found) - set(train))
                raise ValueError(
                    f"class folders of {dirs['train']} and {dirs[split]} differ: "
                    f"only in train: [{_listing(only_train)}]; only in {split}: [{_listing(only_here)}]"
                )
        return dirs

    def setup(self, stage: str | None = None) -> None:
        model = trainer_model(self)
        if model is not None:
            self.follow(model)
        if self.predict_root is not None and "predict" not in self.datasets and stage in ("predict", None):
            dataset = UnlabelledImages(self.predict_root, transform=self.eval_transform())
            if not dataset.files:
                raise FileNotFoundError(
                    f"predict_root {self.predict_root} holds no images (looked for {', '.join(IMG_EXTENSIONS)})"
                )
            self._verify(dataset.files, self.predict_root)
            self.datasets["predict"] = dataset
        if stage == "predict" and "predict" in self.datasets:
            return
        if self.root is None:
            raise ValueError(f"stage {stage!r} needs the labelled splits: set root (root/train, root/val)")
        dirs = self._split_dirs()
        dirs["test"] = dirs.get("test", dirs["val"])
        dirs["predict"] = dirs["test"]
        needed = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
            None: ("train", "val", "test", "predict"),
        }[stage]
        for split in needed:
            if split in self.datasets:
                continue
            transform = self.train_transform() if split == "train" else self.eval_transform()
            dataset = ImageFolder(
                dirs[split],
                transform=transform,
                loader=load_rgb,
                is_valid_file=_visible_image(dirs[split]),
                allow_empty=True,
            )
            self._check(dataset, dirs[split], split)
            self.datasets[split] = dataset

    def _check(self, dataset: ImageFolder, folder: Path, split: str) -> None:
        if not dataset.samples:
            raise FileNotFoundError(f"{folder} holds no images (looked for {', '.join(IMG_EXTENSIONS)})")
        counts = np.bincount(dataset.targets, minlength=len(dataset.classes))
        empty = [str(folder / dataset.classes[k]) for k in np.flatnonzero(counts == 0)]
        if empty and split == "train":
            raise ValueError(f"training class folders without images: {_listing(empty)}")
        if split == "train" and len(dataset) < self.batch_size:
            raise ValueError(
                f"{folder} holds {len(dataset)} images, fewer than batch_size ({self.batch_size}): training drops "
                "the last partial batch, so no batch would remain. Lower batch_size to at most "
                f"{len(dataset)}, or add images"
            )
        if empty:
            rank_zero_warn(
                f"{split} class folders without images (their classes are never evaluated): {_listing(empty)}"
            )
        self._verify([path for path, _ in dataset.samples], folder)

    def _verify(self, paths: Sequence[str], folder: Path) -> None:
        if not self.hparams.verify_images:
            return
        if len(paths) >= _ANNOUNCED_CHECK:
            rank_zero_info(f"checking that the {len(paths)} images of {folder} decode (verify_images=False skips it)")
        bad = unreadable_images(paths)
        if bad:
            raise ValueError(
                f"{len(bad)} image(s) in {folder} cannot be decoded: {_listing(bad)}. Replace or remove them "
                "(a file cut short by a failed copy: copy it again); verify_images=False skips this check, and "
                "training then stops at the first of them"
            )

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"call setup() before asking for the {split} dataloader")
        dataset = self.datasets[split]
        kwargs = loader_kwargs(self.batch_size, self.num_workers, self.pin_memory)
        if train:
            kwargs.update(sampler=ShuffleSampler(len(dataset), seed=self.seed), drop_last=True)
        return DataLoader(dataset, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


def use_stored_preprocessing(data_args: MutableMapping[str, Any], checkpoint: Mapping[str, Any]) -> None:
    """Set each of ``data_args``' :data:`PREPROCESSING` settings that is None (unset) to the value
    stored in ``checkpoint`` by an :class:`ImageFolderDataModule` at fit time, so that evaluation and
    prediction normalise images as training did without the user restating it."""
    stored = checkpoint.get(ImageFolderDataModule.__qualname__, {}).get("preprocessing", {})
    for name, value in stored.items():
        if name in data_args and data_args[name] is None:
            data_args[name] = value


def write_image_folder(
    root: str | Path,
    classes: Sequence[str] = ("circle", "square"),
    per_class: int = 4,
    img_size: int = 32,
    splits: Sequence[str] = ("train", "val"),
    seed: int = 0,
) -> Path:
    """Write a small generated image folder, ``root/<split>/<class>/<i>.png``, for tests and demos.

    Each class has its own colour (evenly spaced hues), shared by all its images; every image adds a
    little per-pixel noise, so the classes are easy to tell apart but the files differ.

    Args:
        root: Folder to create (parents too); existing files of the same name are overwritten.
        classes: Class folder names.
        per_class: Images per class and split.
        img_size: Side of the square RGB images.
        splits: Split folders to fill.
        seed: Seed of the noise.

    Returns:
        ``root`` as a ``Path``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        colour = 255 * np.array(colorsys.hsv_to_rgb(k / max(1, len(classes)), 0.8, 0.9))
        for split in splits:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = colour + rng.normal(0, 12, size=(img_size, img_size, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root
