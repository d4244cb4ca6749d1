"""``cli.py export --auto`` and ``cli.py benchmark --precision auto``: the fastest path, measured, from the command line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from dynvit.deploy import Tolerance, load_deployed
from dynvit.run.cli import DynViTCLI
from dynvit.run.trainer import DynViTTrainer
from tests.test_benchmark import decisive_student
from tests.tiny_config import tiny_config, write_config


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


def test_export_auto_writes_the_chosen_artifact_and_its_record(tmp_path, capsys):
    student = decisive_student(tmp_path / "student.pth").eval()
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    out = tmp_path / "deploy" / "student.onnx"
    DynViTCLI(
        args=[
            "export",
            f"--config={config}",
            f"--ckpt_path={tmp_path / 'student.pth'}",
            f"--out={out}",
            "--auto=true",
            "--batch_size=4",
            "--pairs=2",
        ]
    )
    record = json.loads((tmp_path / "deploy" / "student.choice.json").read_text())
    artifact = tmp_path / "deploy" / record["artifact"]
    onnx = record["path"]["runtime"] == "onnxruntime"
    assert artifact.suffix == (".onnx" if onnx else ".pt") and artifact.is_file()
    # The tiny config's 16 validation images are what predictions were compared on.
    assert record["checked_on"] == "validation (16 images)" and record["environment"]["batch_size"] == 4
    names = [r["path"] for r in record["results"]]
    assert names[0] == "fp32 eager" and record["chosen"] in names and "int8 onnxruntime" in names
    printed = capsys.readouterr().out
    assert f"chosen: {record['chosen']}; wrote {artifact}" in printed and "| fp32 eager |" in printed
    x = torch.randn(3, 1, 32, 32)
    with torch.inference_mode():
        logits = load_deployed(artifact)(x)
        assert logits.shape == (3, 10)
        if record["chosen"] == "fp32 eager":
            assert torch.allclose(logits, student(x), atol=1e-5)


def test_benchmark_precision_auto_chooses_at_each_ratio(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    out = tmp_path / "bench"
    args = ["benchmark", f"--config={config}", f"--out={out}", "--ratios=[0.5]", "--precision=auto"]
    DynViTCLI(args=[*args, "--batch_size=4", "--pairs=2", "--block_time=0", "--warmup_time=0"])
    record = json.loads((out / "rho_0.5.choice.json").read_text())
    assert record["checked_on"] == "validation (16 images)"
    assert [r["status"] for r in record["results"]].count("chosen") == 1
    # The chosen path is also timed against the float32 eager teacher: the figure deployment targets use.
    over = record["over_teacher"]
    assert over["pairs"] == 2 and over["value"] > 0 and over["low"] is None
    printed = capsys.readouterr().out
    assert "ρ = 0.5, checked on validation (16 images); chosen: " + record["chosen"] in printed
    assert f"{record['chosen']} over the float32 eager teacher: {over['value']:.2f}×" in printed
    with pytest.raises(ValueError, match=r"--precision auto measures the student's deployment paths.*drop --methods"):
        DynViTCLI(args=[*args, "--methods=[dynamicvit,tome]"])


@pytest.mark.parametrize("command", ["export", "benchmark"])
def test_a_gpu_device_on_a_machine_without_one_is_refused_before_any_work(tmp_path, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    extra = ["--auto=true", f"--out={tmp_path / 'deploy' / 'student'}"] if command == "export" else []
    with pytest.raises(ValueError, match=r"^--device cuda: this machine has no GPU that torch can use"):
        DynViTCLI(args=[command, f"--config={config}", "--device=cuda", *extra])
    assert not (tmp_path / "deploy").exists()


def test_export_auto_warns_about_the_onnx_check_options_it_does_not_use(tmp_path, monkeypatch):
    taken = {}

    def measured(self, net, loader, out, batch_size, pairs, compile, tolerance, agreement_images, device):
        taken.update(batch_size=batch_size, tolerance=tolerance, agreement_images=agreement_images)
        return Path(out)

    # What is measured is another test's; this one is about the options.
    monkeypatch.setattr(DynViTTrainer, "_export_fastest", measured)
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    args = ["export", f"--config={config}", f"--out={tmp_path / 'student'}", "--auto=true", "--batch_size=4"]
    with pytest.warns(UserWarning, match=r"ignored with --auto: --check false, --check_images 4\. --auto checks"):
        DynViTCLI(args=[*args, "--check=false", "--check_images=4", "--agreement=0.9"])
    assert taken == {"batch_size": 4, "tolerance": Tolerance(agreement=0.9), "agreement_images": 1000}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="ignored with --auto")
        DynViTCLI(args=args)
