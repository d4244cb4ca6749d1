"""The benchmark: one set of weights at several keep ratios, as a function and as ``cli.py benchmark``."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import dynvit.run.benchmark
import dynvit.run.trainer
from dynvit import count_flops, create_student, create_teacher, methods
from dynvit.data import ClutteredDigitsDataModule, SyntheticDataModule
from dynvit.measure.throughput import SpeedSettings
from dynvit.models import CheckpointMismatch
from dynvit.reducers.matching import student_at
from dynvit.run.benchmark import benchmark, check_benchmark
from dynvit.run.cli import DynViTCLI
from dynvit.run.report import ResultRow, format_table
from tests.tiny_config import DIGITS, QUICK_BENCHMARK, tiny_config, write_config

ARCH = dict(num_classes=10, img_size=32, in_chans=1, patch_size=4, embed_dim=32, depth=4, num_heads=2)
FAST = SpeedSettings(batch_size=2, pairs=1, block_time=0.0, warmup_time=0.0)


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


def digits_val_loader():
    data = ClutteredDigitsDataModule(**{**DIGITS, "num_val": 12, "batch_size": 4})
    data.setup("validate")
    return data.val_dataloader()


def test_speedups_are_medians_of_pairs_with_the_teacher(monkeypatch):
    """Each row's speedup, interval and images/s come from one paired timing with the teacher."""
    student = create_student("vit_tiny_patch16_224", keep_ratio=0.7, pruning_loc=(1, 2, 3), **ARCH)
    teacher = create_teacher("vit_tiny_patch16_224", **ARCH)
    seen = {}

    def fake_time_calls(calls, settings, reference=True, setups=None):
        from dynvit.measure.throughput import Timing

        seen.update(n=len(calls), reference=reference, pairs=settings.pairs, setups=setups)
        ratios = [[], [1.5, 1.6, 1.7, 1.8, 1.9, 2.0], [2.5, 2.6, 2.7, 2.8, 2.9, 3.0]]
        return [Timing(settings.batch_size, [0.1 / (1 + i)] * 6, r) for i, r in enumerate(ratios)]

    monkeypatch.setattr("dynvit.run.benchmark.time_calls", fake_time_calls)
    rows = benchmark(student, teacher, [0.9, 0.5], settings=SpeedSettings(batch_size=2, pairs=6)).rows
    assert seen["n"] == 3 and seen["reference"] and seen["pairs"] == 6 and seen["setups"][0] is not None
    assert [r.speedup for r in rows] == [1.0, pytest.approx(1.75), pytest.approx(2.75)]
    assert (rows[1].speedup_low, rows[1].speedup_high) == (1.5, 2.0)  # n = 6: the extreme ratios
    assert rows[2].images_per_s == pytest.approx(2 / (0.1 / 3))
    assert rows[0].speedup_low is None and rows[0].latency_ms is None


def test_rows_follow_the_keep_ratio_and_match_direct_measurements():
    val_loader = digits_val_loader()
    student = create_student("vit_tiny_patch16_224", keep_ratio=0.7, pruning_loc=(1, 2, 3), **ARCH)
    teacher = create_teacher("vit_tiny_patch16_224", **ARCH)
    rows = benchmark(student, teacher, [0.5, 0.9, 0.7], loader=val_loader, settings=FAST).rows

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
        assert row.speedup > 0 and row.speedup_low is None  # one pair: no interval
        # Same weights at this ratio, scored by hand.
        correct = sum((student.eval()(x).argmax(-1) == y).sum().item() for x, y, _ in val_loader)
        assert row.top1 == pytest.approx(correct / 12)
        # Later stages keep a subset of earlier ones, so recall cannot rise from stage to stage.
        assert len(row.recall) == 3 and 1.0 >= row.recall[0] >= row.recall[1] >= row.recall[2] >= 0.0
    assert rows[0].recall == []  # the teacher keeps everything and reports no masks
    assert rows[1].recall[0] > rows[3].recall[0]  # ρ=0.9 keeps more of the digit than ρ=0.5


def test_learned_methods_start_from_the_teacher_with_their_modules_at_init():
    """Besides the trained student, other learned methods are built from the teacher (new modules at init),
    matched through the registry to the student's GFLOPs, labelled as untrained; clusterings get purity."""
    import copy

    from dynvit import methods
    from dynvit.reducers.matching import ALL, check_methods

    val_loader = digits_val_loader()
    student = create_student("vit_tiny_patch16_224", keep_ratio=0.7, pruning_loc=(1, 2, 3), **ARCH)
    teacher = create_teacher("vit_tiny_patch16_224", **ARCH)
    result = benchmark(student, teacher, [0.7], ["dynamicvit", "sit", "dtem"], loader=val_loader, settings=FAST)
    assert [r.method for r in result.rows] == ["teacher", "dynamicvit", "sit (at init)", "dtem (at init)"]
    target = result.rows[1].gflops
    for name, row in zip(("sit", "dtem"), result.rows[2:], strict=True):
        (m,) = [m for m in result.matched if m.method == name]
        assert not m.student and row.param == m.label
        # The row is the method built on a plain copy of the teacher at the matched setting.
        rebuilt = methods.get(name).build(copy.deepcopy(teacher), **m.params)
        assert row.gflops == pytest.approx(count_flops(rebuilt), rel=1e-9)
        # The nearest setting: no other candidate is nearer the student's GFLOPs.
        knob = methods.get(name).knob
        others = [v for v in knob.candidates(teacher, 20) if v != m.value]
        near = []
        for value in others:
            try:
                other = methods.get(name).build(copy.deepcopy(teacher), **{**m.params, knob.name: value})
            except ValueError:
                continue
            near.append(abs(count_flops(other) - target))
        assert abs(row.gflops - target) <= min(near) + 1e-12
    assert result.rows[2].purity is not None and result.rows[2].recall == []  # SiT clusters: purity, no masks
    assert check_methods(ALL) == check_methods([ALL]) == list(methods.registered())


def test_no_recall_without_patch_masks():
    student = create_student("vit_tiny_patch16_224", keep_ratio=0.7, pruning_loc=(1, 2, 3), **ARCH)
    data = SyntheticDataModule(num_classes=10, img_size=32, in_chans=1, val_size=8, batch_size=4, train_size=8)
    data.setup("validate")
    (row,) = benchmark(student, ratios=[0.7], loader=data.val_dataloader(), settings=FAST).rows
    assert row.recall == [] and 0.0 <= row.top1 <= 1.0 and row.speedup is None  # no teacher, no speedup


def test_bad_ratios_and_non_pruned_models_are_refused():
    student = create_student("vit_tiny_patch16_224", keep_ratio=0.7, pruning_loc=(1, 2, 3), **ARCH)
    for bad in ([0.0, 0.5], [1.2], []):
        with pytest.raises(ValueError, match=r"\(0, 1\]|no keep ratios"):
            benchmark(student, ratios=bad, settings=FAST)
    with pytest.raises(TypeError, match="no keep_ratio"):
        student_at(create_teacher("vit_tiny_patch16_224", **ARCH))
    # A (fine-tuned) training-free method is no student to vary: the message says where its speed was measured.
    tome = methods.get("tome").build(create_teacher("vit_tiny_patch16_224", **ARCH), r=2)
    with pytest.raises(TypeError, match=r"ToMeViT is a tome model, not a learned student.*cli.py sweep"):
        student_at(tome)


def test_table_shows_percentages_and_hides_unmeasured_columns():
    rows = [
        ResultRow("teacher", 1.0, 4.608, 22.05, 100.0, 1.0, top1=0.798),
        ResultRow("dynamicvit", 0.7, 2.988, 22.77, 160.0, 1.6, top1=0.793),
    ]
    table = format_table(rows).splitlines()
    assert table[0] == "| method | ρ | GFLOPs | params (M) | images/s | speedup (95 % CI) | top-1 % |"
    assert table[3] == "| dynamicvit | 0.7 | 2.988 | 22.77 | 160 | 1.60× | 79.30 |"
    rows[1].speedup_low, rows[1].speedup_high, rows[1].precision = 1.52, 1.68, "int8"
    table = format_table(rows).splitlines()
    assert table[0].startswith("| method | ρ | precision | GFLOPs |")  # shown once a row is not fp32
    assert table[3] == "| dynamicvit | 0.7 | int8 | 2.988 | 22.77 | 160 | 1.60× (1.52–1.68) | 79.30 |"


def run_benchmark(tmp_path, *extra: str) -> None:
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    DynViTCLI(
        args=[
            "benchmark",
            f"--config={config}",
            f"--out={tmp_path / 'bench'}",
            "--ratios=[0.5,0.9]",
            *QUICK_BENCHMARK,
            *extra,
        ]
    )


def test_cli_writes_csv_json_and_figure(tmp_path, capsys, monkeypatch):
    checks = []

    def counted_check(*args, **kwargs):
        checks.append(args[2])
        return check_benchmark(*args, **kwargs)

    for module in (dynvit.run.trainer, dynvit.run.benchmark):
        monkeypatch.setattr(module, "check_benchmark", counted_check)
    run_benchmark(tmp_path, "--trainer.limit_val_batches=0.5")
    assert checks == [[0.5, 0.9]]  # the arguments are checked once, before anything is loaded
    out = tmp_path / "bench"
    data = json.loads((out / "results.json").read_text())
    records = data["rows"]
    assert data["environment"]["batch_size"] == 2 and data["environment"]["device"] == "cpu"
    assert [(r["method"], r["keep_ratio"]) for r in records] == [
        ("teacher", 1.0),
        ("dynamicvit", 0.9),
        ("dynamicvit", 0.5),
    ]
    assert records[0]["gflops"] > records[1]["gflops"] > records[2]["gflops"]
    assert all(0.0 <= r["top1"] <= 1.0 for r in records)
    assert records[1]["recall_s1"] is not None and records[0]["recall_s1"] is None
    # --trainer.limit_val_batches=0.5 leaves one batch, 8 of the 16 validation images, for every row.
    assert {r["images"] for r in records} == {8} and data["environment"]["val_images"] == 8
    with open(out / "results.csv") as f:
        assert [float(r["gflops"]) for r in csv.DictReader(f)] == pytest.approx([r["gflops"] for r in records])
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| dynamicvit | 0.5 |" in printed and "Every row scored on the same 8 validation images" in printed


def test_cli_loads_student_weights_from_ckpt_path(tmp_path):
    student = create_student("vit_tiny_patch16_224", keep_ratio=0.7, pruning_loc=(1, 2, 3), **ARCH)
    with torch.no_grad():
        student.head.bias.copy_(torch.arange(10.0) * 100)  # always predicts class 9
    torch.save({"model": student.state_dict()}, tmp_path / "student.pth")
    run_benchmark(tmp_path, f"--ckpt_path={tmp_path / 'student.pth'}")
    records = json.loads((tmp_path / "bench" / "results.json").read_text())["rows"]
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


def decisive_student(path):
    """A student checkpoint whose keep scores are spread out, as trained ones are (a fresh predictor
    scores every token alike, so the onnxruntime check would compare two near-tied token choices)."""
    config = tiny_config(path.parent / "unused")["model"]["init_args"]
    kwargs = {**config["model_kwargs"], "num_classes": 10, "img_size": 32, "in_chans": 1}
    student = create_student(config["model_name"], keep_ratio=0.7, pruning_loc=config["pruning_loc"], **kwargs)
    torch.manual_seed(0)
    for name, module in student.named_modules():
        if isinstance(module, torch.nn.Linear) and ("score_predictor" in name or name == "head"):
            torch.nn.init.normal_(module.weight, std=2.0 / module.in_features**0.5)
    torch.save({"model": student.state_dict()}, path)
    return student


def test_cli_measures_every_row_in_every_precision_and_in_onnxruntime(tmp_path, capsys):
    decisive_student(tmp_path / "student.pth")
    run_benchmark(
        tmp_path,
        f"--ckpt_path={tmp_path / 'student.pth'}",
        "--ratios=[0.5]",
        "--precision=fp32,int8",
        "--backend=onnxruntime",
        "--latency=true",
    )
    out = tmp_path / "bench"
    data = json.loads((out / "results.json").read_text())
    rows = [(r["method"], r["precision"], r["backend"]) for r in data["rows"]]
    variants = [("fp32", "eager"), ("int8", "eager"), ("fp32", "onnxruntime"), ("int8", "onnxruntime")]
    assert rows == [(m, p, b) for m in ("teacher", "dynamicvit") for p, b in variants]
    assert data["environment"]["precision"] == "fp32,int8" and data["environment"]["backend"] == "onnxruntime"
    for record in data["rows"]:
        assert record["latency_ms"] > 0 and record["images_per_s"] > 0 and 0 <= record["top1"] <= 1
        assert record["gflops"] == data["rows"][0 if record["method"] == "teacher" else 4]["gflops"]
    # The exported files (and onnxruntime's int8 copies) stay beside the results.
    assert len(list((out / "onnx").glob("*.int8.onnx"))) == 2 and len(list((out / "onnx").glob("*.onnx"))) == 4
    printed = capsys.readouterr().out
    assert "Measured on" in printed and "| dynamicvit | 0.5 | int8 | onnxruntime |" in printed


def test_cli_export_writes_a_checked_onnx_file(tmp_path, capsys):
    student = decisive_student(tmp_path / "student.pth").eval()
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    out = tmp_path / "student.onnx"
    DynViTCLI(args=["export", f"--config={config}", f"--ckpt_path={tmp_path / 'student.pth'}", f"--out={out}"])
    assert "checked in onnxruntime against eager PyTorch on 16 images" in capsys.readouterr().out
    from dynvit.deploy import onnx_session, run_onnx

    x = torch.randn(5, 1, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(run_onnx(onnx_session(out), x), student(x), rtol=1e-4, atol=1e-4)


def test_cli_refuses_an_unknown_precision_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"unknown precision 'int4'.*did you mean 'int8'"):
        run_benchmark(tmp_path, "--precision=fp32,int4")
    assert not (tmp_path / "bench").exists()


def test_methods_all_lists_a_method_that_cannot_take_the_teacher_over_instead_of_refusing_the_benchmark():
    # vit_digits embeds patches with a convolutional stem, which DVT cannot resample into coarser exits.
    teacher = create_teacher("vit_digits").eval()
    student = create_student("vit_digits", keep_ratio=0.7, pruning_loc=(1, 3, 5)).eval()
    plan = check_benchmark(student, teacher, [0.7], "all")
    assert "dvt" not in plan.methods and "tome" in plan.methods and "dynamicvit" in plan.methods
    (reason,) = plan.skipped
    assert reason.startswith("dvt: DVT builds its coarser exits by resampling the patch embedding")
    # Asked for by name, the same method is refused before anything is measured.
    with pytest.raises(TypeError, match=r"\['dvt'\] cannot run on this teacher: DVT builds its coarser exits"):
        check_benchmark(student, teacher, [0.7], ["dynamicvit", "dvt"])
