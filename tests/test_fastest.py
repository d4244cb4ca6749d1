"""The fastest deployment path on this machine (dynvit.deploy.fastest) and what quantize knows of the CPU."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from dynvit.data import ClutteredDigitsDataModule
from dynvit.deploy import (
    CpuInfo,
    QuantizationError,
    SlowPrecisionWarning,
    Tolerance,
    candidate_paths,
    detect_cpu,
    fastest,
    hardware,
    load_deployed,
    quantize,
    speedup_over,
)
from dynvit.deploy.fastest import REFERENCE, DeployPath, choice_path
from dynvit.measure.throughput import SpeedSettings, Timing
from tests.test_deploy import digits, int8_layers, vit_student
from tests.tiny_config import DIGITS

ROOT = Path(__file__).resolve().parents[1]
# The module, not the function the package exports under its name.
fastest_module = importlib.import_module("dynvit.deploy.fastest")

# One untimed warm-up call and one-call blocks: the tests check the choice's rule, not speed.
QUICK = SpeedSettings(pairs=6, block_time=0.0, warmup_time=0.0, threads=1)
EAGER = ["bf16 eager", "int8 eager torchao", "int8 eager torch.ao"]


# Tiny models gain nothing from a second intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def digit_loader(n: int = 64):
    data = ClutteredDigitsDataModule(**{**DIGITS, "num_val": n, "batch_size": 16, "train_samples_per_epoch": 32})
    data.setup("validate")
    return data.val_dataloader()


# --- the paths -------------------------------------------------------------------------------------


def test_the_paths_tried_are_those_that_apply_on_the_device():
    cpu = [p.name for p in candidate_paths("cpu", cpu=WITH_AMX)]
    assert cpu == [
        "fp32 eager",
        "bf16 eager",
        "int8 eager torchao",
        "int8 eager torch.ao",
        "fp32 onnxruntime",
        "int8 onnxruntime",
    ]
    compiled = [p.name for p in candidate_paths("cpu", compile=True, cpu=WITH_AMX)]
    assert compiled == [*cpu, "fp32 compiled", "bf16 compiled", "int8 compiled torchao"]
    # Without VNNI or AMX onnxruntime's int8 is also tried with 7-bit weights (saturation against precision).
    assert [p.name for p in candidate_paths("cpu", cpu=AVX2_ONLY)] == [*cpu, "int8 onnxruntime 7-bit"]
    gpu = [p.name for p in candidate_paths("cuda")]
    # Three precisions, each with PyTorch's attention kernel and with each of four SDPA backends forced.
    assert gpu[0] == "fp32 eager" and len(gpu) == 3 * 5
    assert {"fp16 eager sdpa=flash", "bf16 eager sdpa=cudnn", "fp32 eager sdpa=math"} <= set(gpu)
    assert not any("int8" in name or "onnxruntime" in name for name in gpu)


# --- the choice ------------------------------------------------------------------------------------


def test_fastest_tries_every_cpu_path_and_picks_by_its_rule():
    student = vit_student()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    x = digits(8)
    choice = fastest(student, x, settings=QUICK)
    assert [r.path for r in choice.results] == candidate_paths("cpu")
    # A tiny ViT builds, runs and exports in every path on this CPU.
    assert not [r.reason for r in choice.results if r.status == "skipped"]
    for r in choice.results:
        assert r.logits_error is not None and r.agreement is not None
        if r.status == "refused":
            assert r.logits_error > choice.tolerance.logits and r.images_per_s is None
        elif r.status == "too slow":  # e.g. torchao's int8 on a CPU without VNNI
            assert r.reason.endswith("float32 eager's; not timed in pairs") and r.speedup is None
        else:
            assert r.images_per_s > 0
            assert r.path == REFERENCE or (r.speedup is not None and r.speedup.pairs == 6)
    # The rule: the highest median among paths within the tolerance whose whole interval lies above 1.
    faster = [r for r in choice.results if r.speedup is not None and r.speedup.low > 1 and r.status != "refused"]
    expected = max(faster, key=lambda r: r.speedup.value).path if faster else REFERENCE
    assert choice.chosen.path == expected
    assert [r.status for r in choice.results].count("chosen") == 1
    # The choice runs as measured, and the model itself is untouched.
    with torch.inference_mode():
        assert choice.runner(x).shape == (8, 10)
        if expected == REFERENCE:
            assert torch.equal(choice.runner(x), student(x))
    assert not student.training and all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    table = choice.table()
    assert table.count("\n") == 2 + len(choice.results) - 1 and "**chosen**" in table


def _fake_timings(ratios: dict[str, list[float]]):
    """time_calls' stand-in: the reference first, then each path's per-pair ratios as given."""

    def time_calls(calls, settings, reference=True):
        assert len(calls) == 1 + len(ratios)
        return [Timing(settings.batch_size, [0.1] * 12)] + [
            Timing(settings.batch_size, [0.1 / r for r in rs], rs) for rs in ratios.values()
        ]

    return time_calls


def test_the_choice_is_never_a_path_that_is_not_surely_faster_than_float32(monkeypatch):
    """Six pairs give a 95 % interval from the smallest to the largest ratio."""
    ratios = {
        "bf16 eager": [0.4, 0.45, 0.5, 0.5, 0.55, 0.6],  # slower
        "int8 eager torchao": [0.9, 1.9, 2.0, 2.0, 2.1, 2.2],  # fastest median, but its interval reaches 0.9
        "int8 eager torch.ao": [1.4, 1.45, 1.5, 1.5, 1.55, 1.6],  # surely faster
    }
    monkeypatch.setattr(fastest_module, "time_calls", _fake_timings(ratios))
    monkeypatch.setattr(fastest_module, "TOO_SLOW", float("inf"))  # every path reaches the (fake) pairs
    choice = fastest(vit_student(), digits(4), settings=QUICK, paths=EAGER)
    assert choice.chosen.path.name == "int8 eager torch.ao" and choice.chosen.speedup.value == 1.5
    assert choice.chosen.speedup.low == 1.4 and choice.chosen.speedup.high == 1.6
    slower = {name: [r / 4 for r in rs] for name, rs in ratios.items()}
    monkeypatch.setattr(fastest_module, "time_calls", _fake_timings(slower))
    assert fastest(vit_student(), digits(4), settings=QUICK, paths=EAGER).chosen.path == REFERENCE


def test_a_path_several_times_slower_than_float32_in_two_single_calls_is_not_timed_in_pairs(monkeypatch):
    def slow_bf16(model, precision, **kwargs):
        out = quantize(model, precision, **kwargs)
        return Sleepy(out, seconds=0.05).eval() if precision == "bf16" else out

    monkeypatch.setattr(fastest_module, "quantize", slow_bf16)
    paths = ["bf16 eager", "int8 eager torch.ao"]
    choice = fastest(vit_student(), digits(4), settings=QUICK, paths=paths)
    _, bf16, int8 = choice.results
    multiple = float(bf16.reason.split("× ")[0].removeprefix("one call took "))
    assert bf16.status == "too slow" and multiple > fastest_module.TOO_SLOW
    assert bf16.reason == f"one call took {multiple:.1f}× float32 eager's; not timed in pairs"
    assert bf16.speedup is None and bf16.images_per_s is None and bf16.logits_error is not None
    assert int8.speedup is not None and int8.speedup.pairs == QUICK.pairs and choice.chosen != bf16
    assert "too slow: one call took" in choice.table()


def test_one_slow_call_does_not_make_a_path_too_slow():
    def sleeping(*seconds: float):
        left = list(seconds)
        return lambda: time.sleep(left.pop(0) if len(left) > 1 else left[0])

    slow, hiccup, near = (DeployPath("bf16", "eager"), DeployPath("int8", "eager"), DeployPath("fp32", "onnxruntime"))
    calls = {
        REFERENCE: sleeping(0.004),
        slow: sleeping(0.06),  # 15× in both rounds
        hiccup: sleeping(0.06, 0.004),  # 15× once, then as fast as float32
        near: sleeping(0.008),  # 2×: could not win, but not far enough off to skip its pairs
    }
    found = fastest_module._too_slow(calls, QUICK)
    assert list(found) == [slow] and found[slow] > fastest_module.TOO_SLOW


def test_a_path_whose_logits_stray_beyond_the_tolerance_is_refused_and_not_timed():
    student = vit_student()
    x = digits(8)
    choice = fastest(student, x, tolerance=Tolerance(logits=1e-4), settings=QUICK, paths=["bf16 eager"])
    bf16 = choice.results[1]
    with torch.inference_mode():
        reference = student(x)
        error = ((quantize(student, "bf16")(x.bfloat16()).float() - reference).norm() / reference.norm()).item()
    assert bf16.status == "refused" and bf16.logits_error == pytest.approx(error, rel=1e-5)
    assert bf16.reason == f"logits error {error:.3g} > 0.0001" and bf16.images_per_s is None
    assert choice.chosen.path == REFERENCE and choice.checked_on == "example batch (8 images)"


def test_on_validation_images_a_path_is_judged_by_its_top1_agreement(monkeypatch):
    """A bf16 copy whose head is negated (its top-1 becomes float32's last choice) is refused; the int8
    copy's agreement and top-1 are counted over the validation images."""

    def broken_bf16(model, precision, **kwargs):
        out = quantize(model, precision, **kwargs)
        if precision == "bf16":
            with torch.no_grad():
                out.head.weight.neg_()
                out.head.bias.neg_()
        return out

    monkeypatch.setattr(fastest_module, "quantize", broken_bf16)
    student, loader = vit_student(), digit_loader()
    paths = ["bf16 eager", "int8 eager torch.ao"]
    choice = fastest(student, digits(8), loader=loader, settings=QUICK, paths=paths)
    reference, bf16, int8 = choice.results
    assert choice.checked_on == "validation (64 images)"
    assert bf16.status == "refused" and bf16.agreement < 0.1 and bf16.reason.startswith("top-1 agreement")
    quantized = quantize(student, "int8", int8_backend="torch.ao")
    agree = correct = correct_int8 = 0
    with torch.inference_mode():
        for images, labels, _ in loader:
            ref, q = student(images).argmax(-1), quantized(images).argmax(-1)
            agree += (ref == q).sum().item()
            correct += (ref == labels).sum().item()
            correct_int8 += (q == labels).sum().item()
    assert int8.agreement == agree / 64 and int8.top1 == correct_int8 / 64 and reference.top1 == correct / 64
    assert int8.status in ("chosen", "accepted", "refused")
    assert (int8.status == "refused") == (int8.agreement < 0.99)


def test_bad_requests_are_refused_before_anything_runs():
    student = vit_student()
    with pytest.raises(ValueError, match=r"unknown paths \['int4 eager'\] on cpu.*'int8 eager torch.ao'"):
        fastest(student, digits(2), paths=["int4 eager"])
    with pytest.raises(ValueError, match=r"images \(B, C, H, W\), got shape \(1, 32, 32\)"):
        fastest(student, digits(1)[0], paths=[])
    with pytest.raises(ValueError, match="agreement is a fraction"):
        Tolerance(agreement=99)
    # A bare number is no tolerance (0 would otherwise have meant the defaults): said before any timing.
    for number in (0, 0.01):
        with pytest.raises(TypeError, match=r"tolerance must be a dynvit.deploy.Tolerance, e.g. Tolerance\("):
            fastest(student, digits(2), tolerance=number)
    with pytest.raises(TypeError, match="settings must be a dynvit.measure.SpeedSettings"):
        fastest(student, digits(2), settings={"pairs": 6})


# --- the artifact ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "suffix"), [("int8 eager torch.ao", ".pt"), ("fp32 onnxruntime", ".onnx")])
def test_the_artifact_records_the_choice_and_runs_again(path, suffix, monkeypatch, tmp_path):
    # Whatever the timing says, the one other path wins: the test is about what is written.
    monkeypatch.setattr(fastest_module, "surely_faster", lambda speedup: speedup is not None)
    monkeypatch.setattr(fastest_module, "TOO_SLOW", float("inf"))
    student, x = vit_student(), digits(8)
    # Two threads for the timing while torch is set to one: onnxruntime must be timed with the same two.
    choice = fastest(student, x, settings=dataclasses.replace(QUICK, threads=2), paths=[path])
    assert choice.chosen.path.name == path
    artifact = choice.save(tmp_path / "deploy" / "student.onnx")
    assert artifact == tmp_path / "deploy" / f"student{suffix}" and artifact.is_file()
    record = json.loads((tmp_path / "deploy" / "student.choice.json").read_text())
    assert record["artifact"] == artifact.name and record["chosen"] == path
    assert [(r["path"], r["status"]) for r in record["results"]] == [("fp32 eager", "reference"), (path, "chosen")]
    assert record["results"][1]["speedup"]["value"] == choice.chosen.speedup.value
    assert record["results"][1]["images_per_s"] == choice.chosen.images_per_s
    assert record["tolerance"] == {"agreement": 0.99, "logits": 0.1}
    env = record["environment"]
    assert env["batch_size"] == 8 and env["pairs"] == 6 and env["threads"] == 2
    assert env["cpu_info"]["capability"] == torch.backends.cpu.get_cpu_capability()
    deployed = load_deployed(artifact)
    assert deployed.path == choice.chosen.path
    if choice.runner.session is not None:  # onnxruntime timed with the threads PyTorch was timed with
        intra = choice.runner.session.get_session_options().intra_op_num_threads
        assert intra == 2 and torch.get_num_threads() == 1
    with torch.inference_mode():
        assert torch.equal(deployed(x), choice.runner(x))
        assert ((deployed(x) - student(x)).norm() / student(x).norm()).item() < 0.1
    # A dot in the name stays (a keep ratio is no suffix); the record loads as well as its artifact.
    dotted = choice.save(tmp_path / "deploy" / "student_0.7")
    assert dotted == tmp_path / "deploy" / f"student_0.7{suffix}"
    record_file = tmp_path / "deploy" / "student_0.7.choice.json"
    with torch.inference_mode():
        assert torch.equal(load_deployed(record_file)(x), choice.runner(x))
    dotted.unlink()
    with pytest.raises(FileNotFoundError, match=rf"student_0.7{suffix} not found: the artifact .* records is missing"):
        load_deployed(record_file)
    with pytest.raises(FileNotFoundError, match=r"other.choice.json not found: load_deployed needs the artifact"):
        load_deployed(tmp_path / "other.onnx")


def test_a_save_under_the_name_of_an_earlier_one_of_the_other_kind_replaces_it(monkeypatch, tmp_path):
    monkeypatch.setattr(fastest_module, "surely_faster", lambda speedup: speedup is not None)
    monkeypatch.setattr(fastest_module, "TOO_SLOW", float("inf"))
    student, x = vit_student(), digits(4)
    onnx_choice = fastest(student, x, settings=QUICK, paths=["fp32 onnxruntime"])
    pt_choice = fastest(student, x, settings=QUICK, paths=["int8 eager torch.ao"])
    out = tmp_path / "deit_s_0.7"  # a dot that starts no suffix
    assert onnx_choice.save(out) == tmp_path / "deit_s_0.7.onnx"
    # The --out name itself (no suffix) loads the recorded artifact, dot and all.
    assert load_deployed(out).path.name == "fp32 onnxruntime"
    assert pt_choice.save(out) == tmp_path / "deit_s_0.7.pt"
    # The earlier .onnx went with its record: left, it would be read through the new record.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deit_s_0.7.choice.json", "deit_s_0.7.pt"]
    with torch.inference_mode():
        assert torch.equal(load_deployed(out)(x), pt_choice.runner(x))
    # A file of the other kind under that name is not what the record describes: named, not unpickled.
    (tmp_path / "deit_s_0.7.onnx").write_bytes(b"an older export copied back")
    with pytest.raises(
        ValueError,
        match=r"deit_s_0.7.onnx is not the artifact deit_s_0.7.choice.json records: the last "
        r"save to this name chose int8 eager torch.ao and wrote .*deit_s_0.7.pt; load that",
    ):
        load_deployed(tmp_path / "deit_s_0.7.onnx")
    # A record of `benchmark --precision auto` names no artifact.
    record = json.loads((tmp_path / "deit_s_0.7.choice.json").read_text())
    del record["artifact"]
    (tmp_path / "rho_0.7.choice.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"rho_0.7.choice.json records a choice but no artifact.*cli.py export --auto"):
        load_deployed(tmp_path / "rho_0.7.choice.json")


def test_a_torch_ao_int8_artifact_loads_in_a_fresh_process_without_torchs_deprecation_warnings(monkeypatch, tmp_path):
    monkeypatch.setattr(fastest_module, "surely_faster", lambda speedup: speedup is not None)
    monkeypatch.setattr(fastest_module, "TOO_SLOW", float("inf"))
    choice = fastest(vit_student(), digits(4), settings=QUICK, paths=["int8 eager torch.ao"])
    artifact = choice.save(tmp_path / "student")
    # torch warns once per process, so only a fresh one shows what a user loading the file sees.
    code = f"from dynvit.deploy import load_deployed; print(load_deployed({str(artifact)!r}).path.name)"
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", code],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "int8 eager torch.ao"
    assert "deprecated" not in done.stderr, done.stderr[-2000:]


def test_a_cpu_without_vnni_gets_the_7_bit_onnxruntime_file_when_it_wins(monkeypatch, tmp_path):
    import onnx
    from onnx import numpy_helper

    monkeypatch.setattr(fastest_module, "detect_cpu", lambda: AVX2_ONLY)
    monkeypatch.setattr(fastest_module, "surely_faster", lambda speedup: speedup is not None)
    monkeypatch.setattr(fastest_module, "TOO_SLOW", float("inf"))
    student, x = vit_student(), digits(8)
    choice = fastest(student, x, settings=QUICK, paths=["int8 onnxruntime 7-bit"])
    assert choice.chosen.path == DeployPath("int8", "onnxruntime", reduce_range=True)
    artifact = choice.save(tmp_path / "student.onnx")
    weights = [
        numpy_helper.to_array(t) for t in onnx.load(artifact).graph.initializer if t.data_type == onnx.TensorProto.INT8
    ]
    assert weights and max(int(abs(w.astype("int32")).max()) for w in weights) == 64
    assert json.loads(choice_path(artifact).read_text())["path"]["reduce_range"] is True
    assert load_deployed(artifact).path == choice.chosen.path
    with pytest.raises(ValueError, match="unknown paths \\['int8 onnxruntime 7-bit'\\]"):
        monkeypatch.setattr(fastest_module, "detect_cpu", lambda: WITH_AMX)
        fastest(student, x, settings=QUICK, paths=["int8 onnxruntime 7-bit"])


class Sleepy(torch.nn.Module):
    """A model ``seconds`` (20 ms) slower than the one it wraps, per call."""

    def __init__(self, model: torch.nn.Module, seconds: float = 0.02) -> None:
        super().__init__()
        self.model, self.seconds = model, seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.model(x)


def test_the_choice_is_timed_against_another_model_in_pairs():
    student, x = vit_student(), digits(4)
    choice = fastest(student, x, settings=QUICK, paths=["fp32 onnxruntime"])
    over = speedup_over(Sleepy(vit_student()).eval(), choice, x, QUICK)
    # A forward of a few ms against the same plus 20 ms (idle: ~8×; a loaded machine slows both forwards, so the
    # bound leaves room); QUICK's 6 pairs give an interval.
    assert over.pairs == QUICK.pairs and over.low is not None and over.low > 1.3
    assert str(over) == f"{over.value:.2f}× ({over.low:.2f}–{over.high:.2f})"
    with pytest.raises(QuantizationError, match="eval"):
        speedup_over(vit_student().train(), choice, x, QUICK)


# --- what quantize knows of the CPU ----------------------------------------------------------------

AVX2_ONLY = CpuInfo("AMD EPYC 7B13", "x86_64", "AVX2", frozenset({"avx2"}))
WITH_AMX = CpuInfo(
    "Intel Xeon", "x86_64", "AVX512", frozenset({"avx2", "avx512_f", "avx512_vnni", "avx512_bf16", "amx_bf16"})
)


def test_bf16_and_torchao_int8_warn_once_on_a_cpu_without_their_instructions(monkeypatch):
    monkeypatch.setattr(hardware, "detect_cpu", lambda: AVX2_ONLY)
    monkeypatch.setattr(hardware, "_warned", set())
    student = vit_student()
    found = r"AMD EPYC 7B13 \(x86_64, ATen AVX2; avx2\)"
    with pytest.warns(SlowPrecisionWarning, match=rf"need AVX-512 BF16 or AMX \(amx_bf16\).*{found}"):
        bf16 = quantize(student, "bf16")
    assert bf16.head.weight.dtype == torch.bfloat16  # it goes on
    with pytest.warns(
        SlowPrecisionWarning, match=rf"torchao's int8.*need AVX-512 VNNI \(avx512_vnni\) or AMX \(amx_int8\).*{found}"
    ):
        torchao = quantize(student, "int8", int8_backend="torchao")
    assert "blocks.0.attn.qkv" in int8_layers(torchao)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(student, "bf16")  # said once
        auto = quantize(student, "int8")  # fbgemm, whose kernels have AVX2 code: nothing to warn about
    assert type(auto.blocks[0].attn.qkv).__module__.startswith("torch.ao.nn.quantized.dynamic")


def test_no_warning_where_the_cpu_has_the_instructions(monkeypatch):
    monkeypatch.setattr(hardware, "detect_cpu", lambda: WITH_AMX)
    monkeypatch.setattr(hardware, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(vit_student(), "bf16")
        quantize(vit_student(), "int8", int8_backend="torchao")


def test_only_the_instructions_onednn_may_use_count():
    zen5 = CpuInfo(
        "AMD EPYC", "x86_64", "AVX512", frozenset({"avx2", "avx512_f", "avx_vnni", "avx512_vnni", "avx512_bf16"})
    )
    assert zen5.fast("bf16") is True and zen5.fast("int8") is True and zen5.fast("fp32") is True
    avx2 = dataclasses.replace(zen5, onednn_max_isa="AVX2")
    assert avx2.usable == {"avx2", "avx512_f"} and avx2.fast("bf16") is False and avx2.fast("int8") is False
    vnni512 = dataclasses.replace(zen5, onednn_max_isa="avx512_core_vnni")  # oneDNN reads it case-insensitively
    assert vnni512.fast("int8") is True and vnni512.fast("bf16") is False
    # ATen's int8 product uses oneDNN only with AVX-512 VNNI: AVX-VNNI alone (256-bit) does not count.
    alder_lake = CpuInfo("Intel Core", "x86_64", "AVX2", frozenset({"avx2", "avx_vnni"}))
    assert (
        alder_lake.fast("int8") is False and dataclasses.replace(zen5, onednn_max_isa="AVX2_VNNI").fast("int8") is False
    )
    assert dataclasses.replace(zen5, onednn_max_isa="AVX512_CORE_BF16").fast("bf16") is True
    assert dataclasses.replace(zen5, onednn_max_isa="ALL").usable == zen5.features
    # ATen below AVX512: a CPU without AVX-512 (or one standing for it), whatever cpuinfo lists.
    aten_avx2 = dataclasses.replace(zen5, capability="AVX2")
    assert aten_avx2.usable == {"avx2", "avx_vnni"} and aten_avx2.fast("bf16") is False
    assert aten_avx2.fast("int8") is False and aten_avx2.int8_dot_product  # onnxruntime reads the CPU itself
    assert aten_avx2.describe() == (
        "AMD EPYC (x86_64, ATen AVX2; avx2 avx_vnni; not used here: avx512_bf16 avx512_f avx512_vnni)"
    )
    # Off x86 there is no measurement to judge by: no verdict, no warning.
    assert CpuInfo("Neoverse", "aarch64", "SVE256", frozenset()).fast("bf16") is None
    assert hardware.warn_if_slow("bf16", CpuInfo("Neoverse", "aarch64", "SVE256", frozenset())) is False


@pytest.mark.skipif(not detect_cpu().is_x86, reason="the instruction table is x86's")
def test_an_aten_capability_below_avx512_warns_for_bf16_and_torchao_int8(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(hardware, "_warned", set())
    student = vit_student()
    with pytest.warns(SlowPrecisionWarning, match=r"bf16 matrix products need .*ATen AVX2"):
        quantize(student, "bf16")
    with pytest.warns(SlowPrecisionWarning, match=r"torchao's int8 .*ATen AVX2"):
        quantize(student, "int8", int8_backend="torchao")


def test_detect_cpu_reads_this_process(monkeypatch):
    cpu = detect_cpu()
    assert cpu.capability == torch.backends.cpu.get_cpu_capability()
    capabilities = torch.cpu.get_capabilities()
    assert {
        f for f in ("avx2", "avx512_vnni", "avx512_bf16", "amx_int8") if capabilities.get(f) is True
    } <= cpu.features
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    capped = detect_cpu()
    assert capped.onednn_max_isa == "AVX2" and capped.fast("bf16") is not True
    assert "oneDNN capped at AVX2" in capped.describe()
