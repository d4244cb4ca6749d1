"""DataModules: batch contents, determinism, splits, patch masks, and ImageFolder's input checks."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from sklearn.datasets import load_digits, load_sample_images
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T

from dynvit.data import (
    DIGITS_MEAN,
    DIGITS_STD,
    ClutteredDigitsDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
    write_image_folder,
)
from dynvit.data._common import ShuffleSampler
from dynvit.data.digits import EpochSampler, upscale_glyphs


def _digits(**kwargs) -> ClutteredDigitsDataModule:
    kwargs = dict(train_samples_per_epoch=64, num_val=64, num_test=64, batch_size=16) | kwargs
    dm = ClutteredDigitsDataModule(**kwargs)
    dm.setup("fit")
    return dm


def _stack(loader) -> list[torch.Tensor]:
    """Concatenate every field of every batch of ``loader``."""
    batches = list(loader)
    return [torch.cat(field) for field in zip(*batches, strict=True)]


# ---------------------------------------------------------------- cluttered digits


def test_digits_batches_have_documented_shapes_types_and_scale():
    dm = _digits(num_val=256)
    assert (dm.num_classes, dm.in_chans, dm.img_size, dm.num_patches) == (10, 1, 64, 64)
    assert list(dm.class_names) == [str(k) for k in range(10)]
    assert dm.pin_memory == torch.cuda.is_available()

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 64, 64) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64 and y.min() >= 0 and y.max() < 10

    x, y, mask = _stack(dm.val_dataloader())
    assert x.shape == (256, 1, 64, 64) and mask.shape == (256, 64) and mask.dtype == torch.bool
    # Normalised with the documented constants: about zero mean and unit std.
    assert abs(x.mean().item()) < 0.1 and 0.9 < x.std().item() < 1.1
    assert torch.isfinite(x).all() and x.min() > -5 and x.max() < 15
    # The raw canvas is 0 (background) .. ~1 (digit) plus noise.
    raw = x * DIGITS_STD + DIGITS_MEAN
    assert raw.max() < 1.5 and raw.min() > -0.5
    assert set(y.tolist()) == set(range(10))

    assert len(next(iter(_digits(train_patch_mask=True).train_dataloader()))) == 3
    x, y, mask = next(iter(dm.test_dataloader()))
    assert mask.shape == (16, 64)


def test_digits_splits_are_disjoint_by_source_scan_and_clutter_stays_in_split():
    dm = _digits()
    splits = dm.split_scans
    assert sum(len(s) for s in splits.values()) == 1797
    assert len(np.unique(np.concatenate(list(splits.values())))) == 1797
    assert abs(len(splits["val"]) - 0.15 * 1797) < 2 and abs(len(splits["test"]) - 0.15 * 1797) < 2
    images = load_digits().images
    # A split's dataset only holds its own scans, for the digit and for the clutter fragments alike.
    for name, idx in splits.items():
        np.testing.assert_array_equal(dm.datasets[name].glyphs, upscale_glyphs(images[idx], 2))
    # The split itself is fixed by the seed.
    np.testing.assert_array_equal(_digits().split_scans["val"], splits["val"])
    assert not np.array_equal(_digits(seed=1).split_scans["val"], splits["val"])


def test_digits_val_set_is_fixed_by_seed_and_independent_of_workers():
    a = _stack(_digits().val_dataloader())
    b = _stack(_digits(num_workers=2).val_dataloader())
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    c = _stack(_digits(seed=1).val_dataloader())
    assert not torch.equal(a[0], c[0])


def test_digits_train_samples_change_each_epoch_and_replay_exactly():
    dm = _digits()
    loader = dm.train_dataloader()
    epoch0 = _stack(loader)[0]
    loader.sampler.set_epoch(1)
    epoch1 = _stack(loader)[0]
    assert not torch.equal(epoch0, epoch1)
    # A fresh DataModule (a resumed run) at epoch 1 sees exactly the same samples.
    other = _digits().train_dataloader()
    other.sampler.set_epoch(1)
    assert torch.equal(_stack(other)[0], epoch1)
    loader.sampler.set_epoch(0)
    assert torch.equal(_stack(loader)[0], epoch0)


def test_digits_ddp_ranks_get_disjoint_samples_that_follow_the_epoch():
    """Lightning wraps a custom sampler in DistributedSamplerWrapper under DDP; emulate two ranks."""
    keys = {}
    for epoch in (0, 1):
        for rank in (0, 1):
            wrapper = DistributedSamplerWrapper(EpochSampler(64), num_replicas=2, rank=rank, shuffle=False)
            wrapper.set_epoch(epoch)
            keys[epoch, rank] = set(wrapper)
        assert not keys[epoch, 0] & keys[epoch, 1]
        assert keys[epoch, 0] | keys[epoch, 1] == set(range(64 * epoch, 64 * (epoch + 1)))


class _Recorder(L.LightningModule):
    """Records the training batches it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64 * 64, 10)
        self.seen: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        x, y, *_ = batch
        self.seen.setdefault(self.current_epoch, []).append(x.clone())
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_digits_lightning_fit_loop_sets_the_epoch(tmp_path):
    dm = ClutteredDigitsDataModule(train_samples_per_epoch=32, num_val=16, num_test=16, batch_size=16)
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    train = dm.datasets["train"]
    for epoch in (0, 1):
        expected = torch.stack([train[epoch * 32 + i][0] for i in range(32)])
        assert torch.equal(torch.cat(model.seen[epoch]), expected)


def test_digits_patch_mask_marks_exactly_the_digit_and_respects_the_coverage_bound():
    assert _digits().max_digit_patches == 9 and _digits().max_digit_fraction == 9 / 64 <= 1 / 6
    cluttered, clean = _digits(num_val=500), _digits(num_val=500, num_fragments=0, noise_std=0.0)
    counts = []
    for key in range(500):
        canvas, label, mask = cluttered.datasets["val"].render(key)
        bare, bare_label, bare_mask = clean.datasets["val"].render(key)
        # Same digit at the same place whatever the clutter; the mask does not depend on the clutter.
        assert label == bare_label and np.array_equal(mask, bare_mask)
        # Without clutter and noise the only non-zero pixels are digit ink: compare patch by patch.
        ink_patches = (bare > 0).reshape(8, 8, 8, 8).any(axis=(1, 3)).reshape(-1)
        np.testing.assert_array_equal(mask, ink_patches)
        counts.append(mask.sum())
        # The clutter is there, outside the digit's patches.
        assert (canvas[~np.kron(mask.reshape(8, 8), np.ones((8, 8), bool))] > 0.25).any()
    assert min(counts) >= 1
    assert max(counts) == cluttered.max_digit_patches  # the documented bound is reached, never exceeded
    _, _, train_mask = _stack(_digits(train_patch_mask=True, train_samples_per_epoch=512).train_dataloader())
    assert train_mask.sum(1).max() <= 9


def test_digits_rejects_settings_that_break_the_task():
    with pytest.raises(ValueError, match="at most 1/6"):
        ClutteredDigitsDataModule(img_size=64, patch_size=8, digit_scale=4)  # 32 px digit on a 64 px canvas
    # A size left to the model is checked once known: here setup() without a model takes the defaults.
    follows = ClutteredDigitsDataModule(digit_scale=4)
    with pytest.raises(ValueError, match="at most 1/6"):
        follows.setup("fit")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ClutteredDigitsDataModule(img_size=60)
    with pytest.raises(ValueError, match="no batch would remain"):
        ClutteredDigitsDataModule(train_samples_per_epoch=8, batch_size=16)
    # A small canvas for tiny test models works with 8 px digits: 9 of 64 patches again.
    dm = ClutteredDigitsDataModule(img_size=32, patch_size=4, digit_scale=1)
    assert dm.max_digit_patches == 9


# ---------------------------------------------------------------- synthetic


def test_synthetic_batches_are_fixed_by_seed_and_labels_learnable():
    dm = SyntheticDataModule(num_classes=4, img_size=16, in_chans=2, train_size=64, val_size=200, batch_size=8)
    dm.setup("fit")
    assert (dm.num_classes, dm.img_size, dm.in_chans) == (4, 16, 2)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 2, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, y = _stack(dm.val_dataloader())
    assert x.shape == (200, 2, 16, 16) and y.min() >= 0 and y.max() < 4

    again = SyntheticDataModule(num_classes=4, img_size=16, in_chans=2, train_size=64, val_size=200)
    again.setup("fit")
    assert torch.equal(_stack(again.val_dataloader())[0], x)

    # The class patterns make labels recoverable: nearest pattern is (nearly) always right; with
    # signal 0 it is chance.
    def nearest_pattern_accuracy(module: SyntheticDataModule) -> float:
        images, labels = _stack(module.val_dataloader())
        patterns = torch.from_numpy(module.datasets["val"].patterns).flatten(1)
        return (images.flatten(1) @ patterns.T).argmax(1).eq(labels).float().mean().item()

    assert nearest_pattern_accuracy(dm) > 0.95
    noise = SyntheticDataModule(num_classes=4, img_size=16, in_chans=2, train_size=64, val_size=200, signal=0.0)
    noise.setup()
    assert nearest_pattern_accuracy(noise) < 0.45


def test_synthetic_train_order_is_fixed_by_seed_and_epoch():
    dm = SyntheticDataModule(train_size=32, val_size=8, batch_size=8, img_size=8)
    dm.setup("fit")
    loader = dm.train_dataloader()
    order0 = list(loader.sampler)
    loader.sampler.set_epoch(1)
    order1 = list(loader.sampler)
    assert sorted(order0) == sorted(order1) == list(range(32)) and order0 != order1
    assert list(ShuffleSampler(32, seed=0)) == order0


# ---------------------------------------------------------------- image folders


@pytest.fixture
def folder(tmp_path):
    return write_image_folder(tmp_path / "data", classes=("ant", "bee", "cat"), per_class=3, img_size=24)


def _folder_dm(root, **kwargs) -> ImageFolderDataModule:
    kwargs = dict(img_size=16, batch_size=4, num_workers=0) | kwargs
    return ImageFolderDataModule(root, **kwargs)


def test_image_folder_batches(folder):
    dm = _folder_dm(folder)
    assert (dm.num_classes, dm.in_chans, dm.img_size) == (3, 3, 16)  # known before setup()
    assert dm.class_names == ["ant", "bee", "cat"]
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, y = _stack(dm.val_dataloader())
    assert x.shape == (9, 3, 16, 16) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # write_image_folder gives each class its own colour: after normalisation, class means differ.
    means = torch.stack([x[y == k].mean((0, 2, 3)) for k in range(3)])
    assert torch.cdist(means, means).add(torch.eye(3) * 10).min() > 0.5
    # No root/test: test uses val.
    dm.setup("test")
    assert Path(dm.datasets["test"].root) == folder / "val"


def test_image_folder_test_split_is_used_when_present(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, splits=("train", "val", "test"))
    (root / "test" / "b" / "1.png").unlink()
    dm = _folder_dm(root)
    dm.setup("test")
    assert Path(dm.datasets["test"].root) == root / "test" and len(dm.datasets["test"]) == 3


def test_image_folder_normalisation_follows_the_model(folder):
    name = "vit_base_patch16_clip_224.openai"  # not ImageNet's mean/std, crop 0.9
    cfg = timm.get_pretrained_cfg(name)
    model = timm.create_model(name, img_size=32, depth=1, embed_dim=32, num_heads=2)
    dm = ImageFolderDataModule(folder, batch_size=4, num_workers=0)
    dm.follow(model)
    assert dm.img_size == 32
    assert dm.mean == tuple(cfg.mean) and dm.std == tuple(cfg.std) and dm.mean != timm.data.IMAGENET_DEFAULT_MEAN
    for tf in (dm.eval_transform(), dm.train_transform()):
        norm = next(t for t in tf.transforms if isinstance(t, T.Normalize))
        assert torch.allclose(
            torch.as_tensor(norm.mean, dtype=torch.float64), torch.tensor(cfg.mean, dtype=torch.float64)
        )
        assert torch.allclose(
            torch.as_tensor(norm.std, dtype=torch.float64), torch.tensor(cfg.std, dtype=torch.float64)
        )
    resize = next(t for t in dm.eval_transform().transforms if isinstance(t, T.Resize))
    assert resize.size == int(32 / cfg.crop_pct)
    # Explicit values win; no model gives ImageNet's.
    explicit = _folder_dm(folder, img_size=None, mean=(0.5, 0.5, 0.5))
    explicit.follow(model)
    assert explicit.mean == (0.5, 0.5, 0.5) and explicit.std == tuple(cfg.std)
    assert _folder_dm(folder).mean == tuple(timm.data.IMAGENET_DEFAULT_MEAN)


def test_image_folder_normalisation_must_be_rgb(folder):
    with pytest.raises(ValueError, match=r"std needs 3 values \(R, G, B\), got \(0.5,\)"):
        _folder_dm(folder, std=(0.5,))
    digits_model = timm.create_model("vit_digits", in_chans=3, img_size=16, depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(ValueError, match=r"the model gives it mean=\(0.0,\) and std=\(1.0,\): these come from"):
        _folder_dm(folder).follow(digits_model)
    with pytest.raises(ValueError, match=r"the model gives it std=\(1.0,\): these come from"):
        _folder_dm(folder, mean=(0.5, 0.5, 0.5)).follow(digits_model)
    rgb = _folder_dm(folder, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    rgb.follow(digits_model)
    assert (rgb.mean, rgb.std, rgb.crop_pct) == ((0.5,) * 3, (0.25,) * 3, 1.0)  # the crop is still the model's


def test_image_folder_training_augmentation_is_configurable(folder):
    tf = _folder_dm(folder, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.3).train_transform().transforms
    assert any(isinstance(t, RandAugment) for t in tf)
    assert next(t for t in tf if isinstance(t, RandomErasing)).probability == 0.3
    tf = _folder_dm(folder, auto_augment=None, re_prob=0.0, hflip=0.0, scale=(0.5, 1.0)).train_transform().transforms
    assert not any(isinstance(t, (RandAugment, RandomErasing, T.RandomHorizontalFlip)) for t in tf)
    assert tf[0].scale == (0.5, 1.0)
    assert any(isinstance(t, T.ColorJitter) for t in tf)  # timm uses colour jitter only without auto-augment


def _photo_crops(size: int = 64) -> list:
    """Square crops of scikit-learn's two sample photos (427×640 RGB JPEG scans shipped with it)."""
    from PIL import Image

    crops = []
    for pixels in load_sample_images().images:
        photo = Image.fromarray(pixels)
        crops += [photo.crop((x, y, x + size, y + size)) for x in (0, 200, 400) for y in (0, 150, 300)]
    return crops


@pytest.mark.parametrize("bits", range(9))
def test_posterize_keeps_the_old_pillow_meaning_of_every_bit_count(bits):
    from dynvit.data.imagefolder import posterize

    photo = _photo_crops()[4]
    pixels = np.asarray(photo).astype(np.int64)
    # Pillow <= 12: a look-up table of value & ~(2 ** (8 - bits) - 1); with 0 bits, every value becomes 0.
    expected = pixels & ~(2 ** (8 - bits) - 1)
    out = posterize(photo, bits)
    assert out.mode == "RGB" and out.size == photo.size
    np.testing.assert_array_equal(np.asarray(out), expected.astype(np.uint8))
    assert (bits == 0) == (expected.max() == 0)


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "v0", "augmix-m5-w4-d2"])
def test_no_auto_augment_policy_keeps_timms_posterize(folder, policy):
    from timm.data import auto_augment

    tf = _folder_dm(folder, auto_augment=policy).train_transform().transforms
    step = next(t for t in tf if isinstance(t, (RandAugment, auto_augment.AutoAugment, auto_augment.AugMixAugment)))
    ops = [op for sub in step.policy for op in sub] if policy == "v0" else step.ops
    posterize_ops = [op for op in ops if "Posterize" in op.name]
    assert posterize_ops and all(op.aug_fn is not auto_augment.posterize for op in posterize_ops)


def test_default_augmentation_runs_on_thousands_of_photo_crops(folder):
    """The default RandAugment asks for 0 bits in about 0.2 % of images; each such image is black."""
    import random

    tf = _folder_dm(folder, img_size=32).train_transform()
    rand_augment = next(t for t in tf.transforms if isinstance(t, RandAugment))
    op = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    posterize, black = op.aug_fn, []

    def recording(img, bits, **kwargs):
        out = posterize(img, bits, **kwargs)
        if bits == 0:
            black.append(np.asarray(out).max() == 0)
        return out

    op.aug_fn = recording
    crops = _photo_crops()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    for i in range(3000):
        x = tf(crops[i % len(crops)])
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
    assert len(black) >= 2 and all(black)


def test_image_folder_missing_root_or_split(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _folder_dm(tmp_path / "nowhere").setup("fit")
    for split in ("val", "train"):
        (folder / split).rename(folder / f"{split}_old")
        with pytest.raises(FileNotFoundError, match=f"{folder / split} is missing"):
            _folder_dm(folder).setup("fit")
        (folder / f"{split}_old").rename(folder / split)


def test_image_folder_empty_split(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=("a", "b"), per_class=1)
    for png in (root / "val").rglob("*.png"):
        png.unlink()
    with pytest.raises(FileNotFoundError, match=f"{root / 'val'} holds no images"):
        _folder_dm(root, batch_size=1).setup("fit")
    for png in (root / "train" / "b").glob("*.png"):
        png.unlink()
    with pytest.raises(ValueError, match=f"training class folders without images: {root / 'train' / 'b'}"):
        _folder_dm(root, batch_size=1).setup("fit")
    for p in (root / "train").iterdir():
        p.rename(root / p.name)
    with pytest.raises(FileNotFoundError, match="holds no class folders"):
        _folder_dm(root, batch_size=1).setup("fit")


def test_image_folder_class_mismatch_lists_the_differences(folder):
    (folder / "val" / "cat").rename(folder / "val" / "dog")
    with pytest.raises(ValueError, match=r"only in train: \[cat\]; only in val: \[dog\]"):
        _folder_dm(folder).setup("fit")


def test_image_folder_corrupt_image_is_named(folder):
    bad = folder / "val" / "bee" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    with pytest.raises(ValueError, match=f"1 image\\(s\\) in {folder / 'val'} cannot be decoded: {bad}"):
        _folder_dm(folder).setup("fit")
    # Unchecked, the loader fails on the file and names it rather than skipping it.
    dm = _folder_dm(folder, verify_images=False, batch_size=16)
    dm.setup("validate")
    with pytest.raises(OSError, match=f"cannot read image {bad}"):
        list(dm.val_dataloader())


def test_a_truncated_jpeg_with_a_valid_header_is_caught_before_training(folder):
    from PIL import Image

    photo = folder / "photo.jpg"
    Image.fromarray(load_sample_images().images[0]).save(photo, quality=90)
    whole = photo.read_bytes()
    photo.unlink()
    cut = [folder / "train" / "cat" / "cut_0.jpg", folder / "train" / "ant" / "cut_1.jpg"]
    for path, kept in zip(cut, (0.5, 0.99), strict=True):
        path.write_bytes(whole[: int(len(whole) * kept)])  # a copy that stopped part-way
        with Image.open(path) as img:
            img.verify()  # the header is whole: a header check passes the file
    (folder / "train" / "bee" / "whole.jpg").write_bytes(whole)
    with pytest.raises(ValueError, match=r"2 image\(s\) in .*train cannot be decoded: ") as raised:
        _folder_dm(folder).setup("fit")
    listed = str(raised.value)
    assert all(f"{path} (OSError: image file is truncated" in listed for path in cut)
    assert "whole.jpg" not in listed
    assert listed.index(str(cut[1])) < listed.index(str(cut[0]))  # in the dataset's (class, file) order


def test_image_folder_with_one_class_asks_for_a_second_folder(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=("cat",), per_class=4)
    train = root / "train"
    message = f"{train} holds 1 class folder \\(cat\\): a classifier needs at least 2 class folders"
    with pytest.raises(ValueError, match=message):
        _ = _folder_dm(root).num_classes  # what the CLI reads to size the model, before the model exists


def test_a_training_set_smaller_than_the_batch_is_refused_by_setup(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2)
    with pytest.raises(ValueError, match=f"{root / 'train'} holds 4 images, fewer than batch_size \\(5\\)"):
        _folder_dm(root, batch_size=5).setup("fit")
    dm = _folder_dm(root, batch_size=4)
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 1  # a full batch is the least that trains
    _folder_dm(root, batch_size=5).setup("validate")  # evaluating keeps partial batches


def test_folder_paths_given_as_path_objects_keep_checkpoints_loadable(folder, tmp_path):
    dm = _folder_dm(folder, predict_root=folder / "val")
    assert dm.hparams["root"] == str(folder) and dm.hparams["predict_root"] == str(folder / "val")
    torch.save({"datamodule_hyper_parameters": dict(dm.hparams)}, tmp_path / "c.ckpt")
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)  # a PosixPath is refused here
    assert loaded["datamodule_hyper_parameters"]["root"] == str(folder)


def test_hidden_files_in_the_splits_are_not_images(folder):
    # macOS writes an AppleDouble `._<name>` beside each file it copies to a foreign disk: not a PNG.
    (folder / "train" / "ant" / "._0.png").write_bytes(b"\x00\x05\x16\x07" + bytes(80))
    (folder / "val" / "bee" / ".ipynb_checkpoints").mkdir()
    (folder / "val" / "bee" / "0.png").rename(folder / "val" / "bee" / ".ipynb_checkpoints" / "0.png")
    dm = _folder_dm(folder)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 9 and len(dm.datasets["val"]) == 8
    assert not any("/." in path for path, _ in dm.datasets["train"].samples + dm.datasets["val"].samples)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            {"interpolation": "bicubik"},
            "interpolation 'bicubik': choose from nearest, bilinear, bicubic, box, "
            "hamming, lanczos; did you mean bicubic?",
        ),
        ({"re_mode": "foo"}, "re_mode 'foo': choose from pixel, rand, const"),
        (
            {"auto_augment": "rnd-m9-mstd0.5-inc1"},
            "auto_augment 'rnd-m9-mstd0.5-inc1' is not a timm augmentation "
            "policy (AssertionError: Unknown AutoAugment config section): use e.g. 'rand-m9-mstd0.5-inc1'",
        ),
        ({"crop_pct": -0.5}, "crop_pct (the centre crop's share of the resized image) must be in (0, 1], got -0.5"),
        ({"crop_pct": 0.0}, "crop_pct (the centre crop's share of the resized image) must be in (0, 1], got 0.0"),
        ({"re_prob": 1.5}, "re_prob (the random-erasing probability) must be in [0, 1], got 1.5"),
        ({"hflip": 2.0}, "hflip (the horizontal-flip probability) must be in [0, 1], got 2.0"),
        (
            {"scale": (1.0, 0.08)},
            "scale (the random crop's area range, as a share of the image) must be [min, max] "
            "with 0 < min <= max <= 1, got [1.0, 0.08]",
        ),
        ({"ratio": (0.0, 1.0)}, "ratio (the random crop's aspect-ratio range) must be [min, max] with 0 < min <= max"),
        ({"re_count": 0}, "re_count (random-erasing regions per image) must be >= 1, got 0"),
        ({"color_jitter": -0.4}, "color_jitter must be >= 0, got -0.4"),
    ],
)
def test_augmentation_options_out_of_range_are_refused_naming_the_option(folder, option, message):
    with pytest.raises(ValueError) as raised:
        _folder_dm(folder, **option)
    assert str(raised.value).startswith(message)


def test_augmentation_options_in_range_are_taken(folder):
    dm = _folder_dm(
        folder,
        interpolation="bilinear",
        re_mode="Const",
        crop_pct=1.0,
        re_prob=1.0,
        hflip=0.0,
        scale=(1.0, 1.0),
        auto_augment="augmix-m5-w4-d2",
    )
    assert (dm.interpolation, dm.crop_pct) == ("bilinear", 1.0)  # the bounds of each range are in it
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 9


def test_image_folder_empty_val_class_is_a_warning_naming_the_folder(folder):
    for png in (folder / "val" / "bee").glob("*.png"):
        png.unlink()
    with pytest.warns(UserWarning, match=f"val class folders without images.*{folder / 'val' / 'bee'}"):
        _folder_dm(folder).setup("validate")


def test_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped(tmp_path):
    from PIL import Image

    from dynvit.data.imagefolder import load_rgb

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    path = tmp_path / "depth.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(load_rgb(str(path)))
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    # convert("RGB") clips: 99 % of this ramp would be 255. Scaled, the ramp keeps its shape.
    np.testing.assert_array_equal(rgb[..., 0], np.round(ramp / 257.0).astype(np.uint8))
    assert abs(rgb.mean() - 127.5) < 1.0


def test_image_modes_eight_bits_cannot_hold_are_refused_naming_the_file(tmp_path):
    from PIL import Image

    from dynvit.data.imagefolder import load_rgb

    wide = tmp_path / "wide.tif"
    Image.fromarray(np.full((8, 8), 100_000, dtype=np.int32)).save(wide)
    with pytest.raises(OSError, match=f"cannot read image {wide}.*outside 0..65535"):
        load_rgb(str(wide))
    floats = tmp_path / "float.tif"
    Image.fromarray(np.zeros((8, 8), dtype=np.float32)).save(floats)
    with pytest.raises(OSError, match=f"cannot read image {floats}.*mode F"):
        load_rgb(str(floats))


def test_predict_root_is_every_image_under_it_without_labels(folder, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    (photos / "trip" / "day2").mkdir(parents=True)
    (photos / ".cache").mkdir()
    for name in ("b.png", "trip/a.jpg", "trip/day2/c.png", ".cache/hidden.png"):
        Image.new("RGB", (20, 30), (10, 200, 30)).save(photos / name)
    (photos / "notes.txt").write_text("not an image")
    dm = _folder_dm(folder, predict_root=photos)
    dm.setup("predict")
    dataset = dm.datasets["predict"]
    assert dataset.files == [str(photos / "b.png"), str(photos / "trip/a.jpg"), str(photos / "trip/day2/c.png")]
    batch = next(iter(dm.predict_dataloader()))
    assert isinstance(batch, torch.Tensor) and batch.shape == (3, 3, 16, 16)
    # Without the training set, the class count is given (the CLI reads it from the checkpoint).
    bare = ImageFolderDataModule(predict_root=photos, num_classes=7, img_size=16, num_workers=0)
    assert bare.num_classes == 7 and bare.class_names is None
    bare.setup("predict")
    with pytest.raises(ValueError, match="give num_classes"):
        ImageFolderDataModule(predict_root=photos)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        _folder_dm(folder, predict_root=tmp_path / "empty").setup("predict")
