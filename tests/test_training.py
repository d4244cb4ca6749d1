"""The Lightning pipeline: modules, losses in training, stability, resume, DDP and the CLI."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from dynvit import create_teacher
from dynvit.data import ImageFolderDataModule, SyntheticDataModule, write_image_folder
from dynvit.lightning import ClassifierModule, DynamicViTModule
from dynvit.models import CheckpointMismatch, MaskedAttention, read_state_dict
from dynvit.run.cli import DynViTCLI
from tests.conftest import TINY, TINY_LOC

ROOT = Path(__file__).resolve().parents[1]
MODEL_KWARGS = {k: TINY[k] for k in ("patch_size", "embed_dim", "depth", "num_heads")}


def tiny_data(**kwargs) -> SyntheticDataModule:
    args = dict(num_classes=TINY["num_classes"], img_size=TINY["img_size"], train_size=64, val_size=32, batch_size=16)
    return SyntheticDataModule(**(args | kwargs))


def tiny_student(teacher_checkpoint=None, **kwargs) -> DynamicViTModule:
    args = dict(
        model_name="deit_tiny_patch16_224",
        num_classes=TINY["num_classes"],
        img_size=TINY["img_size"],
        pruning_loc=TINY_LOC,
        model_kwargs=MODEL_KWARGS,
        teacher_checkpoint=teacher_checkpoint,
        lr=1e-2,
        lr_base_batch_size=None,
        warmup_epochs=0,
    )
    return DynamicViTModule(**(args | kwargs))


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    args = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**(args | kwargs))


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> str:
    """A tiny teacher's weights in the DeiT release layout ({"model": state_dict})."""
    torch.manual_seed(1)
    teacher = create_teacher("deit_tiny_patch16_224", **TINY)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, path)
    return str(path)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.keep: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.keep.append(float(trainer.callback_metrics["train/keep_rate_s3"]))


def test_student_starts_from_teacher_and_teacher_stays_frozen(tmp_path, teacher_ckpt):
    module = tiny_student(teacher_ckpt)
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    for k, v in module.teacher.state_dict().items():
        assert torch.equal(module.net.state_dict()[k], v), k
    t = trainer(tmp_path, max_steps=3, limit_val_batches=0)
    t.fit(module, tiny_data())
    optimised = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.net.parameters()}
    assert module.teacher.training is False
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    for k, v in module.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert not torch.equal(module.net.blocks[0].attn.qkv.weight, teacher_before["blocks.0.attn.qkv.weight"])


def test_keep_gradient_reaches_every_masked_attention(teacher_ckpt):
    module = tiny_student(teacher_ckpt, keep_gradient="secant")
    layers = [m for m in module.net.modules() if isinstance(m, MaskedAttention)]
    assert len(layers) == TINY["depth"] and all(m.keep_gradient == "secant" for m in layers)


@pytest.mark.parametrize("start_at_target", [False, True])
def test_start_at_target_sets_the_predictor_bias_after_the_teacher_load(teacher_ckpt, start_at_target):
    module = tiny_student(teacher_ckpt, keep_ratio=0.7, start_at_target=start_at_target)
    bias = torch.stack([p.out_conv[-2].bias for p in module.net.score_predictor])
    expected = torch.tensor([0.7, 0.3]).log() if start_at_target else torch.zeros(2)
    assert torch.allclose(bias, expected.expand_as(bias))


def test_loss_falls_over_a_few_steps(tmp_path, teacher_ckpt):
    recorder = LossRecorder()
    data = tiny_data(train_size=32, batch_size=32)
    module = tiny_student(teacher_ckpt, lr=5e-3, backbone_lr_scale=1.0)
    trainer(tmp_path, max_steps=25, limit_val_batches=0, callbacks=[recorder]).fit(module, data)
    first, last = sum(recorder.losses[:3]) / 3, sum(recorder.losses[-3:]) / 3
    assert last < 0.8 * first


def test_ratio_term_moves_kept_rate_toward_target(tmp_path, teacher_ckpt):
    recorder = LossRecorder()
    module = tiny_student(teacher_ckpt, keep_ratio=0.9, ratio_weight=20.0, distill_weight=0.0, token_weight=0.0)
    trainer(tmp_path, max_steps=20, limit_val_batches=0, callbacks=[recorder]).fit(module, tiny_data())
    target = 0.9**3  # random predictors keep about 0.5**3 at stage 3
    assert abs(sum(recorder.keep[-3:]) / 3 - target) < 0.8 * abs(recorder.keep[0] - target)


def test_aggressive_ratio_trains_with_finite_losses(tmp_path, teacher_ckpt):
    recorder = LossRecorder()
    module = tiny_student(teacher_ckpt, keep_ratio=0.3)
    trainer(tmp_path, max_epochs=3, gradient_clip_val=1.0, callbacks=[recorder]).fit(module, tiny_data())
    assert len(recorder.losses) == 3 * 4
    assert all(torch.isfinite(torch.tensor(recorder.losses)))


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, teacher_ckpt):
    module = tiny_student(teacher_ckpt)
    with torch.no_grad():
        module.net.head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, tiny_data())


class Interrupt(L.Callback):
    """Stops a run after its first epoch, as a crash or a pre-empted job would."""

    def on_train_epoch_end(self, trainer, module) -> None:
        trainer.should_stop = True


def randaugment_folder(root: Path) -> ImageFolderDataModule:
    """Photos-like image folders under timm's RandAugment and random erasing, which draw from Python's
    ``random`` (in this process: no workers)."""
    write_image_folder(root, classes=[str(k) for k in range(TINY["num_classes"])], per_class=2, img_size=40)
    # root as text, as the CLI gives it: a Path in the hyper-parameters would not load with weights_only=True.
    return ImageFolderDataModule(str(root), batch_size=10, num_workers=0, re_prob=0.5, verify_images=False)


@pytest.mark.parametrize("data", ["synthetic", "randaugment"])
def test_resume_matches_uninterrupted_run(tmp_path, teacher_ckpt, data):
    def run(root: Path, callbacks=(), ckpt_path: str | None = None) -> DynamicViTModule:
        L.seed_everything(0)
        module = tiny_student(teacher_ckpt)
        t = trainer(root, max_epochs=2, enable_checkpointing=True, limit_val_batches=0, callbacks=list(callbacks))
        t.fit(
            module, tiny_data() if data == "synthetic" else randaugment_folder(tmp_path / "images"), ckpt_path=ckpt_path
        )
        return module

    straight = run(tmp_path / "a")
    interrupted = run(tmp_path / "b", callbacks=[Interrupt()])
    assert interrupted.current_epoch == 1  # stopped after epoch 0 of 2
    last = next((tmp_path / "b").rglob("*.ckpt"))
    resumed = run(tmp_path / "b", ckpt_path=str(last))
    for (k, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def draws() -> tuple:
    """One draw of each generator a training step may use."""
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)], random.gauss(0, 1)


def test_checkpoints_carry_every_generator_and_old_ones_still_load(tmp_path, teacher_ckpt):
    module = tiny_student(teacher_ckpt)
    module.trainer = trainer(tmp_path)
    random.seed(3)
    random.gauss(0, 1)  # leaves a second Gaussian cached in the state, which is restored too
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path / "states.ckpt"
    torch.save(checkpoint, path)
    expected = draws()
    checkpoint = torch.load(path, weights_only=True)  # tensors only, as Lightning may load it
    module.on_load_checkpoint(checkpoint)
    assert draws() == expected
    # A checkpoint written before Python's state was stored loads, restoring the others.
    del checkpoint["rng_states"]["python"]
    module.on_load_checkpoint(checkpoint)
    now = draws()
    assert now[:2] == expected[:2] and now[2:] != expected[2:]


def tiny_classifier(**kwargs) -> ClassifierModule:
    """A plain tiny DeiT classifier module, ``kwargs`` replacing its arguments."""
    args = dict(
        model_name="deit_tiny_patch16_224",
        num_classes=TINY["num_classes"],
        img_size=TINY["img_size"],
        model_kwargs=MODEL_KWARGS,
        lr_base_batch_size=None,
    )
    return ClassifierModule(**(args | kwargs))


def test_mixup_with_an_odd_batch_is_refused_before_the_first_step(tmp_path):
    module = tiny_classifier(cutmix=1.0)
    message = (
        "mixup/cutmix need an even batch_size (timm's Mixup pairs the images of a batch), got batch_size 15 with "
        "mixup=0, cutmix=1: use batch_size 14 or 16, or set mixup and cutmix to 0"
    )
    with pytest.raises(ValueError) as raised:
        trainer(tmp_path, max_steps=1).fit(module, tiny_data(batch_size=15))
    assert str(raised.value) == message
    assert module.global_step == 0
    trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, tiny_data(batch_size=16))
    assert module.global_step == 1


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"num_classes": 1}, "num_classes must be >= 2, got 1: a classifier needs at least 2 classes"),
        ({"label_smoothing": 1.5}, "label_smoothing must be in [0, 1), got 1.5"),
        ({"mixup": -1.0}, "mixup must be >= 0 (its Beta distribution's alpha; 0 turns it off), got -1.0"),
        ({"cutmix": -0.5}, "cutmix must be >= 0 (its Beta distribution's alpha; 0 turns it off), got -0.5"),
    ],
)
def test_classification_options_out_of_range_are_refused_naming_the_option(option, message):
    with pytest.raises(ValueError) as raised:
        tiny_classifier(**option)
    assert str(raised.value).startswith(message)


def test_checkpoint_holds_student_not_teacher_and_reloads(tmp_path, teacher_ckpt):
    module = tiny_student(teacher_ckpt)
    t = trainer(tmp_path, max_steps=2, limit_val_batches=0, enable_checkpointing=True)
    t.fit(module, tiny_data())
    ckpt = next(tmp_path.rglob("*.ckpt"))
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert not any(k.startswith("teacher.") for k in raw["state_dict"])
    sd = read_state_dict(ckpt)
    assert any(k.startswith("score_predictor.") for k in sd)
    reloaded = DynamicViTModule.load_from_checkpoint(ckpt)
    for k, v in module.net.state_dict().items():
        assert torch.equal(reloaded.net.state_dict()[k], v), k


@pytest.mark.parametrize(
    "problem, error",
    [
        ("missing", FileNotFoundError),
        ("other_classes", CheckpointMismatch),
        ("other_arch", CheckpointMismatch),
    ],
)
def test_bad_teacher_checkpoint_fails_before_training(tmp_path, problem, error):
    path = str(tmp_path / "t.pth")
    if problem == "other_classes":
        torch.save({"model": create_teacher("deit_tiny_patch16_224", **(TINY | {"num_classes": 3})).state_dict()}, path)
    elif problem == "other_arch":
        torch.save({"model": create_teacher("deit_tiny_patch16_224", **(TINY | {"depth": 2})).state_dict()}, path)
    with pytest.raises(error):
        tiny_student(path)


def test_unknown_model_name_is_reported_with_suggestions():
    with pytest.raises(ValueError, match="deit_small_patch16_224"):
        ClassifierModule(model_name="deit_smal_patch16_224")


def test_classifier_trains_and_reports_top1_top5(tmp_path):
    module = tiny_classifier(lr=1e-3, warmup_epochs=0)
    t = trainer(tmp_path, max_epochs=1)
    t.fit(module, tiny_data())
    metrics = t.validate(module, tiny_data(), verbose=False)[0]
    assert 0.0 <= metrics["val/top1"] <= metrics["val/top5"] <= 1.0


# -- the CLI -------------------------------------------------------------------------------------


def run_cli(*args: str) -> None:
    DynViTCLI(args=list(args))


@pytest.mark.parametrize(
    "config", sorted(p.name for p in (ROOT / "experiments").glob("*.yaml") if not p.name.startswith("sweep_"))
)
def test_every_experiment_config_parses(config: str, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        run_cli("fit", "--config", str(ROOT / "experiments" / config), "--print_config")
    assert done.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["model_name"]


def test_print_config_of_the_deit_s_recipe_is_complete(capsys):
    with pytest.raises(SystemExit) as done:
        run_cli("fit", "--config", str(ROOT / "experiments/deit_s_prune.yaml"), "--print_config")
    assert done.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["class_path"] == "dynvit.lightning.DynamicViTModule"
    assert cfg["model"]["init_args"]["keep_ratio"] == 0.7
    assert cfg["model"]["init_args"]["pruning_loc"] == [3, 6, 9]
    assert cfg["model"]["init_args"]["backbone_lr_scale"] == 0.01
    assert cfg["data"]["class_path"] == "dynvit.data.ImageFolderDataModule"
    assert cfg["checkpoint"]["monitor"] == "val/top1" and cfg["checkpoint"]["save_last"] is False
    assert cfg["checkpoint"]["enable_version_counter"] is False
    assert cfg["wandb"]["online"] is False


def test_unknown_config_key_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        run_cli("fit", "--config", str(ROOT / "experiments/deit_s_prune.yaml"), "--model.init_args.keep_ration", "0.5")
    assert done.value.code != 0
    assert "keep_ration" in capsys.readouterr().err


def test_deit_s_recipe_runs_two_steps_on_an_image_folder(tmp_path):
    from dynvit.data.imagefolder import write_image_folder

    write_image_folder(tmp_path / "images", classes=("a", "b"), per_class=4, img_size=64)
    run_cli(
        "fit",
        "--config",
        str(ROOT / "experiments/deit_s_prune.yaml"),
        "--model.init_args.pretrained=false",
        f"--data.init_args.root={tmp_path / 'images'}",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
        "--trainer.max_steps=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=1",
        "--throughput.enabled=false",
        "--trainer.precision=32",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--wandb.enabled=false",
    )
    assert (tmp_path / "run/checkpoints/last.ckpt").is_file()
    metrics = (next((tmp_path / "run/csv").rglob("metrics.csv"))).read_text()
    assert "train/ratio" in metrics and "cost/gflops" in metrics


def write_tiny_config(tmp_path: Path, teacher_ckpt: str, **trainer_args) -> Path:
    cfg = {
        "trainer": {
            "default_root_dir": str(tmp_path / "run"),
            "max_epochs": 1,
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            **trainer_args,
        },
        "model": {
            "class_path": "dynvit.lightning.DynamicViTModule",
            "init_args": {
                "model_name": "deit_tiny_patch16_224",
                "img_size": TINY["img_size"],
                "pruning_loc": list(TINY_LOC),
                "teacher_checkpoint": teacher_ckpt,
                "model_kwargs": MODEL_KWARGS,
                "lr_base_batch_size": None,
                "warmup_epochs": 0,
            },
        },
        "data": {
            "class_path": "dynvit.data.SyntheticDataModule",
            "init_args": {
                "num_classes": TINY["num_classes"],
                "train_size": 32,
                "val_size": 32,
                "batch_size": 8,
            },
        },
        "wandb": {"enabled": False},
        # Rank 0 still times the student at the end of fit, as briefly as the callback allows.
        "throughput": {"batch_size": 8, "pairs": 1, "block_time": 0.0, "warmup_time": 0.0},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_process_ddp_on_cpu_gives_synced_metrics(tmp_path, teacher_ckpt):
    config = write_tiny_config(tmp_path, teacher_ckpt, strategy="ddp", devices=2)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    # The val/top1 the DDP run logged (synced over both halves of the val set) equals a
    # single-process evaluation of the same weights on the whole val set.
    metrics = next((tmp_path / "run/csv").rglob("metrics.csv")).read_text().splitlines()
    header = metrics[0].split(",")
    logged = [
        float(r.split(",")[header.index("val/top1")]) for r in metrics[1:] if r.split(",")[header.index("val/top1")]
    ]
    module = DynamicViTModule.load_from_checkpoint(ckpt)
    single = trainer(tmp_path / "single").validate(module, tiny_data(val_size=32, batch_size=8), verbose=False)[0]
    assert logged[-1] == pytest.approx(single["val/top1"])
