"""``cli.py predict`` writes a table of predictions under the run folder, plus masks and pictures for
networks that drop tokens, for every kind of module the CLI builds."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dynvit import create_teacher
from dynvit.data.imagefolder import write_image_folder
from dynvit.run.cli import DynViTCLI
from tests.tiny_config import STUDENT, tiny_config, write_config

ARCH = STUDENT["model_kwargs"]
TEST_IMAGES = 6


def predict(tmp_path: Path, config: dict, *extra: str) -> Path:
    config = copy.deepcopy(config)
    config["wandb"] = {"enabled": False}
    path = write_config(tmp_path / "config.yaml", config)
    DynViTCLI(args=["predict", f"--config={path}", *extra])
    return Path(config["trainer"]["default_root_dir"]) / "predictions"


def read_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "predictions.csv") as f:
        return list(csv.DictReader(f))


def digits_config(tmp_path: Path, model: dict) -> dict:
    config = tiny_config(tmp_path / "run")
    config["model"] = model
    config["data"]["init_args"]["num_test"] = TEST_IMAGES
    return config


def test_student_predictions_masks_and_pictures(tmp_path, capsys):
    config = tiny_config(tmp_path / "run")
    config["data"]["init_args"]["num_test"] = TEST_IMAGES
    out = predict(tmp_path, config, "--prediction.pictures=4")
    printed = capsys.readouterr().out
    assert f"predicted {TEST_IMAGES} image(s); wrote:" in printed and str(out / "predictions.csv") in printed
    rows = read_rows(out)
    assert [r["image"] for r in rows] == [str(i) for i in range(TEST_IMAGES)]  # generated data: the index
    counts = [int(64 * 0.7 ** (s + 1)) for s in range(3)]  # 44, 31, 21 of 64 patches
    for row in rows:
        assert [int(row[f"kept_s{s}"]) for s in (1, 2, 3)] == counts
        probs = [float(row[f"top{k}_prob"]) for k in range(1, 6)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-5
        assert row["label"] in [str(k) for k in range(10)]
    table = json.loads((out / "predictions.json").read_text())
    assert [len(r["top5"]) for r in table["predictions"]] == [5] * TEST_IMAGES
    masks = torch.load(out / "masks.pt", weights_only=True)
    assert masks["masks"].shape == (TEST_IMAGES, 3, 64) and masks["masks"].dtype == torch.bool
    assert masks["kept"].tolist() == [counts] * TEST_IMAGES
    assert masks["images"] == list(range(TEST_IMAGES)) and masks["grid"] == [8, 8]
    # A later stage keeps a subset of an earlier one.
    assert not (masks["masks"][:, 1] & ~masks["masks"][:, 0]).any()
    pictures = sorted((out / "kept_tokens").glob("*.png"))
    assert [p.name for p in pictures] == [f"{i:05d}_{i}.png" for i in range(4)]
    width = Image.open(pictures[0]).size[0]
    assert width > 3 * Image.open(pictures[0]).size[1]  # the image, then one column per stage
    # Predicting again with fewer pictures leaves none of the first predict's, and no file of the user's goes.
    (out / "kept_tokens" / "notes.png").write_bytes(b"mine")
    predict(tmp_path, config, "--prediction.pictures=1")
    assert sorted(p.name for p in (out / "kept_tokens").iterdir()) == ["00000_0.png", "notes.png"]


def lvvit_student() -> dict:
    return {
        "class_path": "dynvit.lightning.DynamicViTModule",
        "init_args": {
            "model_name": "lvvit_s",
            "img_size": 32,  # the digits follow the model's size
            "pruning_loc": [1, 2, 3],
            "model_kwargs": {**ARCH},
            "lr_base_batch_size": None,
        },
    }


def t2t_student() -> dict:
    return {
        "class_path": "dynvit.lightning.DynamicViTModule",
        "init_args": {
            "model_name": "t2t_vit_t_14",
            "img_size": 64,
            "pruning_loc": [1, 2, 3],
            "model_kwargs": {"embed_dim": 32, "depth": 4, "num_heads": 2, "token_dim": 16},
            "lr_base_batch_size": None,
        },
    }


def hierarchical_student(name: str, **model_kwargs) -> dict:
    """A DynamicCNN or DynamicSwin student at 128 px: its masks lie on the 8×8 stage-3 map, not on patches."""
    return {
        "class_path": "dynvit.lightning.DynamicViTModule",
        "init_args": {
            "model_name": name,
            "img_size": 128,
            "pruning_loc": [1, 2, 3],
            "model_kwargs": {"depths": [1, 1, 4, 1], **model_kwargs},
            "lr_base_batch_size": None,
        },
    }


def classifier(**init) -> dict:
    args = {"model_name": "vit_tiny_patch16_224", "img_size": 32, "model_kwargs": ARCH, "lr_base_batch_size": None}
    args |= init
    return {"class_path": "dynvit.lightning.ClassifierModule", "init_args": args}


@pytest.mark.parametrize(
    ("model", "stages", "data"),
    [
        (lvvit_student(), 3, {}),
        (
            t2t_student(),
            3,
            {"class_path": "dynvit.data.SyntheticDataModule", "init_args": {"val_size": TEST_IMAGES}},
        ),
        (hierarchical_student("convnext_tiny", dims=[8, 16, 32, 64]), 3, {}),
        (
            hierarchical_student("swin_tiny_patch4_window7_224", embed_dim=8, num_heads=[1, 1, 2, 2], window_size=2),
            3,
            {},
        ),
        (classifier(), 0, {}),
        (classifier(reducer="evit", reducer_params={"keep_rate": 0.7, "pruning_loc": [1, 2]}), 2, {}),
        # ToMe merges in each of its 4 blocks: one kept map per merging block.
        (classifier(reducer="tome", reducer_params={"r": 4}), 4, {}),
    ],
    ids=["lvvit-student", "t2t-student", "convnext-student", "swin-student", "teacher", "evit", "tome"],
)
def test_predict_works_for_every_kind_of_network(tmp_path, model, stages, data):
    config = digits_config(tmp_path, model)
    config["data"] = data or config["data"]
    out = predict(tmp_path, config, "--prediction.pictures=1")
    rows = read_rows(out)
    assert len(rows) == TEST_IMAGES
    kept = [k for k in rows[0] if k.startswith("kept_s")]
    assert kept == [f"kept_s{s}" for s in range(1, stages + 1)]
    assert (out / "masks.pt").is_file() == bool(stages)
    assert len(list((out / "kept_tokens").glob("*.png"))) == (1 if stages else 0)
    if stages:
        # The grid the masks lie on: a hierarchical student has no patch_embed, its masks are on its stage-3 map.
        masks = torch.load(out / "masks.pt", weights_only=True)
        assert masks["grid"][0] * masks["grid"][1] == masks["masks"].shape[-1]


@pytest.mark.parametrize(
    ("reducer", "params", "columns"),
    [
        ("kmedoids", {"keep_rate": 0.7, "reduction_loc": [1, 2, 3]}, 3),  # one column of clusters per stage
        ("tome", {"r": 4}, 1),  # ToMe reports its final tokens' merge sources
    ],
)
def test_mergers_and_clusterings_write_their_groups_and_pictures(tmp_path, reducer, params, columns):
    config = digits_config(tmp_path, classifier(reducer=reducer, reducer_params=params))
    out = predict(tmp_path, config, "--prediction.pictures=2")
    groups = torch.load(out / "groups.pt", weights_only=True)
    assert groups["groups"].shape == (TEST_IMAGES, columns, 64) and groups["groups"].dtype == torch.int64
    assert groups["grid"] == [8, 8] and groups["images"] == list(range(TEST_IMAGES))
    assert (groups["groups"] >= 0).all()  # every patch is in some token: neither merges nor clusters drop one
    pictures = sorted((out / "kept_tokens").glob("*.png"))
    assert len(pictures) == 2
    # The 32-px input enlarged to 128 px, then one column per stage, 2-px padding around every tile.
    assert Image.open(pictures[0]).size == ((1 + columns) * 130 + 2, 132)


def test_token_labeling_module_predicts(tmp_path):
    annotator = create_teacher("vit_tiny_patch16_224", num_classes=10, img_size=32, in_chans=1, **ARCH)
    torch.save({"model": annotator.state_dict()}, tmp_path / "annotator.pth")
    model = {
        "class_path": "dynvit.lightning.TokenLabelingModule",
        "init_args": {
            "model_name": "lvvit_s",
            "model_kwargs": ARCH,
            "annotator_name": "vit_tiny_patch16_224",
            "annotator_checkpoint": str(tmp_path / "annotator.pth"),
            "annotator_kwargs": ARCH,
            "lr_base_batch_size": None,
        },
    }
    rows = read_rows(predict(tmp_path, digits_config(tmp_path, model)))
    assert len(rows) == TEST_IMAGES and "kept_s1" not in rows[0]


def test_a_folder_of_unlabelled_images_gets_the_checkpoint_class_names(tmp_path, capsys):
    write_image_folder(tmp_path / "data", classes=("circle", "square"), per_class=4, img_size=32)
    config = tiny_config(tmp_path / "run")
    config["model"] = classifier()
    config["data"] = {
        "class_path": "dynvit.data.ImageFolderDataModule",
        "init_args": {
            "root": str(tmp_path / "data"),  # size and preprocessing follow the model
            "batch_size": 4,
            "num_workers": 0,
        },
    }
    config["throughput"]["enabled"] = False
    config["wandb"] = {"enabled": False}
    DynViTCLI(args=["fit", f"--config={write_config(tmp_path / 'fit.yaml', config)}"])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    # Photos in folders whose names are not classes, at any depth; no training set needed.
    photos = tmp_path / "photos"
    (photos / "dog" / "2024").mkdir(parents=True)
    for name, colour in [("a.png", (200, 40, 40)), ("dog/b.jpg", (40, 200, 40)), ("dog/2024/c.png", (40, 40, 200))]:
        Image.new("RGB", (40, 48), colour).save(photos / name)
    config["data"]["init_args"] |= {"root": None, "predict_root": str(photos)}
    out = predict(tmp_path, config, f"--ckpt_path={ckpt}")
    rows = read_rows(out)
    assert [r["image"] for r in rows] == [
        str(photos / "a.png"),
        str(photos / "dog/2024/c.png"),
        str(photos / "dog/b.jpg"),
    ]
    assert "label" not in rows[0]
    assert {r["top1_class"] for r in rows} <= {"circle", "square"}
    assert {r["top2_class"] for r in rows} <= {"circle", "square"}
    assert "top3_class" not in rows[0]  # two classes: top-2 only
    assert json.loads((out / "predictions.json").read_text())["checkpoint"] == str(ckpt)
