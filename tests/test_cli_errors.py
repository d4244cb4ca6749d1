"""A config or data error ends with dynvit's own message: alone, last, with a non-zero exit status.

``cli.py`` (``dynvit.run.cli.main``) prints ``error: <message>`` instead of jsonargparse's chained
tracebacks and ``Given value: Namespace(...)`` dump; ``DYNVIT_TRACEBACK=1`` shows the traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from dynvit import create_teacher
from dynvit.data import SyntheticDataModule
from dynvit.lightning import ClassifierModule
from dynvit.models import CheckpointMismatch
from dynvit.run.cli import main
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


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("--model.init_args.keep_ratio=0", "error: keep_ratio must be in (0, 1], got 0.0"),
        (
            "--model.init_args.pruning_loc=[1,2,4]",
            "error: pruning_loc (1, 2, 4) must index blocks 0..3 of this 4-block model",
        ),
        (
            "--model.init_args.img_size=30",
            "error: img_size (30, 30) is not a multiple of vit_tiny_patch16_224's patch size (4, 4): use e.g. 28",
        ),
    ],
)
def test_config_errors_end_with_their_message(tmp_path, capsys, change, message):
    lines = error_lines(capsys, "fit", f"--config={config_path(tmp_path)}", change)
    assert lines == [message]


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
