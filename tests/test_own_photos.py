"""A user's own photos through ``cli.py``: fit on an ImageFolder of real photos with the default data
settings (RandAugment, random erasing, the full image check), then predict on a nested folder of
unlabelled photos; a one-channel model on RGB photos; the normalisation a checkpoint carries."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision import transforms as T

from dynvit.run.cli import DynViTCLI, main
from dynvit.run.run_folder import read_checkpoint, read_progress
from tests.tiny_config import tiny_config, write_config

# Three classes cut from scikit-learn's two sample photos (427×640 RGB): the left and right of the
# temple scene, and the flower. Boxes are (left, upper, right, lower).
PHOTO_CLASSES = {"roof": (0, (0, 0, 300, 200)), "steps": (0, (340, 220, 640, 427)), "flower": (1, (150, 60, 500, 400))}


def write_photo_folder(root: Path, per_class: dict[str, int]) -> Path:
    """``root/<split>/<class>/<i>.jpg``: JPEG crops of a few sizes and aspect ratios from each class's
    region, ``per_class[split]`` per class."""
    photos = [Image.fromarray(pixels) for pixels in load_sample_images().images]
    for name, (photo, (left, upper, right, lower)) in PHOTO_CLASSES.items():
        region = photos[photo].crop((left, upper, right, lower))
        count = 0
        for split, n in per_class.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                width, height = 40 + 8 * (count % 4), 36 + 6 * (count % 3)
                x = (17 * count) % (region.width - width)
                y = (23 * count) % (region.height - height)
                region.crop((x, y, x + width, y + height)).save(folder / f"{i}.jpg", quality=90)
                count += 1
    return root


def nested_photos(root: Path) -> list[Path]:
    """Unlabelled photos at several depths, in folders whose names are not classes; sorted paths."""
    photos = [Image.fromarray(pixels) for pixels in load_sample_images().images]
    files = [root / "a.jpg", root / "2024" / "trip" / "b.jpg", root / "2024" / "c.png", root / "zoo" / "d.jpg"]
    for k, path in enumerate(files):
        path.parent.mkdir(parents=True, exist_ok=True)
        photos[k % 2].crop((60 * k, 40 * k, 60 * k + 50, 40 * k + 45)).save(path)
    return sorted(files)


def image_folder_config(run: Path, data: Path, model: dict | None = None, max_epochs: int = 1) -> dict:
    """The tiny student (or ``model``) on the ImageFolder ``data`` with the DataModule's defaults, every
    image every epoch."""
    config = tiny_config(run, max_epochs=max_epochs)
    for limit in ("limit_train_batches", "limit_val_batches"):
        del config["trainer"][limit]
    if model is not None:
        config["model"] = model
    # Size and preprocessing follow the model; workers stay in-process to keep the test quick.
    config["data"] = {"class_path": "dynvit.data.ImageFolderDataModule", "init_args": {"root": str(data)}}
    config["data"]["init_args"] |= {"batch_size": 4, "num_workers": 0}
    config["throughput"]["enabled"] = False
    config["wandb"] = {"enabled": False}
    return config


def predict_config(config: dict, photos: Path) -> dict:
    """``config`` predicting on ``photos`` without the training folders (the checkpoint sizes the model)."""
    config = copy.deepcopy(config)
    config["data"]["init_args"] |= {"root": None, "predict_root": str(photos)}
    return config


def read_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "predictions.csv") as f:
        return list(csv.DictReader(f))


def test_real_photos_fit_three_epochs_then_predict_a_nested_unlabelled_folder(tmp_path):
    data = write_photo_folder(tmp_path / "data", {"train": 5, "val": 2})
    run = tmp_path / "run"
    config = image_folder_config(run, data, max_epochs=3)
    DynViTCLI(args=["fit", f"--config={write_config(tmp_path / 'fit.yaml', config)}"])
    last = run / "checkpoints" / "last.ckpt"
    progress = read_progress(last)
    assert progress.epochs == 3 and progress.steps == 3 * (15 // 4)  # 15 photos in batches of 4, the last dropped
    assert read_checkpoint(last)["class_names"] == ["flower", "roof", "steps"]

    files = nested_photos(tmp_path / "photos")
    path = write_config(tmp_path / "predict.yaml", predict_config(config, tmp_path / "photos"))
    DynViTCLI(args=["predict", f"--config={path}", "--ckpt_path=last"])
    rows = read_rows(run / "predictions")
    assert [r["image"] for r in rows] == [str(f) for f in files]
    for row in rows:
        assert "label" not in row
        classes = [row[f"top{k}_class"] for k in (1, 2, 3)]
        assert sorted(classes) == ["flower", "roof", "steps"]
        probs = [float(row[f"top{k}_prob"]) for k in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-4)
        # The student keeps ρ = 0.7 of the previous stage's patches: 44, 31, 21 of 64 (8×8 of 4 px at 32 px).
        assert [int(row[f"kept_s{s}"]) for s in (1, 2, 3)] == [int(64 * 0.7 ** (s + 1)) for s in range(3)]
    assert json.loads((run / "predictions" / "predictions.json").read_text())["checkpoint"] == str(last)


def one_channel_model() -> dict:
    """``vit_digits`` (a model for one-channel digits: mean (0.0,), std (1.0,)) made tiny."""
    kwargs = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    args = {"model_name": "vit_digits", "img_size": 32, "model_kwargs": kwargs, "lr_base_batch_size": None}
    return {"class_path": "dynvit.lightning.ClassifierModule", "init_args": args}


def test_a_one_channel_model_on_rgb_photos_says_where_mean_and_std_come_from(tmp_path, capsys):
    data = write_photo_folder(tmp_path / "data", {"train": 2, "val": 1})
    config = image_folder_config(tmp_path / "run", data, one_channel_model())
    with pytest.raises(SystemExit) as done:
        main(["fit", f"--config={write_config(tmp_path / 'fit.yaml', config)}"])
    assert done.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        "error: ImageFolderDataModule reads RGB images, but the model gives it mean=(0.0,) and std=(1.0,): these "
        "come from the pretrained_cfg of vit_digits, made for 1-channel images (building it with in_chans=3 "
        "changed its stem, not these values). Give the DataModule RGB values, e.g. --data.init_args.mean"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained


def test_predict_normalises_as_the_checkpoint_was_trained_without_being_told_again(tmp_path):
    data = write_photo_folder(tmp_path / "data", {"train": 2, "val": 1})
    config = image_folder_config(tmp_path / "run", data, one_channel_model())
    mean, std = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]
    config["data"]["init_args"] |= {"mean": mean, "std": std, "crop_pct": 0.8}
    DynViTCLI(args=["fit", f"--config={write_config(tmp_path / 'fit.yaml', config)}"])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    stored = read_checkpoint(last)["ImageFolderDataModule"]["preprocessing"]
    assert stored == {"mean": tuple(mean), "std": tuple(std), "interpolation": "bicubic", "crop_pct": 0.8}

    files = nested_photos(tmp_path / "photos")
    unstated = predict_config(config, tmp_path / "photos")
    for name in ("mean", "std", "crop_pct"):
        del unstated["data"]["init_args"][name]
    path = write_config(tmp_path / "predict.yaml", unstated)
    cli = DynViTCLI(args=["predict", f"--config={path}", f"--ckpt_path={last}"])
    dm = cli.datamodule
    assert (dm.mean, dm.std, dm.crop_pct) == (tuple(mean), tuple(std), 0.8)
    rows = read_rows(tmp_path / "run" / "predictions")
    assert [r["image"] for r in rows] == [str(f) for f in files]
    # The predictions are the network's on the photos normalised that way.
    norm = next(t for t in dm.eval_transform().transforms if isinstance(t, T.Normalize))
    assert norm.mean.tolist() == pytest.approx(mean) and norm.std.tolist() == pytest.approx(std)
    x = torch.stack([dm.eval_transform()(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        probs = cli.model.net.eval()(x).softmax(-1)
    assert [float(r["top1_prob"]) for r in rows] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)
