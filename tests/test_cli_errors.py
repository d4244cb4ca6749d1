"""A config or data error ends with dynvit's own message: alone, last, with a non-zero exit status.

``cli.py`` (``dynvit.run.cli.main``) prints ``error: <message>`` instead of jsonargparse's chained
tracebacks and ``Given value: Namespace(...)`` dump; ``DYNVIT_TRACEBACK=1`` shows the traceback.
"""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import lightning as L
import pytest
import torch
from PIL import Image

from dynvit import create_teacher, methods
from dynvit.data import SyntheticDataModule
from dynvit.lightning import ClassifierModule
from dynvit.models import CheckpointMismatch
from dynvit.run.cli import DynViTCLI, main, options_before_config, oversubscription
from dynvit.run.errors import TRACEBACK_ENV
from tests.tiny_config import STUDENT, tiny_config, write_config

ROOT = Path(__file__).resolve().parents[1]
ARCH = STUDENT["model_kwargs"]


def config_path(tmp_path: Path, **student) -> Path:
    config = tiny_config(tmp_path / "run")
    config["model"]["init_args"].update(student)
    config["wandb"] = {"enabled": False}
    return write_config(tmp_path / "config.yaml", config)


def error_lines(capsys, *args: str) -> list[str]:
    """Run ``cli.py`` in-process; check it failed with status 1 and return what it printed to stderr."""
    with pytest.raises(SystemExit) as done:
        main(list(args))
    assert done.value.code == 1
    return capsys.readouterr().err.strip().splitlines()


def save_teacher(path: Path, **changes) -> Path:
    kwargs = dict(num_classes=10, img_size=32, in_chans=1, **ARCH) | changes
    torch.save({"model": create_teacher("vit_tiny_patch16_224", **kwargs).state_dict()}, path)
    return path


class Mistake(NamedTuple):
    """A first-week mistake: the command line (``{config}``, ``{tmp}``: the test's config file and folder)
    and the one line the user sees last, with the exit status (1: dynvit's check, 2: the parser's)."""

    name: str
    args: tuple[str, ...]
    line: str
    status: int = 1


# The mistakes of docs/reference.md, "First-week mistakes", in its order.
MISTAKES = [
    Mistake(
        "keep ratio of 0",
        ("fit", "--config={config}", "--model.init_args.keep_ratio=0"),
        "error: keep_ratio must be in (0, 1], got 0.0",
    ),
    Mistake(
        "pruning location past the last block",
        ("fit", "--config={config}", "--model.init_args.pruning_loc=[1,2,4]"),
        "error: pruning_loc (1, 2, 4) must index blocks 0..3 of this 4-block model",
    ),
    Mistake(
        "image size not a multiple of the patch",
        ("fit", "--config={config}", "--model.init_args.img_size=30"),
        "error: img_size (30, 30) is not a multiple of vit_tiny_patch16_224's patch size (4, 4): use e.g. 28",
    ),
    Mistake(
        "mistyped model option",
        ("fit", "--config={config}", "--model.init_args.keep_ration=0.5"),
        "error: unknown option --model.init_args.keep_ration: dynvit.lightning.DynamicViTModule takes no argument "
        "'keep_ration'; did you mean --model.init_args.keep_ratio?",
        2,
    ),
    Mistake(
        "mistyped model option in the config file",
        ("fit", "--config={tmp}/keep_ration.yaml"),
        "error: unknown option --model.init_args.keep_ration: dynvit.lightning.DynamicViTModule takes no argument "
        "'keep_ration'; did you mean --model.init_args.keep_ratio?",
        2,
    ),
    Mistake(
        "mistyped data option",
        ("fit", "--config={config}", "--data.init_args.batch_sise=3"),
        "error: unknown option --data.init_args.batch_sise: dynvit.data.ClutteredDigitsDataModule takes no "
        "argument 'batch_sise'; did you mean --data.init_args.batch_size?",
        2,
    ),
    Mistake(
        "mistyped trainer option",
        ("fit", "--config={config}", "--trainer.maxepochs=3"),
        "error: unknown option --trainer.maxepochs; did you mean --trainer.max_epochs?",
        2,
    ),
    Mistake(
        "mistyped trainer key in the config file",
        ("fit", "--config={tmp}/max_epoch.yaml"),
        "error: fit has no option --trainer.max_epoch (from the config file); did you mean --trainer.max_epochs?",
        2,
    ),
    Mistake(
        "a value outside an option's choices",
        ("fit", "--config={config}", "--model.init_args.keep_gradient=secnt"),
        "error: --model.init_args.keep_gradient secnt: choose from tangent, secant; did you mean secant?",
        2,
    ),
    Mistake(
        "a word for a number",
        ("fit", "--config={config}", "--trainer.max_epochs=ten"),
        "error: --trainer.max_epochs ten: expected int or null",
        2,
    ),
    Mistake(
        "mistyped model class",
        ("fit", "--config={config}", "--model=dynvit.lightning.DynamicViTModul"),
        "error: --model: dynvit.lightning has no DynamicViTModul; did you mean dynvit.lightning.DynamicViTModule?",
        2,
    ),
    Mistake(
        "mistyped subcommand",
        ("fitt", "--config={config}"),
        "error: no subcommand 'fitt': choose from fit, validate, test, predict, benchmark, sweep, export; did you "
        "mean fit?",
        2,
    ),
    Mistake(
        "config file that is not there",
        ("fit", "--config={tmp}/missing.yaml"),
        "error: --config: there is no file '{tmp}/missing.yaml'",
        2,
    ),
    Mistake(
        "checkpoint that is not there",
        ("validate", "--config={config}", "--ckpt_path={tmp}/missing.ckpt"),
        "error: --ckpt_path {tmp}/missing.ckpt does not exist",
    ),
    Mistake(
        "a folder for a checkpoint",
        ("validate", "--config={config}", "--ckpt_path={tmp}"),
        "error: --ckpt_path {tmp} is a folder, not a checkpoint file",
    ),
    Mistake(
        "truncated checkpoint",
        ("validate", "--config={config}", "--ckpt_path={tmp}/truncated.ckpt"),
        "error: --ckpt_path {tmp}/truncated.ckpt is truncated or damaged: torch cannot read its 1000 bytes as a "
        "checkpoint. Was its saving or copying interrupted? Save or copy it again",
    ),
    Mistake(
        "a file of random bytes for a checkpoint",
        ("predict", "--config={config}", "--ckpt_path={tmp}/random.ckpt"),
        "error: --ckpt_path {tmp}/random.ckpt is not a PyTorch checkpoint: its 4000 bytes are neither a "
        "torch.save archive nor a pickle. Is it another kind of file?",
    ),
    Mistake(
        "a file of random bytes to export",
        ("export", "--config={config}", "--ckpt_path={tmp}/random.ckpt"),
        "error: --ckpt_path {tmp}/random.ckpt is not a PyTorch checkpoint: its 4000 bytes are neither a "
        "torch.save archive nor a pickle. Is it another kind of file?",
    ),
    *(
        Mistake(
            f"plain weights (a timm .pth) to {command}",
            (command, "--config={config}", "--ckpt_path={tmp}/weights.pth"),
            "error: --ckpt_path {tmp}/weights.pth holds plain model weights, not a Lightning checkpoint of a dynvit "
            "run: --ckpt_path restores a run that cli.py fit wrote (its .ckpt files); start from its weights with "
            "--model.init_args.student_checkpoint {tmp}/weights.pth instead (and no --ckpt_path)",
        )
        for command in ("validate", "predict", "fit")
    ),
    Mistake(
        "an export format that does not exist",
        ("export", "--config={config}", "--format=onxx"),
        "error: --format onxx: choose from onnx; did you mean onnx?",
        2,
    ),
    Mistake(
        "a folder to export to",
        ("export", "--config={config}", "--out={tmp}"),
        "error: --out {tmp} is a folder: give the file to write in it, e.g. {tmp}/model.onnx",
    ),
    Mistake(
        "an export path under a file",
        ("export", "--config={config}", "--out={tmp}/random.ckpt/model.onnx"),
        "error: cannot write --out {tmp}/random.ckpt/model.onnx: {tmp}/random.ckpt is a file, not a folder; "
        "choose another path",
    ),
    Mistake(
        "an export path where no file can be made",
        ("export", "--config={config}", "--out=/proc/nope/model.onnx"),
        "error: cannot write --out /proc/nope/model.onnx: no file can be created in /proc (No such file or "
        "directory); choose a folder you can write to",
    ),
    Mistake(
        "export --auto where no file can be made",
        ("export", "--config={config}", "--auto=true", "--out=/proc/nope/student"),
        "error: cannot write --out /proc/nope/student: no file can be created in /proc (No such file or "
        "directory); choose a folder you can write to",
    ),
    Mistake(
        "export --auto at a batch size of 0",
        ("export", "--config={config}", "--auto=true", "--batch_size=0"),
        "error: --batch_size must be >= 1, got 0",
    ),
    Mistake(
        "export --auto with no timing pairs",
        ("export", "--config={config}", "--auto=true", "--batch_size=4", "--pairs=0"),
        "error: --pairs must be >= 1, got 0",
    ),
    Mistake(
        "export --auto on a device torch does not know",
        ("export", "--config={config}", "--auto=true", "--device=foo"),
        "error: --device foo: not a device torch knows: give cpu, cuda or cuda:<index>",
    ),
    Mistake(
        "export --auto comparing no images",
        ("export", "--config={config}", "--auto=true", "--agreement_images=0"),
        "error: --agreement_images must be >= 1, got 0",
    ),
    Mistake(
        "export --auto with an agreement above 1",
        ("export", "--config={config}", "--auto=true", "--agreement=1.5"),
        "error: --agreement 1.5: give the least top-1 agreement with float32 as a fraction in [0, 1], e.g. 0.99",
    ),
    Mistake(
        "no devices",
        ("fit", "--config={config}", "--trainer.devices=0"),
        "error: --trainer.devices 0: give a number of devices >= 1, -1 or auto for all of them, or a list of "
        "device indices",
    ),
    Mistake(
        "an export check tolerance of 0",
        ("export", "--config={config}", "--check_tolerance=0"),
        "error: --check_tolerance must be > 0, got 0.0",
    ),
    Mistake(
        "an image folder that is not there",
        ("fit", "--config={tmp}/folder.yaml", "--data.init_args.root={tmp}/missing"),
        "error: dataset root {tmp}/missing does not exist or is not a folder",
    ),
    Mistake(
        "an image folder without train/",
        ("fit", "--config={tmp}/folder.yaml", "--data.init_args.root={tmp}/no_train"),
        "error: {tmp}/no_train/train is missing: expected the ImageNet layout {tmp}/no_train/{train,val}/<class>/<image>",
    ),
    Mistake(
        "train and val with different classes",
        ("fit", "--config={tmp}/folder.yaml", "--data.init_args.root={tmp}/other_classes"),
        "error: class folders of {tmp}/other_classes/train and {tmp}/other_classes/val differ: only in train: [b]; "
        "only in val: [c]",
    ),
    Mistake(
        "an empty training class folder",
        ("fit", "--config={tmp}/folder.yaml", "--data.init_args.root={tmp}/empty_class"),
        "error: training class folders without images: {tmp}/empty_class/train/b",
    ),
    Mistake(
        "a truncated JPEG",
        ("fit", "--config={tmp}/folder.yaml", "--data.init_args.root={tmp}/truncated"),
        "error: 1 image(s) in {tmp}/truncated/train cannot be decoded: {tmp}/truncated/train/a/0.jpg (OSError: "
        "Truncated File Read). Replace or remove them (a file cut short by a failed copy: copy it again); "
        "verify_images=False skips this check, and training then stops at the first of them",
    ),
    Mistake(
        "random bytes named .jpg",
        ("fit", "--config={tmp}/folder.yaml", "--data.init_args.root={tmp}/random"),
        "error: 1 image(s) in {tmp}/random/train cannot be decoded: {tmp}/random/train/a/0.jpg "
        "(UnidentifiedImageError: cannot identify image file '{tmp}/random/train/a/0.jpg'). Replace or remove them "
        "(a file cut short by a failed copy: copy it again); verify_images=False skips this check, and training "
        "then stops at the first of them",
    ),
    Mistake(
        "a one-channel model (vit_digits) on RGB photos",
        ("fit", "--config={tmp}/folder.yaml", "--model.init_args.model_name=vit_digits"),
        "error: ImageFolderDataModule reads RGB images, but the model gives it mean=(0.0,) and std=(1.0,): these "
        "come from the pretrained_cfg of vit_digits, made for 1-channel images (building it with in_chans=3 "
        "changed its stem, not these values). Give the DataModule RGB values, e.g. --data.init_args.mean "
        "'[0.5,0.5,0.5]' --data.init_args.std '[0.5,0.5,0.5]' (ImageNet's: [0.485,0.456,0.406] and "
        "[0.229,0.224,0.225]), or use a model made for RGB images",
    ),
    Mistake(
        "a mean of two values for RGB",
        ("fit", "--config={tmp}/folder.yaml", "--data.init_args.mean=[0.5,0.5]"),
        "error: --data.init_args.mean [0.5, 0.5]: expected tuple[float, float, float] or null",
        2,
    ),
    Mistake(
        "mistyped timm model name",
        ("fit", "--config={config}", "--model.init_args.model_name=vit_tiny_patch16_22"),
        "error: unknown model name 'vit_tiny_patch16_22'; did you mean vit_tiny_patch16_224, deit_tiny_patch16_224, "
        "vit_tiny_patch16_384?",
    ),
    Mistake(
        "keep ratio above 1",
        ("fit", "--config={config}", "--model.init_args.keep_ratio=1.5"),
        "error: keep_ratio must be in (0, 1], got 1.5",
    ),
    Mistake(
        "pruning locations out of order",
        ("fit", "--config={config}", "--model.init_args.pruning_loc=[2,1,3]"),
        "error: pruning_loc must be strictly increasing, got (2, 1, 3)",
    ),
    Mistake(
        "batch size of 0",
        ("fit", "--config={config}", "--data.init_args.batch_size=0"),
        "error: batch_size must be >= 1, got 0",
    ),
    Mistake(
        "a negative number of workers",
        ("fit", "--config={config}", "--data.init_args.num_workers=-1"),
        "error: num_workers must be >= 0, got -1",
    ),
    Mistake(
        "a negative max_epochs",
        ("fit", "--config={config}", "--trainer.max_epochs=-2"),
        "error: --trainer.max_epochs -2: give a number of epochs >= 0, or -1 for no limit",
    ),
    Mistake(
        "teacher checkpoint that is not there",
        ("fit", "--config={config}", "--model.init_args.teacher_checkpoint={tmp}/missing.pth"),
        "error: teacher_checkpoint {tmp}/missing.pth does not exist: train the teacher first, or point "
        "teacher_checkpoint at its weights",
    ),
    Mistake(
        "--ckpt_path last before any run",
        ("fit", "--config={config}", "--ckpt_path=last"),
        "error: --ckpt_path last: there is no {tmp}/run/checkpoints/last.ckpt, so there is no run to continue. "
        "Drop --ckpt_path to start a new run, or point --trainer.default_root_dir at the run to continue",
    ),
    Mistake(
        "an odd batch size with mixup",
        ("fit", "--config={config}", "--model.init_args.mixup=0.8", "--data.init_args.batch_size=3"),
        "error: mixup/cutmix need an even batch_size (timm's Mixup pairs the images of a batch), got batch_size 3 "
        "with mixup=0.8, cutmix=0: use batch_size 2 or 4, or set mixup and cutmix to 0",
    ),
    Mistake(
        "label smoothing above 1",
        ("fit", "--config={config}", "--model.init_args.label_smoothing=1.5"),
        "error: label_smoothing must be in [0, 1), got 1.5",
    ),
    Mistake(
        "an image folder with one class",
        ("fit", "--config={tmp}/folder.yaml", "--data.init_args.root={tmp}/one_class"),
        "error: {tmp}/one_class/train holds 1 class folder (a): a classifier needs at least 2 class folders, "
        "{tmp}/one_class/train/<class>/<image>, one per class",
    ),
    Mistake(
        "fewer training images than batch_size",
        ("fit", "--config={tmp}/folder.yaml", "--data.init_args.batch_size=5"),
        "error: {tmp}/photos/train holds 4 images, fewer than batch_size (5): training drops the last partial "
        "batch, so no batch would remain. Lower batch_size to at most 4, or add images",
    ),
    Mistake(
        "a mistyped interpolation",
        ("fit", "--config={tmp}/folder.yaml", "--data.init_args.interpolation=bicubik"),
        "error: interpolation 'bicubik': choose from nearest, bilinear, bicubic, box, hamming, lanczos; did you "
        "mean bicubic?",
    ),
    Mistake(
        "a mistyped auto_augment policy",
        ("fit", "--config={tmp}/folder.yaml", "--data.init_args.auto_augment=rnd-m9-mstd0.5-inc1"),
        "error: auto_augment 'rnd-m9-mstd0.5-inc1' is not a timm augmentation policy (AssertionError: Unknown "
        "AutoAugment config section): use e.g. 'rand-m9-mstd0.5-inc1' (RandAugment, DeiT's), 'augmix-m5-w4-d2', "
        "'original', 'v0' or '3a', or null for none",
    ),
    Mistake(
        "sweep file that is not there",
        ("sweep", "--config={config}", "--sweep={tmp}/missing_sweep.yaml"),
        "error: sweep file {tmp}/missing_sweep.yaml does not exist",
    ),
    Mistake(
        "sweep of a mistyped parameter",
        ("sweep", "--config={config}", "--sweep={tmp}/keep_rato_sweep.yaml"),
        "error: {tmp}/keep_rato_sweep.yaml: parameter 'model.init_args.keep_rato' is not a key of the config; did "
        "you mean model.init_args.keep_ratio, model.init_args.keep_gradient, model.init_args.min_lr_ratio?",
    ),
    Mistake(
        "export to TFLite",
        ("export", "--config={config}", "--format=tflite"),
        "error: --format tflite: choose from onnx",
        2,
    ),
    Mistake(
        "benchmark at fp8",
        ("benchmark", "--config={config}", "--precision=fp8"),
        "error: unknown precision 'fp8': choose from ['fp32', 'bf16', 'int8'] (or --precision auto: every "
        "deployment path here, measured, the fastest chosen)",
    ),
    Mistake(
        "benchmark into a file",
        ("benchmark", "--config={config}", "--out={tmp}/random.ckpt"),
        "error: --out {tmp}/random.ckpt is a file: give a folder to write the results into",
    ),
    Mistake(
        "benchmark --precision auto into a file",
        ("benchmark", "--config={config}", "--precision=auto", "--out={tmp}/random.ckpt"),
        "error: --out {tmp}/random.ckpt is a file: give a folder to write the results into",
    ),
    Mistake(
        "benchmark at a batch size of 0",
        ("benchmark", "--config={config}", "--batch_size=0"),
        "error: --batch_size must be >= 1, got 0",
    ),
    Mistake(
        "benchmark on a device torch does not know",
        ("benchmark", "--config={config}", "--device=foo"),
        "error: --device foo: not a device torch knows: give cpu, cuda or cuda:<index>",
    ),
    Mistake(
        "benchmark keep ratio above 1",
        ("benchmark", "--config={config}", "--ratios=[1.5]"),
        "error: keep ratios must be in (0, 1], got [1.5]",
    ),
    Mistake(
        "benchmark of a mistyped method",
        ("benchmark", "--config={config}", "--methods=[tome,dynamicvitt]"),
        # The registered methods, as the registry lists them (a new method changes this line and its reference row).
        f"error: unknown token-reduction method 'dynamicvitt': choose one of {sorted(methods.registered())}; "
        "did you mean 'dynamicvit'?",
    ),
]


def write_image_folder_tree(root: Path, train: list[str], val: list[str], empty: tuple[str, ...] = ()) -> Path:
    """``root/{train,val}/<class>/{0,1}.jpg`` (16-px photos), the training classes of ``empty`` without images."""
    for split, classes in (("train", train), ("val", val)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            if split == "train" and name in empty:
                continue
            for i in range(2):
                Image.new("RGB", (16, 16), (100 * i, 50, 0)).save(folder / f"{i}.jpg")
    return root


@pytest.fixture
def workspace(tmp_path: Path) -> dict[str, str]:
    """The files the mistakes name: the tiny config, config files with a typo, and bad checkpoints."""
    config = tiny_config(tmp_path / "run")
    config["wandb"] = {"enabled": False}
    write_config(tmp_path / "config.yaml", config)
    typo = copy.deepcopy(config)
    typo["model"]["init_args"]["keep_ration"] = typo["model"]["init_args"].pop("keep_ratio")
    write_config(tmp_path / "keep_ration.yaml", typo)
    typo = copy.deepcopy(config)
    typo["trainer"]["max_epoch"] = typo["trainer"].pop("max_epochs")
    write_config(tmp_path / "max_epoch.yaml", typo)
    torch.save({"weights": torch.zeros(1000)}, tmp_path / "whole.ckpt")
    (tmp_path / "truncated.ckpt").write_bytes((tmp_path / "whole.ckpt").read_bytes()[:1000])
    (tmp_path / "random.ckpt").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4000)))
    torch.save(
        create_teacher("vit_tiny_patch16_224", **ARCH, img_size=32, in_chans=1).state_dict(), tmp_path / "weights.pth"
    )
    folder = copy.deepcopy(config)
    folder["data"] = {
        "class_path": "dynvit.data.ImageFolderDataModule",
        "init_args": {"root": str(tmp_path / "photos"), "batch_size": 2, "num_workers": 0},
    }
    write_config(tmp_path / "folder.yaml", folder)
    write_image_folder_tree(tmp_path / "other_classes", ["a", "b"], ["a", "c"])
    write_image_folder_tree(tmp_path / "empty_class", ["a", "b"], ["a", "b"], empty=("b",))
    write_image_folder_tree(tmp_path / "one_class", ["a"], ["a"])
    (tmp_path / "no_train" / "val" / "a").mkdir(parents=True)
    for name in ("photos", "truncated", "random"):
        write_image_folder_tree(tmp_path / name, ["a", "b"], ["a", "b"])
    photo = tmp_path / "truncated" / "train" / "a" / "0.jpg"
    photo.write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
    (tmp_path / "random" / "train" / "a" / "0.jpg").write_bytes(random.Random(0).randbytes(500))
    (tmp_path / "keep_rato_sweep.yaml").write_text(
        "method: grid\nparameters:\n  model.init_args.keep_rato:\n    values: [0.5]\n"
    )
    return {"config": str(tmp_path / "config.yaml"), "tmp": str(tmp_path)}


def filled_in(text: str, workspace: dict[str, str]) -> str:
    """``text`` with ``{config}`` and ``{tmp}`` replaced (not ``str.format``: lines hold other braces)."""
    for name, value in workspace.items():
        text = text.replace(f"{{{name}}}", value)
    return text


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_a_mistake_ends_with_one_error_line_and_changes_nothing(workspace, capsys, mistake):
    args = [filled_in(arg, workspace) for arg in mistake.args]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == mistake.status
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == filled_in(mistake.line, workspace)
    assert "Traceback" not in err and "Given value" not in err
    assert not (Path(workspace["tmp"]) / "run").exists()


def test_every_mistake_is_listed_with_its_line_in_the_reference():
    reference = (ROOT / "docs" / "reference.md").read_text()
    section = reference.split("## First-week mistakes", 1)[1].split("\n## ", 1)[0]
    for mistake in MISTAKES:
        row = f"| {mistake.name} | `{' '.join(mistake.args)}` | `{mistake.line}` |"
        assert row in section, row
    assert f"{len(MISTAKES)} mistakes" in section


def test_a_data_size_other_than_the_models_names_both(tmp_path, capsys):
    config = tiny_config(tmp_path / "run")
    config["data"] = {"class_path": "dynvit.data.SyntheticDataModule", "init_args": {"img_size": 30, "in_chans": 1}}
    config["wandb"] = {"enabled": False}
    path = write_config(tmp_path / "config.yaml", config)
    lines = error_lines(capsys, "fit", f"--config={path}")
    assert lines == [
        "error: SyntheticDataModule has img_size=30 but the model expects 32x32 images: drop the DataModule's "
        "img_size (it follows the model) or build the model with img_size=30"
    ]


def test_teacher_of_another_class_count_names_both_counts_without_reset_head(tmp_path, capsys):
    teacher = save_teacher(tmp_path / "teacher.pth", num_classes=3)
    lines = error_lines(capsys, "fit", f"--config={config_path(tmp_path, teacher_checkpoint=str(teacher))}")
    text = "\n".join(lines)
    assert lines[0].startswith("error: teacher_checkpoint is not a vit_tiny_patch16_224 teacher for this data")
    assert "3 classes in the checkpoint, 10 in the model" in text
    assert "reset_head" not in text and "Given value" not in text
    # The message's own last line ends the output.
    assert lines[-1] == (
        "The teacher must be trained on the data's classes, and model_name/model_kwargs must describe its architecture"
    )


def test_teacher_of_another_architecture_lists_the_difference_without_reset_head(tmp_path, capsys):
    teacher = save_teacher(tmp_path / "teacher.pth", depth=2)
    lines = error_lines(capsys, "fit", f"--config={config_path(tmp_path, teacher_checkpoint=str(teacher))}")
    text = "\n".join(lines)
    assert "missing keys (24): blocks.2." in text
    assert "reset_head" not in text


def test_a_classifier_checkpoint_of_another_class_count_suggests_reset_head(tmp_path):
    teacher = save_teacher(tmp_path / "teacher.pth", num_classes=3)
    with pytest.raises(ValueError, match=r"3 classes in the checkpoint, 10 in the model\): pass reset_head=True"):
        ClassifierModule(
            "vit_tiny_patch16_224", num_classes=10, img_size=32, in_chans=1, model_kwargs=ARCH, checkpoint=str(teacher)
        )


def test_validate_with_a_checkpoint_of_another_class_count_names_both_counts(tmp_path, capsys):
    config = tiny_config(tmp_path / "three")
    config["model"] = {
        "class_path": "dynvit.lightning.ClassifierModule",
        "init_args": {
            "model_name": "vit_tiny_patch16_224",
            "img_size": 32,
            "model_kwargs": ARCH,
            "lr_base_batch_size": None,
        },
    }
    config["throughput"]["enabled"] = False
    config["wandb"] = {"enabled": False}
    digits = write_config(tmp_path / "digits.yaml", config)
    config["data"] = {
        "class_path": "dynvit.data.SyntheticDataModule",
        "init_args": {
            "num_classes": 3,
            "img_size": 32,
            "in_chans": 1,
            "train_size": 16,
            "val_size": 8,
            "batch_size": 8,
        },
    }
    main(["fit", f"--config={write_config(tmp_path / 'three.yaml', config)}"])
    ckpt = tmp_path / "three" / "checkpoints" / "last.ckpt"
    lines = error_lines(capsys, "validate", f"--config={digits}", f"--ckpt_path={ckpt}")
    assert lines[-1] == (
        f"error: checkpoint {ckpt} was trained for 3 classes, but this model is built for 10 (the data's class "
        "count): evaluate it on data with 3 classes, or fine-tune it with a new head"
    )
    # Another architecture. (The CLI re-reads a checkpoint's hyper-parameters over the config, so this
    # happens through the Python API.) The keys that differ, not Lightning's `size mismatch`.
    shallow = ClassifierModule(
        "vit_tiny_patch16_224", num_classes=3, img_size=32, in_chans=1, model_kwargs=ARCH | {"depth": 2}
    )
    data = SyntheticDataModule(num_classes=3, img_size=32, in_chans=1, val_size=8, batch_size=8)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(CheckpointMismatch) as raised:
        trainer.validate(shallow, data, ckpt_path=ckpt, verbose=False)
    lines = str(raised.value).splitlines()
    assert lines[0] == f"checkpoint {ckpt} does not fit this VisionTransformer:"
    assert "  not in the model: blocks.2.norm1.weight" in lines
    assert lines[-1] == "Was it written by another config (model_name, model_kwargs, pruning_loc)?"


def test_an_error_of_a_dependency_keeps_its_traceback_without_the_namespace_dump(tmp_path, capsys):
    lines = error_lines(capsys, "fit", f"--config={config_path(tmp_path)}", "--model.init_args.model_kwargs={depht: 3}")
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "TypeError: VisionTransformer.__init__() got an unexpected keyword argument 'depht'"
    assert not any("Given value" in line or "Union subtypes" in line for line in lines)


def test_the_traceback_switch_shows_the_whole_error(tmp_path, monkeypatch):
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ValueError) as raised:
        main(["fit", f"--config={config_path(tmp_path)}", "--model.init_args.keep_ratio=0"])
    chain = [raised.value, raised.value.__cause__]
    assert any("keep_ratio must be in (0, 1]" in str(e) for e in chain)


def test_cli_py_exits_1_with_the_message_as_its_last_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop(TRACEBACK_ENV, None)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "cli.py"),
            "fit",
            f"--config={config_path(tmp_path)}",
            "--model.init_args.keep_ratio=0",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "error: keep_ratio must be in (0, 1], got 0.0"
    assert "Traceback" not in done.stderr


def test_export_of_a_freshly_pruned_student_passes_the_check(workspace, capsys):
    """Predictors at their initial state, started at the target keep rate as digits_prune.yaml does: their keep
    scores differ by 0 to ~1e-6, so ties at a top-k cut are common. Both runtimes break them by index."""
    out = Path(workspace["tmp"]) / "fresh.onnx"
    main(["export", f"--config={workspace['config']}", "--model.init_args.start_at_target=true", f"--out={out}"])
    printed = capsys.readouterr().out
    assert f"wrote {out} (checked in onnxruntime against eager PyTorch on 16 images: logits agree to " in printed
    assert out.is_file()


@pytest.mark.parametrize(
    ("option", "warning", "checked"),
    [
        ("--check=false", r"fresh.onnx was not checked in onnxruntime against eager PyTorch \(--check false\)", False),
        ("--check_tolerance=0.01", r"--check_tolerance 0.01 accepts larger differences than the default 0.0001", True),
    ],
)
def test_the_export_check_can_be_loosened_or_skipped_with_a_warning(workspace, capsys, option, warning, checked):
    out = Path(workspace["tmp"]) / "fresh.onnx"
    with pytest.warns(UserWarning, match=warning):
        main(["export", f"--config={workspace['config']}", f"--out={out}", option])
    assert ("checked in onnxruntime" in capsys.readouterr().out) is checked
    assert out.is_file()


@pytest.mark.parametrize(
    ("processes", "threads", "cores", "advice"),
    [
        (3, 1, 2, "Use --trainer.devices 2 or fewer on this machine"),
        (2, 2, 2, "Use --trainer.devices 1 on this machine"),
        (2, 1, 2, None),
        (1, 2, 2, None),
    ],
)
def test_more_threads_than_cores_is_warned_about(processes, threads, cores, advice):
    message = oversubscription(processes, threads, cores)
    if advice is None:
        assert message is None
    else:
        assert message == (
            f"--trainer.devices {processes} starts {processes} training processes of {threads} thread(s) each on "
            f"{cores} CPU core(s): they take turns on the cores and train slower than one process. {advice}"
        )


def test_three_cpu_devices_on_two_cores_warn_before_training(workspace, monkeypatch):
    monkeypatch.setattr("dynvit.run.cli.cpu_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    # Lightning gives each of the 3 processes max(1, 2 // 3) = 1 thread. The warning comes as the trainer is
    # built, before any subcommand runs: this one then stops at its own check, before starting any process.
    args = ["export", f"--config={workspace['config']}", "--trainer.devices=3", "--check_tolerance=0"]
    warned = r"--trainer.devices 3 starts 3 training processes of 1 thread\(s\) each"
    with pytest.warns(UserWarning, match=warned), pytest.raises(ValueError, match="check_tolerance must be > 0"):
        DynViTCLI(args=args)


@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_a_gpu_accelerator_on_a_machine_without_one_is_one_line(workspace, capsys, monkeypatch, accelerator):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lines = error_lines(capsys, "fit", f"--config={workspace['config']}", f"--trainer.accelerator={accelerator}")
    assert lines[-1] == (
        f"error: --trainer.accelerator {accelerator}: this machine has no GPU that torch can use "
        "(torch.cuda.is_available() is False): use --trainer.accelerator cpu, or auto to take a GPU when there is one"
    )
    assert not (Path(workspace["tmp"]) / "run").exists()


def test_options_before_config_that_it_also_sets_are_named(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "trainer: {default_root_dir: runs/x, max_epochs: 2}\n"
        "model: {class_path: dynvit.lightning.DynamicViTModule, init_args: {keep_ratio: 0.7}}\n"
    )
    before = ["--trainer.default_root_dir", "mine", "--model.keep_ratio=0.5", "--trainer.max_steps", "3"]
    line = ["fit", *before, "--config", str(config), "--trainer.max_epochs", "4"]
    # max_steps is not in the config, and options after --config override it as meant.
    assert options_before_config(line) == ["--trainer.default_root_dir", "--model.keep_ratio"]
    assert options_before_config(["fit", f"--config={config}", "--trainer.default_root_dir", "x"]) == []
    assert options_before_config(["fit", "--trainer.max_epochs", "1", "--config", str(tmp_path / "none.yaml")]) == []


def test_the_nearest_name_is_found_whatever_the_case():
    from dynvit.run.errors import _did_you_mean

    assert _did_you_mean("ONNX", ["onnx"]) == "; did you mean onnx?"
    assert _did_you_mean("--trainer.Max_Epochs", ["--trainer.max_epochs", "--trainer.max_steps"]) == (
        "; did you mean --trainer.max_epochs?"
    )
    assert _did_you_mean("tflite", ["onnx"]) == ""
