"""Training DynamicSwin through the CLI: a tiny ``swin_digits`` student fitted with the FLOP,
throughput and kept-location callbacks, then benchmarked and swept, as ViT and ConvNeXt students are."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import yaml
from torchvision.io import read_image

from dynvit.lightning import DynamicViTModule
from dynvit.lightning.optim import param_groups
from dynvit.run.cli import DynViTCLI
from tests.tiny_config import benchmark_rows, fit_offline, tiny_config, write_config

# The model is built at 128 px and the digits follow it: swin_digits' 4-px patches put its stage 3 at
# 8×8, one location per 16-px patch of the digit mask (the DataModule's own grid: Swin's patches are not
# the locations it prunes).
DIGITS = dict(patch_size=16, digit_scale=2, train_samples_per_epoch=16, num_val=8, batch_size=8)
STUDENT = dict(
    model_name="swin_digits",
    img_size=128,
    model_kwargs={"embed_dim": 8, "depths": [1, 1, 4, 1], "num_heads": [1, 1, 1, 2]},
    lr_base_batch_size=None,
    warmup_epochs=0,
    backbone_lr_scale=0.2,
)


def swin_config(root: Path, **init_args) -> dict:
    config = tiny_config(root)
    config["model"]["init_args"] = {**copy.deepcopy(STUDENT), "keep_ratio": 0.7, **init_args}
    config["data"]["init_args"] = dict(DIGITS)
    config["trainer"]["callbacks"] = [
        {"class_path": "dynvit.measure.callbacks.KeptTokensCallback", "init_args": {"num_images": 3}}
    ]
    return config


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """One epoch of a tiny DynamicSwin on the digits, with FLOPs, throughput and kept-location pictures."""
    root = tmp_path_factory.mktemp("swin")
    fit_offline(root, swin_config(root / "run"))
    return root


def test_fast_paths_and_predictors_train_at_lr_and_the_backbone_at_its_scale() -> None:
    module = DynamicViTModule(num_classes=10, in_chans=1, **STUDENT)
    lr_of = {
        p: group["lr"] for group in param_groups(module.net, 1.0, 0.05, module.lr_scales()) for p in group["params"]
    }
    new = module.net.new_param_prefixes
    assert sum("fastmlp" in n for n, _ in module.net.named_parameters() if n.startswith(new)) == 3 * 4
    for name, p in module.net.named_parameters():
        assert lr_of[p] == (1.0 if name.startswith(new) else 0.2), name


def test_fit_logs_cost_speed_recall_and_a_stage_3_picture(fitted: Path) -> None:
    with open(fitted / "run" / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    last = {k: v for row in rows for k, v in row.items() if v not in ("", None)}
    assert float(last["cost/gflops"]) < float(last["cost/teacher_gflops"])
    assert float(last["throughput/speedup"]) > 0
    for key in ("train/ratio", "train/token", "train/distill", "train/keep_rate_s3", "val/recall_s3", "val/top1"):
        assert key in last, key
    assert float(last["train/keep_target_s3"]) == pytest.approx(0.7 - 0.4)
    (png,) = (fitted / "run" / "kept_tokens").glob("epoch_*.png")
    # 3 rows (images) × 4 columns (input + 3 pruning stages) of 128-px images, 2-px padding.
    assert tuple(read_image(str(png)).shape) == (3, 3 * 130 + 2, 4 * 130 + 2)


def test_benchmark_and_sweep_run_on_the_student(fitted: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    config = write_config(tmp_path / "tiny.yaml", swin_config(tmp_path / "run"))
    ckpt = fitted / "run" / "checkpoints" / "last.ckpt"
    records = benchmark_rows(config, tmp_path / "bench", f"--ckpt_path={ckpt}", "--ratios=[0.7,0.9]")
    assert [(r["method"], r["keep_ratio"]) for r in records] == [
        ("teacher", 1.0),
        ("dynamicswin", 0.9),
        ("dynamicswin", 0.7),
    ]
    assert records[0]["gflops"] > records[1]["gflops"] > records[2]["gflops"]
    assert records[2]["tokens"] == int(64 * (0.7 - 0.4))  # slow-path locations at the last pruning stage
    assert records[1]["recall_s3"] is not None and records[0]["recall_s1"] is None

    sweep = tmp_path / "sweep.yaml"
    # One point: the grid machinery is covered by the ViT and ConvNeXt sweeps; this checks a Swin point runs.
    parameters = {"model.init_args.keep_ratio": {"values": [0.6]}}
    sweep.write_text(yaml.safe_dump({"name": "swin", "program": "cli.py", "method": "grid", "parameters": parameters}))
    result = DynViTCLI(args=["sweep", f"--config={config}", f"--sweep={sweep}", f"--out={tmp_path / 'sweep'}"])
    assert result.sweep_result.trained == ["keep_ratio_0.6"]
    with open(tmp_path / "sweep" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], float(r["keep_ratio"])) for r in rows] == [("teacher", 1.0), ("dynamicswin", 0.6)]
    assert float(rows[1]["gflops"]) < float(rows[0]["gflops"])
