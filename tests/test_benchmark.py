"""The benchmark: one set of weights at several keep ratios, as a function and as ``cli.py benchmark``."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from dynvit import count_flops, create_student, create_teacher
from dynvit.data import ClutteredDigitsDataModule, SyntheticDataModule
from dynvit.models import CheckpointMismatch
from dynvit.run.benchmark import SpeedSettings, benchmark, dynamicvit_at, time_in_rounds
from dynvit.run.cli import DynViTCLI
from dynvit.run.report import ResultRow, format_table
from tests.tiny_config import DIGITS, tiny_config, write_config

ARCH = dict(num_classes=10, img_size=32, in_chans=1, patch_size=4, embed_dim=32, depth=4, num_heads=2)
FAST = SpeedSettings(batch_size=2, warmup=0, repeats=1, rounds=1)


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


def digits_val_loader():
    data = ClutteredDigitsDataModule(**{**DIGITS, "num_val": 12, "batch_size": 4})
    data.setup("validate")
    return data.val_dataloader()


def test_rounds_alternate_between_models_and_report_medians(monkeypatch):
    teacher, fast = torch.nn.Identity(), torch.nn.Identity()
    calls = []
    # Round 2 is a slow spell for the teacher only; the median over 3 rounds ignores it.
    results = iter([90.0, 300.0, 110.0, 100.0])

    def fake_measure(model, **kwargs):
        calls.append("teacher" if model is teacher else "fast")
        return next(results)

    monkeypatch.setattr("dynvit.run.benchmark.measure_throughput", fake_measure)
    rows = [ResultRow("teacher", 1.0, 1.0, 1.0, images_per_s=100.0), ResultRow("x", 0.7, 0.5, 1.0, images_per_s=200.0)]
    time_in_rounds(rows, [lambda: teacher, lambda: fast], SpeedSettings(rounds=3))
    assert calls == ["teacher", "fast", "teacher", "fast"]  # in turn, not one model's rounds back to back
    assert rows[0].images_per_s == 100.0 and rows[1].images_per_s == 200.0
    assert rows[0].speedup == 1.0 and rows[1].speedup == 2.0


def test_rows_follow_the_keep_ratio_and_match_direct_measurements():
    val_loader = digits_val_loader()
    student = create_student("vit_tiny_patch16_224", keep_ratio=0.7, pruning_loc=(1, 2, 3), **ARCH)
    teacher = create_teacher("vit_tiny_patch16_224", **ARCH)
    rows = benchmark(dynamicvit_at(student), [0.5, 0.9, 0.7], teacher, val_loader, FAST)

    assert [(r.method, r.keep_ratio) for r in rows] == [
        ("teacher", 1.0),
        ("dynamicvit", 0.9),
        ("dynamicvit", 0.7),
        ("dynamicvit", 0.5),
    ]
    gflops = [r.gflops for r in rows]
    assert gflops == sorted(gflops, reverse=True) and len(set(gflops)) == 4
    assert rows[0].speedup == 1.0
    for row in rows[1:]:
        student.keep_ratio = row.keep_ratio
        assert row.gflops == pytest.approx(count_flops(student), rel=1e-9)
        assert row.speedup == pytest.approx(row.images_per_s / rows[0].images_per_s)
        # Same weights at this ratio, scored by hand.
        correct = sum((student.eval()(x).argmax(-1) == y).sum().item() for x, y, _ in val_loader)
        assert row.top1 == pytest.approx(correct / 12)
        # Later stages keep a subset of earlier ones, so recall cannot rise from stage to stage.
        assert len(row.recall) == 3 and 1.0 >= row.recall[0] >= row.recall[1] >= row.recall[2] >= 0.0
    assert rows[0].recall == []  # the teacher keeps everything and reports no masks
    assert rows[1].recall[0] > rows[3].recall[0]  # ρ=0.9 keeps more of the digit than ρ=0.5


def test_no_recall_without_patch_masks():
    student = create_student("vit_tiny_patch16_224", keep_ratio=0.7, pruning_loc=(1, 2, 3), **ARCH)
    data = SyntheticDataModule(num_classes=10, img_size=32, in_chans=1, val_size=8, batch_size=4, train_size=8)
    data.setup("validate")
    (row,) = benchmark(dynamicvit_at(student), [0.7], loader=data.val_dataloader(), settings=FAST)
    assert row.recall == [] and 0.0 <= row.top1 <= 1.0


def test_bad_ratios_and_non_pruned_models_are_refused():
    student = create_student("vit_tiny_patch16_224", keep_ratio=0.7, pruning_loc=(1, 2, 3), **ARCH)
    for bad in ([0.0, 0.5], [1.2], []):
        with pytest.raises(ValueError, match=r"\(0, 1\]|no keep ratios"):
            benchmark(dynamicvit_at(student), bad, settings=FAST)
    with pytest.raises(TypeError, match="no keep_ratio"):
        dynamicvit_at(create_teacher("vit_tiny_patch16_224", **ARCH))


def test_table_shows_percentages_and_hides_unmeasured_columns():
    rows = [
        ResultRow("teacher", 1.0, 4.608, 22.05, 100.0, 1.0, top1=0.798),
        ResultRow("dynamicvit", 0.7, 2.988, 22.77, 160.0, 1.6, top1=0.793),
    ]
    table = format_table(rows).splitlines()
    assert table[0] == "| method | ρ | GFLOPs | params (M) | images/s | speedup | top-1 % |"
    assert table[3] == "| dynamicvit | 0.7 | 2.988 | 22.77 | 160 | 1.60× | 79.30 |"


def run_benchmark(tmp_path, *extra: str) -> None:
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    DynViTCLI(
        args=[
            "benchmark",
            f"--config={config}",
            f"--out={tmp_path / 'bench'}",
            "--ratios=[0.5,0.9]",
            "--batch_size=2",
            "--warmup=0",
            "--repeats=1",
            "--rounds=1",
            *extra,
        ]
    )


def test_cli_writes_csv_json_and_figure(tmp_path, capsys):
    run_benchmark(tmp_path)
    out = tmp_path / "bench"
    records = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["keep_ratio"]) for r in records] == [
        ("teacher", 1.0),
        ("dynamicvit", 0.9),
        ("dynamicvit", 0.5),
    ]
    assert records[0]["gflops"] > records[1]["gflops"] > records[2]["gflops"]
    assert all(0.0 <= r["top1"] <= 1.0 for r in records)
    assert records[1]["recall_s1"] is not None and records[0]["recall_s1"] is None
    with open(out / "results.csv") as f:
        assert [float(r["gflops"]) for r in csv.DictReader(f)] == pytest.approx([r["gflops"] for r in records])
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| dynamicvit | 0.5 |" in capsys.readouterr().out


def test_cli_loads_student_weights_from_ckpt_path(tmp_path):
    student = create_student("vit_tiny_patch16_224", keep_ratio=0.7, pruning_loc=(1, 2, 3), **ARCH)
    with torch.no_grad():
        student.head.bias.copy_(torch.arange(10.0) * 100)  # always predicts class 9
    torch.save({"model": student.state_dict()}, tmp_path / "student.pth")
    run_benchmark(tmp_path, f"--ckpt_path={tmp_path / 'student.pth'}")
    records = json.loads((tmp_path / "bench" / "results.json").read_text())
    data = ClutteredDigitsDataModule(**DIGITS)
    data.setup("validate")
    labels = torch.cat([y for _, y, _ in data.val_dataloader()])
    share_of_9 = (labels == 9).float().mean().item()
    assert [r["top1"] for r in records[1:]] == pytest.approx([share_of_9] * 2)


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        (["--ratios=[0.5,1.5]"], ValueError, r"\(0, 1\]"),
        (["--ratios=[0.01]"], ValueError, "keeps 0 of 64 patch tokens"),
    ],
)
def test_cli_refuses_bad_ratios_before_any_work(tmp_path, extra, error, match):
    with pytest.raises(error, match=match):
        run_benchmark(tmp_path, *extra)
    assert not (tmp_path / "bench").exists()


def test_cli_refuses_a_checkpoint_of_another_model(tmp_path):
    other = create_student("vit_tiny_patch16_224", pruning_loc=(1, 2, 3), **{**ARCH, "embed_dim": 48})
    torch.save({"model": other.state_dict()}, tmp_path / "other.pth")
    with pytest.raises(CheckpointMismatch, match="shape clashes"):
        run_benchmark(tmp_path, f"--ckpt_path={tmp_path / 'other.pth'}")
    assert not (tmp_path / "bench").exists()
