"""Training hierarchical students: the objective's formula, the module's groups, and a tiny DynamicCNN
through the CLI (fit with the measurement callbacks and kept-location pictures, benchmark, sweep)."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torchvision.io import read_image

from dynvit.lightning import DynamicViTModule
from dynvit.lightning.optim import param_groups
from dynvit.models import SpatialOutput
from dynvit.objectives import DynamicViTLoss, SpatialPruningLoss, pruning_objective
from dynvit.run.cli import DynViTCLI
from tests.tiny_config import benchmark_rows, fit_offline, tiny_config, write_config

# The model is built at 128 px and the digits follow it: a 128-px canvas puts ConvNeXt's stage 3 at 8×8, one location per 16-px patch of the digit mask.
DIGITS = dict(patch_size=16, digit_scale=2, train_samples_per_epoch=16, num_val=8, batch_size=8)
STUDENT = dict(
    model_name="convnext_tiny",
    img_size=128,
    model_kwargs={"depths": [1, 1, 4, 1], "dims": [8, 16, 32, 64]},
    lr_base_batch_size=None,
    warmup_epochs=0,
    backbone_lr_scale=0.2,
)


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")


def cnn_config(root: Path, **init_args) -> dict:
    config = tiny_config(root)
    config["model"]["init_args"] = {**copy.deepcopy(STUDENT), "keep_ratio": 0.7, **init_args}
    config["data"]["init_args"] = dict(DIGITS)
    config["trainer"]["callbacks"] = [
        {"class_path": "dynvit.measure.callbacks.KeptTokensCallback", "init_args": {"num_images": 3}}
    ]
    return config


# --- the objective -----------------------------------------------------------------------------------


def test_hierarchical_loss_is_the_reference_formula() -> None:
    torch.manual_seed(0)
    B, N = 4, 16
    decisions = [torch.randint(0, 2, (B, N)).float() for _ in range(3)]
    out = SpatialOutput(torch.randn(B, 10), torch.randn(B, 8, 2, 2), decisions)
    y, teacher_logits, teacher_map = torch.randint(0, 10, (B,)), torch.randn(B, 10), torch.randn(B, 8, 2, 2)
    ratios = [0.7, 0.5, 0.3]
    terms = SpatialPruningLoss(label_smoothing=0.1)(out, y, ratios, teacher_logits, teacher_map)

    # Written out as the reference's losses.py computes it (ConvNextDistillDiffPruningLoss).
    ratio = sum(((d.mean(dim=1) - r) ** 2).mean() for d, r in zip(decisions, ratios, strict=True)) / 3
    kl = F.kl_div(
        F.log_softmax(out.logits, -1), F.log_softmax(teacher_logits, -1), reduction="batchmean", log_target=True
    )
    mse = ((out.features - teacher_map) ** 2).mean()
    cls = F.cross_entropy(out.logits, y, label_smoothing=0.1)
    torch.testing.assert_close(terms.ratio, ratio)
    torch.testing.assert_close(terms.total, cls + 10 * ratio + 0.5 * kl + 0.5 * mse)
    torch.testing.assert_close(terms.token, mse)


def test_objective_follows_the_student() -> None:
    module = DynamicViTModule(num_classes=10, in_chans=1, **STUDENT)
    assert isinstance(module.loss, SpatialPruningLoss) and module.loss.ratio_weight == 10.0
    vit = torch.nn.Linear(1, 1)  # not a hierarchical student: the ViT objective, its own weight
    assert isinstance(pruning_objective(vit), DynamicViTLoss) and pruning_objective(vit).ratio_weight == 2.0
    assert pruning_objective(module.net, ratio_weight=5.0).ratio_weight == 5.0


def test_predictors_and_fast_paths_train_at_lr_and_the_backbone_at_its_scale() -> None:
    module = DynamicViTModule(num_classes=10, in_chans=1, **STUDENT)
    lr_of = {}
    for group in param_groups(module.net, 1.0, 0.05, module.lr_scales()):
        for p in group["params"]:
            lr_of[p] = group["lr"]
    new = module.net.new_param_prefixes
    for name, p in module.net.named_parameters():
        assert lr_of[p] == (1.0 if name.startswith(new) else 0.2), name
    assert any("fast_path_gamma" in n for n, _ in module.net.named_parameters() if n.startswith(new))


def test_keep_gradient_other_than_the_reference_is_refused() -> None:
    with pytest.raises(ValueError, match="acts in masked attention"):
        DynamicViTModule(num_classes=10, in_chans=1, keep_gradient="secant", **STUDENT)


# --- through the CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """One epoch of a tiny DynamicCNN on the digits, with FLOPs, throughput and kept-location pictures."""
    root = tmp_path_factory.mktemp("cnn")
    fit_offline(root, cnn_config(root / "run"))
    return root


def test_fit_logs_cost_speed_recall_and_loss_terms(fitted: Path) -> None:
    with open(fitted / "run" / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    last = {k: v for row in rows for k, v in row.items() if v not in ("", None)}
    assert float(last["cost/gflops"]) < float(last["cost/teacher_gflops"])
    assert float(last["throughput/speedup"]) > 0
    for key in ("train/ratio", "train/token", "train/distill", "train/keep_rate_s3", "val/recall_s3", "val/top1"):
        assert key in last, key
    assert float(last["train/keep_target_s3"]) == pytest.approx(0.7 - 0.4)


def test_kept_location_picture_shows_the_stage_3_grid(fitted: Path) -> None:
    (png,) = (fitted / "run" / "kept_tokens").glob("epoch_*.png")
    picture = read_image(str(png))
    # 3 rows (images) × 4 columns (input + 3 pruning stages) of 128-px tiles, 2-px padding.
    assert tuple(picture.shape) == (3, 3 * 130 + 2, 4 * 130 + 2)


def test_benchmark_and_sweep_run_on_the_student(fitted: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "tiny.yaml", cnn_config(tmp_path / "run"))
    ckpt = fitted / "run" / "checkpoints" / "last.ckpt"
    records = benchmark_rows(config, tmp_path / "bench", f"--ckpt_path={ckpt}", "--ratios=[0.7,0.9]")
    assert [(r["method"], r["keep_ratio"]) for r in records] == [
        ("teacher", 1.0),
        ("dynamiccnn", 0.9),
        ("dynamiccnn", 0.7),
    ]
    assert records[0]["gflops"] > records[1]["gflops"] > records[2]["gflops"]
    assert records[2]["tokens"] == int(64 * (0.7 - 0.4))  # slow-path locations at the last pruning stage
    assert records[1]["recall_s3"] is not None and records[0]["recall_s1"] is None

    sweep = tmp_path / "sweep.yaml"
    parameters = {"model.init_args.keep_ratio": {"values": [0.6, 0.9]}}
    sweep.write_text(yaml.safe_dump({"name": "cnn", "program": "cli.py", "method": "grid", "parameters": parameters}))
    result = DynViTCLI(args=["sweep", f"--config={config}", f"--sweep={sweep}", f"--out={tmp_path / 'sweep'}"])
    assert result.sweep_result.trained == ["keep_ratio_0.6", "keep_ratio_0.9"]
    with open(tmp_path / "sweep" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], float(r["keep_ratio"])) for r in rows] == [
        ("teacher", 1.0),
        ("dynamiccnn", 0.6),
        ("dynamiccnn", 0.9),
    ]
    assert float(rows[1]["gflops"]) < float(rows[2]["gflops"]) < float(rows[0]["gflops"])
