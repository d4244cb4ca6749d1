"""Checkpoints hold what their names say, and a run folder holds one run.

``last.ckpt`` is the end of the most recent epoch whatever ``val/top1`` did (pinned with lr 0, where it
never improves: Lightning 2.6's ``save_last=True`` beside a monitored top-k would leave it at epoch 0);
``best-*.ckpt`` is the best ``val/top1``; a second ``fit`` into a used folder continues it with
``--ckpt_path last`` or is refused; a finished run is not trained again; student checkpoints record
their teacher.
"""

from __future__ import annotations

import copy
import csv
import hashlib
from pathlib import Path

import lightning as L
import pytest
import torch

from dynvit import create_teacher
from dynvit.run.cli import DynViTCLI, main, typed_model_options
from dynvit.run.loggers import WandbOptions, default_loggers
from tests.tiny_config import STUDENT, benchmark_rows, tiny_config, write_config

TEACHER = {k: v for k, v in STUDENT.items() if k != "pruning_loc"}
BATCHES = 2  # training batches per epoch in tiny_config


def teacher_config(root: Path, max_epochs: int = 2, **model) -> dict:
    config = tiny_config(root, max_epochs)
    config["model"] = {"class_path": "dynvit.lightning.ClassifierModule", "init_args": copy.deepcopy(TEACHER) | model}
    config["throughput"]["enabled"] = False
    config["wandb"] = {"enabled": False}
    return config


def fit(tmp_path: Path, config: dict, *extra: str) -> DynViTCLI:
    path = write_config(tmp_path / "config.yaml", config)
    return DynViTCLI(args=["fit", f"--config={path}", *extra])


def saved(path: Path) -> tuple[int, int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt["epoch"], ckpt["global_step"]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class StopAfterFirstEpoch(L.Callback):
    """Ends a fit after its first epoch, as a pre-empted job would."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """Two epochs at lr 0: val/top1 never improves after epoch 0."""
    tmp_path = tmp_path_factory.mktemp("lr0")
    fit(tmp_path, teacher_config(tmp_path / "run", lr=0.0))
    return tmp_path


def test_last_is_the_last_epoch_and_best_the_best_when_the_metric_does_not_improve(finished_run):
    checkpoints = finished_run / "run" / "checkpoints"
    assert sorted(files(checkpoints)) == ["best-000.ckpt", "last.ckpt"]
    assert saved(checkpoints / "last.ckpt") == (1, 2 * BATCHES)
    assert saved(checkpoints / "best-000.ckpt") == (0, BATCHES)
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    best_state = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert Path(best_state["best_model_path"]).name == "best-000.ckpt"
    # The class names of the data travel in every checkpoint (predict names its classes with them).
    assert last["class_names"] == [str(k) for k in range(10)]


def test_a_second_fit_into_a_used_folder_is_refused_before_training(finished_run, capsys):
    config = write_config(finished_run / "config.yaml", teacher_config(finished_run / "run", lr=0.0))
    before = files(finished_run / "run" / "checkpoints")
    with pytest.raises(SystemExit) as done:
        main(["fit", f"--config={config}"])
    assert done.value.code == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f"error: {finished_run / 'run'} already holds a run")
    assert "--ckpt_path last" in last_line and "--trainer.default_root_dir" in last_line
    assert "delete" in last_line
    assert files(finished_run / "run" / "checkpoints") == before  # nothing trained, no -v1 files


def test_ckpt_path_last_on_a_finished_run_trains_nothing(finished_run, capsys):
    before = files(finished_run / "run" / "checkpoints")
    cli = fit(finished_run, teacher_config(finished_run / "run", lr=0.0), "--ckpt_path=last")
    assert "is finished (2 epoch(s), step 4; max_epochs=2): nothing to train" in capsys.readouterr().out
    assert cli.finished == finished_run / "run" / "checkpoints" / "last.ckpt"
    assert cli.trainer.global_step == 0
    assert files(finished_run / "run" / "checkpoints") == before


def test_an_interrupted_run_continues_from_its_last_epoch(tmp_path):
    config = teacher_config(tmp_path / "run")
    config["trainer"]["callbacks"] = [{"class_path": "tests.test_run_folder.StopAfterFirstEpoch"}]
    fit(tmp_path, config)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert saved(last) == (0, BATCHES)
    # A raised limit continues a finished run the same way.
    cli = fit(tmp_path, teacher_config(tmp_path / "run"), "--ckpt_path=last")
    assert cli.finished is None
    assert saved(last) == (1, 2 * BATCHES)


def test_last_is_also_written_when_max_steps_ends_fit_within_an_epoch(tmp_path):
    fit(tmp_path, teacher_config(tmp_path / "run"), "--trainer.max_steps=3")
    assert saved(tmp_path / "run" / "checkpoints" / "last.ckpt") == (1, 3)


def test_ckpt_path_last_without_a_checkpoint_is_an_error_not_a_fresh_start(tmp_path, capsys):
    config = write_config(tmp_path / "config.yaml", teacher_config(tmp_path / "run"))
    for command in ("fit", "validate"):
        with pytest.raises(SystemExit) as done:
            main([command, f"--config={config}", "--ckpt_path=last"])
        assert done.value.code == 1
        last_line = capsys.readouterr().err.strip().splitlines()[-1]
        assert last_line.startswith(f"error: --ckpt_path last: there is no {tmp_path / 'run/checkpoints/last.ckpt'}")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lightning_save_last_is_refused(tmp_path):
    with pytest.raises(ValueError, match="drop checkpoint.save_last"):
        fit(tmp_path, teacher_config(tmp_path / "run"), "--checkpoint.save_last=true")


def test_student_checkpoints_record_their_teacher_and_benchmark_prints_it(tmp_path, capsys):
    torch.manual_seed(0)
    arch = {k: v for k, v in TEACHER["model_kwargs"].items()}
    teacher = create_teacher("vit_tiny_patch16_224", num_classes=10, img_size=32, in_chans=1, **arch)
    teacher_path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, teacher_path)
    config = tiny_config(tmp_path / "run")
    config["model"]["init_args"]["teacher_checkpoint"] = str(teacher_path)
    config["throughput"]["enabled"] = False
    config["wandb"] = {"enabled": False}
    fit(tmp_path, config)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    record = torch.load(last, map_location="cpu", weights_only=False)["dynvit"]["teacher"]
    sha = hashlib.sha256(teacher_path.read_bytes()).hexdigest()
    assert record == {"path": str(teacher_path.resolve()), "sha256": sha}
    capsys.readouterr()
    path = write_config(tmp_path / "config.yaml", config)
    benchmark_rows(path, tmp_path / "b", f"--ckpt_path={last}", "--ratios=[0.7]", "--accuracy=false")
    out = capsys.readouterr().out
    assert f"student {last}: distilled from {teacher_path.resolve()} (sha256 {sha})" in out
    assert f"teacher here: {teacher_path.resolve()} (sha256 {sha}) (the same file)" in out


def test_model_options_typed_with_ckpt_path_win_over_the_checkpoint_hyperparameters(tmp_path):
    """Lightning 2.6 replaces the parsed model config by the checkpoint's hyperparameters; an option the
    user types (a moved teacher file, another keep ratio) must still be the one used."""
    torch.manual_seed(0)
    teacher = create_teacher("vit_tiny_patch16_224", num_classes=10, img_size=32, in_chans=1, **TEACHER["model_kwargs"])
    trained_with = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, trained_with)
    config = tiny_config(tmp_path / "run")
    config["model"]["init_args"] |= {"teacher_checkpoint": str(trained_with), "keep_ratio": 0.7}
    config["throughput"]["enabled"] = False
    config["wandb"] = {"enabled": False}
    fit(tmp_path, config)
    moved = trained_with.rename(tmp_path / "moved_teacher.pth")
    path = write_config(tmp_path / "config.yaml", config)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    cli = DynViTCLI(
        args=[
            "validate",
            f"--config={path}",
            f"--ckpt_path={last}",
            f"--model.init_args.teacher_checkpoint={moved}",
            "--model.keep_ratio=0.5",
        ]
    )
    assert cli.model.net.keep_ratio == 0.5
    assert cli.model.hparams.teacher_checkpoint == str(moved)
    assert torch.equal(cli.model.teacher.state_dict()["head.weight"], teacher.state_dict()["head.weight"])


def test_typed_model_options_name_config_keys():
    line = [
        "fit",
        "--model.init_args.keep_ratio=0.5",
        "--model.lr",
        "1e-3",
        "--model.model_kwargs.depth=2",
        "--data.x=1",
    ]
    assert typed_model_options(line) == [
        "model.init_args.keep_ratio",
        "model.init_args.lr",
        "model.init_args.model_kwargs",
    ]
    assert typed_model_options(None) == []


def test_a_resumed_fit_logs_into_its_first_csv_and_evaluations_into_their_own_folders(tmp_path, capsys):
    run = tmp_path / "run"
    config = tiny_config(run)
    config["throughput"]["enabled"] = False
    config["wandb"] = {"enabled": False}
    fit(tmp_path, config)
    started = (run / "csv" / "version_0" / "config.yaml").read_bytes()
    config["trainer"]["max_epochs"] = 2
    fit(tmp_path, config, "--ckpt_path=last")
    path = tmp_path / "config.yaml"
    DynViTCLI(args=["validate", f"--config={path}", "--ckpt_path=last"])
    # One run, one metrics file: epoch 0 from the first fit, epoch 1 from the resumed one.
    assert sorted(p.name for p in (run / "csv").iterdir()) == ["version_0"]
    with open(run / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows if row["val/top1"]] == ["0", "1"]
    # The resumed run's config goes beside the first one's, which stays as it was.
    assert (run / "csv" / "version_0" / "config.yaml").read_bytes() == started
    assert "max_epochs: 2" in (run / "csv" / "version_0" / "config-resumed-1.yaml").read_text()
    with open(run / "validate" / "csv" / "version_0" / "metrics.csv") as f:
        (evaluation,) = [row for row in csv.DictReader(f) if row["val/top1"]]
    assert 0 <= float(evaluation["val/top1"]) <= 1
    # The trained student exports and passes the onnxruntime check.
    DynViTCLI(args=["export", f"--config={path}", "--ckpt_path=last", f"--out={tmp_path / 'student.onnx'}"])
    assert "checked in onnxruntime against eager PyTorch on 16 images" in capsys.readouterr().out


def test_a_resumed_fit_continues_its_wandb_run_and_an_evaluation_logs_apart(tmp_path):
    options = WandbOptions()
    first = default_loggers(tmp_path, options)[1]
    resumed = default_loggers(tmp_path, options, resume=True)[1]
    assert resumed.version == first.version == (tmp_path / "wandb" / "run-id").read_text()
    assert default_loggers(tmp_path, options)[1].version != first.version  # a new run in the folder
    csv_logger, evaluation = default_loggers(tmp_path, options, job="validate")
    assert csv_logger.root_dir == str(tmp_path / "validate" / "csv")
    assert evaluation.save_dir == str(tmp_path / "validate") and evaluation.version is None  # W&B names it
    assert not (tmp_path / "validate").exists()  # made when something is logged
