"""The fine-tuned track's grid: one sweep file runs methods x budgets x {training-free, fine-tuned}, one table
holds both tracks, an interrupted point resumes to the uninterrupted result, bad grids stop before training;
and the configs: every registered method has its ImageNet file, each what the recipe writes."""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path

import pytest
import torch
import wandb
import yaml

import dynvit
from dynvit import methods
from dynvit.lightning import MethodFineTuning
from dynvit.run import finetune_configs
from dynvit.run.cli import DynViTCLI
from dynvit.run.grid_report import best_at_budgets, pareto_front
from dynvit.run.report import ResultRow
from dynvit.run.sweep import SweepError, SweepInterrupted, load_sweep, run_sweep
from tests.test_sweep import sweep_file
from tests.tiny_config import tiny_config, write_config

REPO = Path(__file__).resolve().parents[1]
METHOD, RHO, TRACK = "model.init_args.method", "model.init_args.keep_ratio", "model.init_args.fine_tune"


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")


def grid_config(root: Path) -> dict:
    """The tiny digits config with the fine-tuning module: a random 4-block teacher, 2 epochs of 2 batches."""
    config = tiny_config(root, max_epochs=2)
    student = config["model"]["init_args"]
    config["model"] = {
        "class_path": "dynvit.lightning.MethodFineTuning",
        "init_args": {
            "method": "tome",
            "keep_ratio": 0.7,
            "fine_tune": True,
            "model_name": student["model_name"],
            "pruning_loc": student["pruning_loc"],
            "model_kwargs": student["model_kwargs"],
            "img_size": student["img_size"],
            "lr": 1e-3,
            "lr_base_batch_size": None,
            "warmup_epochs": 0,
            "mixup": 0.0,
            "cutmix": 0.0,
        },
    }
    config["trainer"]["limit_val_batches"] = 0.5
    config["throughput"]["latency"] = True
    return config


def run_grid(tmp_path: Path, parameters: dict, out: str = "grid") -> DynViTCLI:
    path = write_config(tmp_path / "grid.yaml", grid_config(tmp_path / "run"))
    sweep = sweep_file(tmp_path / f"{out}.sweep.yaml", parameters, name=out)
    return DynViTCLI(args=["sweep", f"--config={path}", f"--sweep={sweep}", f"--out={tmp_path / out}"])


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_two_point_grid_writes_both_tracks_into_one_table(tmp_path):
    result = run_grid(tmp_path, {METHOD: {"values": ["tome"]}, TRACK: {"values": [False, True]}}).sweep_result
    out = tmp_path / "grid"
    assert result.trained == ["fine_tune_False__method_tome", "fine_tune_True__method_tome"]
    rows = {r.track: r for r in result.rows if r.method == "tome"}
    assert set(rows) == {"training-free", "fine-tuned"}
    # Same method, same budget, same cost; only the fine-tuned point trained (and kept a checkpoint).
    assert rows["training-free"].gflops == rows["fine-tuned"].gflops
    assert rows["training-free"].param == rows["fine-tuned"].param and rows["fine-tuned"].param.startswith("r=")
    assert not (out / "fine_tune_False__method_tome" / "checkpoints" / "last.ckpt").exists()
    trained = torch.load(out / "fine_tune_True__method_tome" / "checkpoints" / "last.ckpt", weights_only=True)
    assert trained["global_step"] == 4
    for row in rows.values():
        assert row.latency_ms > 0 and row.speedup > 0 and 0 <= row.top1 <= 1
    # One W&B run per point.
    for name in result.trained:
        assert list((out / name / "wandb").glob("offline-run-*")), name
    # One table line holds both tracks, as the rows measured them.
    (record,) = list(csv.DictReader((out / "grid.csv").open()))
    assert (record["method"], float(record["keep_ratio"])) == ("tome", 0.7)
    assert float(record["top1_tf"]) == pytest.approx(rows["training-free"].top1)
    assert float(record["top1_ft"]) == pytest.approx(rows["fine-tuned"].top1)
    assert float(record["gflops"]) == pytest.approx(rows["fine-tuned"].gflops)
    text = (out / "grid.md").read_text()
    assert "max_epochs=2" in text and "mixup=0.0" in text and "every fine-tuned point trains with these same" in text
    assert f"{100 * rows['fine-tuned'].top1:.2f}" in text and f"{100 * rows['training-free'].top1:.2f}" in text
    assert (out / "grid.png").stat().st_size > 0
    # A rerun trains nothing and writes the same table.
    again = run_grid(tmp_path, {METHOD: {"values": ["tome"]}, TRACK: {"values": [False, True]}}).sweep_result
    assert again.trained == []
    assert list(csv.DictReader((out / "grid.csv").open())) == [record]
    # Stopped after its last checkpoint, before done.json (in the end-of-fit timing, say): the rerun trains
    # nothing, and times the point again, or its row would have no images/s, speedup or latency.
    (out / "fine_tune_True__method_tome" / "done.json").unlink()
    again = run_grid(tmp_path, {METHOD: {"values": ["tome"]}, TRACK: {"values": [False, True]}}).sweep_result
    (resumed,) = [r for r in again.rows if r.track == "fine-tuned"]
    assert again.trained == ["fine_tune_True__method_tome"]
    assert resumed.top1 == rows["fine-tuned"].top1 and resumed.gflops == rows["fine-tuned"].gflops
    assert resumed.images_per_s > 0 and resumed.speedup > 0 and resumed.latency_ms > 0
    assert (
        torch.load(out / "fine_tune_True__method_tome" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        == 4
    )


def test_an_interrupted_point_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    grid = {METHOD: {"values": ["evit"]}, TRACK: {"values": [True]}}
    whole = run_grid(tmp_path, grid, out="whole").sweep_result
    # Same seed, same result: a second uninterrupted run gives bit-equal weights.
    twice = run_grid(tmp_path, grid, out="twice").sweep_result
    point = "fine_tune_True__method_evit"
    expected = weights(tmp_path / "whole" / point / "checkpoints" / "last.ckpt")
    assert all(
        torch.equal(v, weights(tmp_path / "twice" / point / "checkpoints" / "last.ckpt")[k])
        for k, v in expected.items()
    )
    assert twice.rows[-1].top1 == whole.rows[-1].top1

    original = MethodFineTuning.training_step

    def stop_in_second_epoch(self, batch, batch_idx):
        assert self.net.training and not self.teacher.training
        if self.current_epoch == 1:
            raise OSError("the machine went down")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(MethodFineTuning, "training_step", stop_in_second_epoch)
    with pytest.raises(SweepError, match="every point of .* failed: .*OSError: the machine went down"):
        run_grid(tmp_path, grid, out="cut")
    cut = tmp_path / "cut" / point
    # The failed point's W&B run is closed: the next point must not log into it.
    assert wandb.run is None
    assert not (cut / "done.json").exists()
    assert torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    monkeypatch.setattr(MethodFineTuning, "training_step", original)
    resumed = run_grid(tmp_path, grid, out="cut").sweep_result
    assert resumed.trained == [point]
    got = weights(cut / "checkpoints" / "last.ckpt")
    assert all(torch.equal(v, got[k]) for k, v in expected.items())
    assert json.loads((cut / "done.json").read_text())["top1"] == whole.rows[-1].top1


@pytest.mark.parametrize(
    ("parameters", "match"),
    [
        ({METHOD: {"values": ["tome", "tomee"]}}, "unknown token-reduction method 'tomee'"),
        ({METHOD: {"values": ["tome", ["evit"]]}}, r"method names are strings, got \['evit'\]"),
        ({RHO: {"values": [0.7, 1.5]}}, r"keep ratios must be in \(0, 1\]"),
        # Passes (0, 1] but keeps no token of this 64-patch ViT by its third stage (int(64 · 0.05³) = 0).
        ({RHO: {"values": [0.7, 0.05]}}, "sweep point .*0.05"),
    ],
)
def test_bad_grids_are_refused_before_anything_trains(tmp_path, parameters, match):
    with pytest.raises(SweepError, match=match):
        run_grid(tmp_path, parameters)
    out = tmp_path / "grid"
    assert not out.exists() or not [p for p in out.iterdir() if p.is_dir()]


def test_a_method_that_cannot_take_the_teacher_over_is_refused_before_the_grid_trains():
    # The digits teacher's patch embedding is a conv stem, which DVT's cascade cannot resample.
    module = MethodFineTuning(method="tome", model_name="vit_digits", keep_ratio=0.7)
    module.check_point(0.7, "tome")
    with pytest.raises(ValueError, match="dvt cannot take this teacher over: .*convolutional stem"):
        module.check_point(0.7, "dvt")


def test_pareto_front_and_best_method_per_budget():
    # (GFLOPs, top-1): the second is dominated by the first (cheaper and better); ties in both count once.
    assert pareto_front([(1.0, 0.9), (1.5, 0.8), (2.0, 0.95), (0.5, 0.5)], lower_x_is_better=True) == [3, 0, 2]
    assert pareto_front([(2.0, 0.9), (1.5, 0.95)], lower_x_is_better=False) == [1, 0]
    base = {"keep_ratio": 0.7, "top1_tf": None, "seeds_tf": 0, "top1_tf_low": None, "top1_tf_high": None}
    records = [
        {**base, "method": "a", "top1_ft": 0.90, "top1_ft_low": 0.89, "top1_ft_high": 0.91, "seeds_ft": 2},
        {**base, "method": "b", "top1_ft": 0.88, "top1_ft_low": 0.87, "top1_ft_high": 0.895, "seeds_ft": 2},
    ]
    (line,) = best_at_budgets(records)
    assert "**a** 90.00 %" in line and "2.00 points ahead of b" in line and "within (a tie)" in line
    records[1]["top1_ft_high"] = 0.885
    assert "beyond the range over 2 seeds" in best_at_budgets(records)[0]


def stand_in_fit(top1):
    """A sweep's ``fit`` that trains nothing: the point's row, with top-1 ``top1(point)``."""

    def fit(config_path, point, run_dir, group):
        rho, track = point.get(RHO, 0.7), "fine-tuned" if point.get(TRACK, True) else "training-free"
        return ResultRow(point[METHOD], rho, 1.0, 1.0, top1=top1(point), run=run_dir.name, track=track)

    return fit


def test_points_that_differ_in_another_swept_key_are_separate_lines_not_a_range_over_seeds(tmp_path):
    # distill_weight swept beside the seed: 0.0 and 0.5 are two recipes, each with its own range over seeds.
    weight = "model.init_args.distill_weight"
    sweep = sweep_file(
        tmp_path / "distill.yaml",
        {METHOD: {"values": ["tome"]}, weight: {"values": [0.0, 0.5]}, "seed_everything": {"values": [0, 1]}},
    )
    top1 = {(0.0, 0): 0.50, (0.0, 1): 0.52, (0.5, 0): 0.90, (0.5, 1): 0.94}
    fit = stand_in_fit(lambda point: top1[point[weight], point["seed_everything"]])
    config = write_config(tmp_path / "config.yaml", grid_config(tmp_path / "run"))
    result = run_sweep(load_sweep(sweep), tmp_path / "out", config, fit, teacher=lambda: None)
    records = {r["variant"]: r for r in json.loads((tmp_path / "out" / "grid.json").read_text())["rows"]}
    assert set(records) == {"distill_weight=0.0", "distill_weight=0.5"}
    assert (records["distill_weight=0.0"]["top1_ft_low"], records["distill_weight=0.0"]["top1_ft_high"]) == (0.5, 0.52)
    assert records["distill_weight=0.5"]["top1_ft"] == pytest.approx(0.92)
    assert records["distill_weight=0.5"]["seeds_ft"] == 2
    text = result.paths["grid"].read_text()
    assert "| tome (distill_weight=0.5) | 0.7 |" in text and "**tome (distill_weight=0.5)** 92.00 %" in text


def test_a_failing_point_costs_only_itself_and_is_retried_by_the_rerun(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path / "s.yaml", {METHOD: {"values": ["sit", "tome", "evit"]}}))
    config = write_config(tmp_path / "config.yaml", grid_config(tmp_path / "run"))
    top1 = {"sit": 0.3, "tome": 0.5, "evit": 0.4}

    def diverges(point):
        if point[METHOD] == "sit":
            raise FloatingPointError("train/loss is nan")
        return top1[point[METHOD]]

    out = tmp_path / "out"
    with pytest.raises(SweepError, match=r"1 of 3 points failed.*method_sit \(FloatingPointError: train/loss is nan\)"):
        run_sweep(sweep, out, config, stand_in_fit(diverges), teacher=lambda: None)
    # The points after it trained, and the summary holds them.
    assert "FloatingPointError" in (out / "method_sit" / "failed.txt").read_text()
    assert not (out / "method_sit" / "done.json").exists()
    assert [r["method"] for r in json.loads((out / "summary.json").read_text())["rows"]] == ["tome", "evit"]
    # The rerun trains the failed point only.
    again = run_sweep(sweep, out, config, stand_in_fit(lambda point: top1[point[METHOD]]), teacher=lambda: None)
    assert again.trained == ["method_sit"] and not (out / "method_sit" / "failed.txt").exists()
    assert [r.method for r in again.rows] == ["sit", "tome", "evit"]


def test_an_interrupted_point_stops_the_sweep_at_once(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path / "s.yaml", {METHOD: {"values": ["sit", "tome"]}}))
    config = write_config(tmp_path / "config.yaml", grid_config(tmp_path / "run"))

    def interrupted(point):
        raise SweepInterrupted("training of method_sit was interrupted")

    with pytest.raises(SweepInterrupted):
        run_sweep(sweep, tmp_path / "out", config, stand_in_fit(interrupted), teacher=lambda: None)
    assert not (tmp_path / "out" / "method_tome").exists()


def test_the_digits_grid_names_every_registered_method_at_two_budgets_and_both_tracks():
    spec = load_sweep(REPO / "experiments" / "sweep_finetune_digits.yaml")
    teacher = dynvit.create_teacher("vit_digits")
    takes_over = []
    for name, method in methods.registered().items():
        try:
            if method.accepts is not None:
                method.accepts(teacher)
        except TypeError:
            continue
        takes_over.append(name)
    assert sorted(spec.parameters[METHOD]) == sorted(takes_over) and "dvt" not in takes_over
    assert spec.parameters[RHO] == [0.7, 0.5] and spec.parameters[TRACK] == [False, True]
    assert len(spec.parameters["seed_everything"]) == 2


@pytest.mark.parametrize("method", list(methods.registered()))
def test_every_registered_method_has_its_imagenet_config(method):
    path = finetune_configs.path_of(method)
    assert path.read_text() == finetune_configs.render(method), "rerun python -m dynvit.run.finetune_configs"
    config = yaml.safe_load(path.read_text())
    model = config["model"]
    assert model["class_path"] == "dynvit.lightning.MethodFineTuning" and model["init_args"]["method"] == method
    accepted = set(inspect.signature(MethodFineTuning.__init__).parameters) - {"self"}
    assert set(model["init_args"]) <= accepted
    # TokenReduction's recipe, as numbers: the peak lr at the effective batch and the cosine floor.
    args, trainer = model["init_args"], config["trainer"]
    batch = config["data"]["init_args"]["batch_size"] * trainer["accumulate_grad_batches"] * trainer["devices"]
    assert batch == 512 and args["lr"] * batch / args["lr_base_batch_size"] * args["min_lr_ratio"] == pytest.approx(
        1e-5
    )
    assert (trainer["max_epochs"], args["warmup_epochs"], args["weight_decay"]) == (30, 20, 0.05)
    assert (args["mixup"], args["cutmix"], args["label_smoothing"], args["model_kwargs"]["drop_path_rate"]) == (
        0.8,
        1.0,
        0.1,
        0.1,
    )
    assert config["data"]["init_args"]["re_prob"] == 0.25 and config["data"]["init_args"]["auto_augment"].startswith(
        "rand-m9"
    )
    assert trainer["callbacks"][0]["class_path"].endswith("EMAWeightAveraging")
