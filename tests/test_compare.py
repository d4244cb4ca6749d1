"""The benchmark's other methods: ToMe, EViT, top-k, ATS and random keep at DynamicViT's GFLOPs: rows, matching, files, errors."""

from __future__ import annotations

import copy
import csv
import json
import re
from types import SimpleNamespace

import pytest
import torch

from dynvit import count_flops, create_student, create_teacher
from dynvit.data import ClutteredDigitsDataModule
from dynvit.measure.evaluate import evaluate
from dynvit.measure.throughput import SpeedSettings
from dynvit.reducers import TokenCost, apply_reducer, realised_gflops
from dynvit.reducers.evit import attentive_schedule
from dynvit.reducers.matching import check_comparable, check_methods, mean_cost
from dynvit.reducers.tome import merge_schedule
from dynvit.run.benchmark import benchmark, first_images, sweep_matches
from dynvit.run.cli import DynViTCLI
from dynvit.run.report import format_matches, write_matches
from dynvit.run.sweep import SweepSpec
from tests.tiny_config import DIGITS, benchmark_rows, tiny_config, write_config

# 36 patch tokens and 3 blocks: fvcore traces (the bulk of matching) stay short.
ARCH = dict(num_classes=10, img_size=48, in_chans=1, patch_size=8, embed_dim=32, depth=3, num_heads=2)
N = 36
DATA = dict(img_size=48, patch_size=8)
LOC = (1, 2)
ALL = ["dynamicvit", "tome", "evit", "ats", "topk", "random"]
LABELS = ["dynamicvit", "tome", "evit (training-free)", "ats", "topk", "random"]
FAST = SpeedSettings(batch_size=2, pairs=1, block_time=0.0, warmup_time=0.0)
STEPS = 10  # EViT / top-k keep rates 1.0, 0.9, …, 0.1


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine the threads'
    waiting for each other makes every small op ~10× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


def val_loader():
    data = ClutteredDigitsDataModule(**{**DIGITS, **DATA, "num_val": 16, "batch_size": 8})
    data.setup("validate")
    return data.val_dataloader()


def models():
    torch.manual_seed(0)
    teacher = create_teacher("vit_tiny_patch16_224", **ARCH)
    student = create_student("vit_tiny_patch16_224", keep_ratio=0.9, pruning_loc=LOC, **ARCH)
    student.load_state_dict(teacher.state_dict(), strict=False)
    return student, teacher


@pytest.fixture(scope="module")
def compared():
    """One comparison of every method at two keep ratios, shared by the tests that read it."""
    student, teacher = models()
    loader = val_loader()
    result = benchmark(student, teacher, [0.5, 0.7], ALL, loader, FAST, first_images(loader, 8), steps=STEPS)
    return student, teacher, loader, result.rows, result.matched


def test_one_row_per_method_per_ratio_plus_the_teacher(compared):
    student, teacher, loader, rows, matched = compared
    assert [(r.method, r.keep_ratio) for r in rows] == [("teacher", 1.0)] + [
        (label, ratio) for ratio in (0.7, 0.5) for label in LABELS
    ]
    assert student.keep_ratio == 0.9  # restored
    teacher_params = rows[0].params_m
    for row, m in zip(rows[1:], matched, strict=True):
        assert row.keep_ratio == m.keep_ratio and 0.0 <= row.top1 <= 1.0
        assert row.speedup > 0 and row.images_per_s > 0
        if m.method == "dynamicvit":
            student.keep_ratio = m.keep_ratio
            assert row.gflops == pytest.approx(count_flops(student), rel=1e-9) == m.target
            assert row.param is None and row.params_m > teacher_params  # the keep predictors
            assert row.tokens == int(N * m.keep_ratio**2)
        else:
            assert row.params_m == teacher_params  # training-free: the teacher's weights, nothing added
        if m.method in ("tome", "evit", "topk", "random"):
            assert row.gflops == pytest.approx(m.gflops, rel=1e-9)  # the matcher's count is the row's
        # Recall per stage: ToMe's stages are its merging blocks, ATS samples in every block from the first stage on.
        if m.method == "tome":
            assert len(row.recall) == sum(r > 0 for r in merge_schedule(N, 3, m.value))
        else:
            assert len(row.recall) == {"ats": len(range(LOC[0], 3))}.get(m.method, len(LOC))
        # Purity where tokens stand for sets of patches: ToMe's merges.
        assert (row.purity is not None) == (m.method == "tome")
        assert row.images == 16  # every row on the same validation images
    student.keep_ratio = 0.9

    row = {(r.method.split()[0], r.keep_ratio): r for r in rows}
    value = {(m.method, m.keep_ratio): m.value for m in matched}
    dyn = row["dynamicvit", 0.5]
    assert row["random", 0.5].tokens == dyn.tokens and row["random", 0.5].gflops < dyn.gflops  # no predictors
    for ratio in (0.7, 0.5):
        r = value["tome", ratio]
        assert row["tome", ratio].param == f"r={r}" and row["tome", ratio].tokens == N - sum(merge_schedule(N, 3, r))
        rate = value["evit", ratio]
        assert row["evit", ratio].tokens == attentive_schedule(N, 3, rate, LOC, True)[-1][1] - 1
    # A top-k row scores like a top-k model built by hand at its keep rate.
    topk = apply_reducer(copy.deepcopy(teacher), "topk", keep_rate=value["topk", 0.5], pruning_loc=LOC)
    assert row["topk", 0.5].top1 == pytest.approx(evaluate(topk, loader)[0])


def test_ats_rows_report_the_mean_tokens_and_gflops_used_on_the_validation_images(compared):
    _, teacher, loader, rows, matched = compared
    for row, m in zip(rows[1:], matched, strict=True):
        if m.method != "ats":
            continue
        k = m.value
        assert row.param == f"K={k}" and m.params["pruning_loc"] == (1, 2)
        assert 0 < row.tokens <= k
        ats = apply_reducer(copy.deepcopy(teacher), "ats", max_tokens=k, pruning_loc=(1, 2))
        cost = TokenCost.from_model(ats)
        per_image = torch.cat([realised_gflops(ats, x, cost)[0] for x, *_ in loader])
        assert row.gflops == pytest.approx(per_image.mean().item(), rel=1e-9)
        counts = torch.cat([ats.predict_with_counts(x)[1] for x, *_ in loader])
        assert row.tokens == pytest.approx((counts[:, -1, 1] - 1).double().mean().item())


def test_matched_settings_are_the_nearest_achievable(compared):
    """Brute force over every candidate: no other setting comes closer to DynamicViT's GFLOPs."""
    _, teacher, loader, _, matched = compared
    images = first_images(loader, 8)
    assert sum(x.shape[0] for x in images) == 8
    ats = apply_reducer(copy.deepcopy(teacher), "ats", max_tokens=N, pruning_loc=(1, 2))
    cost = TokenCost.from_model(ats)

    def brute(method: str) -> dict[float, float]:
        if method == "tome":
            values, name = range(0, N // 2 + 1), "r"
        elif method == "ats":
            return {
                k: mean_cost(apply_reducer(ats, "ats", max_tokens=k, pruning_loc=(1, 2)), images, cost)[0]
                for k in range(1, N + 1)
            }
        else:
            values, name = [i / STEPS for i in range(STEPS, 0, -1)], "keep_rate"
        extra = {} if method == "tome" else {"pruning_loc": LOC}
        return {v: count_flops(apply_reducer(copy.deepcopy(teacher), method, **{name: v}, **extra)) for v in values}

    for method in ("tome", "evit", "topk", "ats"):
        every = brute(method)
        for m in (m for m in matched if m.method == method):
            assert m.gflops == pytest.approx(every[m.value], rel=1e-9)
            best = min(abs(g - m.target) for g in every.values())
            assert abs(m.gflops - m.target) == pytest.approx(best, rel=1e-9, abs=1e-15), (method, m.keep_ratio)


def test_methods_are_checked_before_any_work(tmp_path):
    assert check_methods(["tome", "dynamicvit"]) == ["tome", "dynamicvit"]
    with pytest.raises(ValueError, match="did you mean 'tome'"):
        check_methods(["dynamicvit", "tomee"])
    with pytest.raises(ValueError, match="more than once"):
        check_methods(["ats", "ats"])
    with pytest.raises(ValueError, match="no methods"):
        check_methods([])
    student, teacher = models()
    with pytest.raises(ValueError, match="teacher_checkpoint"):
        check_comparable(student, None, ["tome"])
    check_comparable(student, None, ["dynamicvit"])  # DynamicViT alone needs no teacher
    pooled = create_teacher("vit_tiny_patch16_224", class_token=False, global_pool="avg", **ARCH)
    with pytest.raises(TypeError, match=r"\['evit'\] cannot run on this teacher"):
        check_comparable(student, pooled, ["dynamicvit", "evit"])
    with pytest.raises(ValueError, match="calibration images"):
        benchmark(student, teacher, [0.5], ["ats"], settings=FAST)

    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    with pytest.raises(ValueError, match="did you mean 'evit'"):
        DynViTCLI(args=["benchmark", f"--config={config}", f"--out={tmp_path / 'bench'}", "--methods=[tome,evitt]"])
    assert not (tmp_path / "bench").exists()


def test_cli_writes_one_table_csv_json_and_figure_for_all_methods(tmp_path, capsys):
    config = tiny_config(tmp_path / "run")
    config["model"]["init_args"]["model_kwargs"].update(patch_size=8, depth=3)
    config["model"]["init_args"]["pruning_loc"] = list(LOC)
    config["model"]["init_args"]["img_size"] = DATA["img_size"]  # the digits follow the model's size and patch
    config["data"]["init_args"].update(num_val=8)
    path = write_config(tmp_path / "tiny.yaml", config)
    out = tmp_path / "bench"
    records = benchmark_rows(
        path, out, "--ratios=[0.5]", "--methods=[dynamicvit,tome,ats,random]", "--calibration_images=8"
    )
    assert [(r["method"], r["keep_ratio"]) for r in records] == [
        ("teacher", 1.0),
        ("dynamicvit", 0.5),
        ("tome", 0.5),
        ("ats", 0.5),
        ("random", 0.5),
    ]
    assert records[2]["recall_s1"] is not None and records[4]["recall_s2"] is not None  # ToMe's kept maps too
    assert records[2]["purity"] is not None and records[4]["purity"] is None
    assert {r["images"] for r in records} == {8}
    k = int(re.fullmatch(r"K=(\d+)", records[3]["param"]).group(1))
    assert records[3]["tokens"] <= k and records[3]["recall_s1"] is not None
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["param"] for r in rows] == [r["param"] or "" for r in records]
    assert [float(r["gflops"]) for r in rows] == pytest.approx([r["gflops"] for r in records])
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert re.search(r"\| tome \| 0\.5 \| r=\d+ \|", table) and "| setting |" in table


def test_sweep_matches_list_tome_and_evit_per_keep_ratio(compared, tmp_path):
    student, teacher, _, _, matched = compared
    records = sweep_matches(student, teacher, [0.5, 0.5], methods=("tome",))
    tome = next(m for m in matched if m.method == "tome" and m.keep_ratio == 0.5)
    assert records == [dict(keep_ratio=0.5, dynamicvit_gflops=tome.target, tome_r=tome.value, tome_gflops=tome.gflops)]
    pooled = create_teacher("vit_tiny_patch16_224", class_token=False, global_pool="avg", **ARCH)
    # EViT needs a class token, ToMe none: a pooled teacher gets the ToMe columns only.
    assert list(sweep_matches(student, pooled, [0.5])[0]) == [
        "keep_ratio",
        "dynamicvit_gflops",
        "tome_r",
        "tome_gflops",
    ]
    assert sweep_matches(student, None, [0.5]) is None

    paths = write_matches(records, tmp_path)
    assert json.loads(paths["json"].read_text()) == records
    with open(paths["csv"]) as f:
        assert [float(v) for v in next(csv.DictReader(f)).values()] == pytest.approx(list(records[0].values()))
    assert format_matches(records).splitlines()[0] == "| keep_ratio | dynamicvit_gflops | tome_r | tome_gflops |"


def test_a_sweep_writes_matched_settings_once_per_set_of_keep_ratios(tmp_path, monkeypatch):
    student, teacher = models()
    module = SimpleNamespace(net=student, teacher=teacher)  # what `networks` reads off a LightningModule
    spec = SweepSpec(tmp_path / "sweep.yaml", {"model.init_args.keep_ratio": [0.7, 0.5], "model.init_args.lr": [1.0]})
    DynViTCLI._write_matches(spec, module, tmp_path)
    records = json.loads((tmp_path / "matched.json").read_text())
    assert [r["keep_ratio"] for r in records] == [0.7, 0.5]
    assert list(records[0]) == [
        "keep_ratio",
        "dynamicvit_gflops",
        "tome_r",
        "tome_gflops",
        "evit_keep_rate",
        "evit_gflops",
    ]
    assert (tmp_path / "matched.csv").is_file()

    # A rerun of the same sweep reuses them; another set of keep ratios is matched afresh.
    calls = []
    monkeypatch.setattr("dynvit.run.cli.sweep_matches", lambda *a: calls.append(a[-1]) or records[:1])
    DynViTCLI._write_matches(spec, module, tmp_path)
    assert calls == []
    DynViTCLI._write_matches(SweepSpec(spec.path, {"model.init_args.keep_ratio": [0.7]}), module, tmp_path)
    assert calls == [[0.7]]
