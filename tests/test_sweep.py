"""Keep-ratio sweeps: the W&B sweep file, its checks, a local two-point run, rerun and resume."""

from __future__ import annotations

import csv
import json
import os
import platform
from pathlib import Path

import pytest
import torch
import yaml

from dynvit.measure.allocator import allocator
from dynvit.run.cli import DynViTCLI
from dynvit.run.sweep import SweepError, SweepSpec, grid, load_sweep, point_args, point_name, prepare_folder
from tests.test_callbacks import wandb_records
from tests.tiny_config import tiny_config, write_config

REPO = Path(__file__).resolve().parents[1]
KEY = "model.init_args.keep_ratio"


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")


def sweep_file(path: Path, parameters: dict, method: str = "grid", name: str = "tiny") -> Path:
    path.write_text(yaml.safe_dump({"name": name, "program": "cli.py", "method": method, "parameters": parameters}))
    return path


def run_cli_sweep(tmp_path: Path, sweep: Path, **config_changes) -> DynViTCLI:
    config = tiny_config(tmp_path / "run")
    # Half of the 2 validation batches: fit's validation and the teacher row see 8 of the 16 images. (An
    # int 1 would not do: the CLI reads it as the float 1.0, every batch.)
    config["trainer"]["limit_val_batches"] = 0.5
    config["trainer"].update(config_changes)
    path = write_config(tmp_path / "tiny.yaml", config)
    return DynViTCLI(args=["sweep", f"--config={path}", f"--sweep={sweep}", f"--out={tmp_path / 'sweep'}"])


def test_repo_sweep_file_is_a_wandb_grid_whose_args_match_the_agent():
    path = REPO / "experiments" / "sweep_keep_ratio.yaml"
    spec = load_sweep(path)
    assert spec.parameters == {KEY: [0.5, 0.6, 0.7, 0.8, 0.9]}
    raw = yaml.safe_load(path.read_text())
    assert raw["program"] == "cli.py" and raw["command"][:3] == ["${env}", "python", "${program}"]
    assert raw["command"][3] == "fit" and raw["command"][-1] == "${args}"
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    for point in grid(spec):
        agent = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})["args"]
        assert point_args(point) == agent
    assert point_args({KEY: 0.7}) == ["--model.init_args.keep_ratio=0.7"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"method": "bayes", "parameters": {KEY: {"values": [0.5]}}}, "needs `method: grid`"),
        ({"method": "grid", "parameters": {KEY: {"min": 0.5, "max": 0.9}}}, "must give `values: \\[...\\]`"),
        ({"method": "grid", "parameters": {KEY: {"values": []}}}, "must give `values"),
        ({"method": "grid"}, "`parameters` must map"),
        ([0.5, 0.7], "not a W&B sweep file"),
        ({"method": "grid", "parameters": {KEY: {"values": [0.5]}}, "command": "python cli.py"}, "list of strings"),
        # 0.7 twice (or 0.70 beside 0.7): one folder, so one trained point reported as two.
        (
            {"method": "grid", "parameters": {KEY: {"values": [0.7, 0.5, 0.7]}}},
            "would share the folder 'keep_ratio_0.7'",
        ),
        # Names keep letters, digits and _.+-, so "a b" and "a-b" would both be folder "…a-b".
        ({"method": "grid", "parameters": {"trainer.logger": {"values": ["a b", "a-b"]}}}, "would share the folder"),
    ],
)
def test_sweep_files_not_in_wandb_grid_format_are_refused(tmp_path, content, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(SweepError, match=match):
        load_sweep(path)


def test_grid_and_point_names_cover_every_combination():
    points = grid(SweepSpec(Path("s.yaml"), {KEY: [0.5, 0.7], "trainer.max_epochs": [1, 2]}))
    assert points == [
        {KEY: 0.5, "trainer.max_epochs": 1},
        {KEY: 0.5, "trainer.max_epochs": 2},
        {KEY: 0.7, "trainer.max_epochs": 1},
        {KEY: 0.7, "trainer.max_epochs": 2},
    ]
    assert point_name(points[1]) == "keep_ratio_0.5__max_epochs_2"


@pytest.mark.parametrize(
    ("parameters", "match"),
    [
        (
            {"model.init_args.keepratio": {"values": [0.5]}},
            "not a key of the config; did you mean model.init_args.keep_ratio",
        ),
        ({KEY: {"values": [0.5, 1.5]}}, r"must be in \(0, 1\]"),
        ({KEY: {"values": [0.5, 0.01]}}, "keeps 0 of 64 patch tokens"),
        ({"trainer.max_epochs": {"values": [1, "many"]}}, "does not parse"),
    ],
)
def test_bad_sweeps_fail_before_any_training(tmp_path, parameters, match):
    with pytest.raises(SweepError, match=match):
        run_cli_sweep(tmp_path, sweep_file(tmp_path / "sweep.yaml", parameters))
    assert not list(tmp_path.rglob("*.ckpt"))
    assert not list(tmp_path.rglob("done.json"))


def test_an_out_that_is_a_file_is_refused_by_name(tmp_path):
    (tmp_path / "sweep").write_text("notes")
    with pytest.raises(ValueError, match="--out .*sweep is a file: give a folder"):
        run_cli_sweep(tmp_path, sweep_file(tmp_path / "s.yaml", {KEY: {"values": [0.7]}}))
    assert (tmp_path / "sweep").read_text() == "notes"


def without_env(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("env_")}


def summary_rows(out: Path) -> list[dict]:
    with open(out / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_two_point_sweep_summarises_and_reruns_without_training(tmp_path):
    sweep = sweep_file(tmp_path / "sweep.yaml", {KEY: {"values": [0.5, 0.9]}})
    out = tmp_path / "sweep"

    first = run_cli_sweep(tmp_path, sweep).sweep_result
    assert first.trained == ["keep_ratio_0.5", "keep_ratio_0.9"]
    rows = summary_rows(out)
    assert [(r["method"], float(r["keep_ratio"]), r["run"]) for r in rows] == [
        ("teacher", 1.0, ""),
        ("dynamicvit", 0.5, "keep_ratio_0.5"),
        ("dynamicvit", 0.9, "keep_ratio_0.9"),
    ]
    gflops = [float(r["gflops"]) for r in rows]
    assert gflops[1] < gflops[2] < gflops[0]
    assert all(0.0 <= float(r["top1"]) <= 1.0 for r in rows)
    # The teacher is scored on the batches the points' validation sees (limit_val_batches=0.5: 8 of 16 images).
    assert [int(r["images"]) for r in rows] == [8, 8, 8]
    assert float(rows[1]["speedup"]) > 0 and float(rows[2]["recall_s1"]) > float(rows[1]["recall_s1"])
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][1]["run"] == "keep_ratio_0.5" and summary["environment"]["batch_size"] == 2
    # The record names the allocator the points were timed with, though it was written before them.
    assert summary["environment"]["allocator"] == allocator()
    assert "freed memory kept" in allocator() or platform.libc_ver()[0] != "glibc" or "LD_PRELOAD" in os.environ

    # Each point is its own run folder and its own offline W&B run, all in one group.
    for name, ratio in (("keep_ratio_0.5", 0.5), ("keep_ratio_0.9", 0.9)):
        ckpt = torch.load(out / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["hyper_parameters"]["keep_ratio"] == ratio and ckpt["dynvit"]["keep_ratio"] == ratio
        (run_dir,) = (out / name / "wandb").glob("offline-run-*")
        run = next(r.run for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "run")
        assert (run.run_group, run.display_name) == ("tiny", name)

    # Rerun: every point has its marker, so nothing trains and no checkpoint is touched.
    ckpts = sorted(out.rglob("*.ckpt"))
    mtimes = [p.stat().st_mtime_ns for p in ckpts]
    second = run_cli_sweep(tmp_path, sweep).sweep_result
    assert second.trained == []
    assert [p.stat().st_mtime_ns for p in sorted(out.rglob("*.ckpt"))] == mtimes
    # The same rows; only the environment columns say when and where the summary was written.
    assert [without_env(r) for r in summary_rows(out)] == [without_env(r) for r in rows]

    # A point that stopped before its marker resumes from last.ckpt (here: already at max_epochs,
    # so it only validates) instead of training again from scratch.
    (out / "keep_ratio_0.9" / "done.json").unlink()
    third = run_cli_sweep(tmp_path, sweep).sweep_result
    assert third.trained == ["keep_ratio_0.9"]
    assert [p.stat().st_mtime_ns for p in sorted(out.rglob("*.ckpt"))] == mtimes
    assert float(summary_rows(out)[2]["top1"]) == pytest.approx(float(rows[2]["top1"]))

    # The folder belongs to this config: another one is refused before any training.
    with pytest.raises(SweepError, match="holds a sweep of another config"):
        run_cli_sweep(tmp_path, sweep, max_epochs=2)


def test_a_config_write_cut_short_leaves_no_half_config_to_turn_the_rerun_away(tmp_path, monkeypatch):
    out, text = tmp_path / "sweep", "trainer:\n  max_epochs: 1\n" * 50
    write_text = Path.write_text

    def cut_short(self, data, *args, **kwargs):
        write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(OSError, match="No space"):
        prepare_folder(out, text)
    monkeypatch.setattr(Path, "write_text", write_text)
    assert not (out / "config.yaml").exists() and not list(out.iterdir())
    assert prepare_folder(out, text).read_text() == text
