"""The paired speed estimator on a fake clock, its interval, and the environment every results file records."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys

import pytest
import torch

from dynvit import create_student, create_teacher, environment, measure_speedup
from dynvit.measure.environment import describe
from dynvit.measure.throughput import SpeedSettings, median_interval, time_calls, warm_up
from dynvit.run.report import ResultRow, read_rows, write_report
from tests import benchmark_scripts
from tests.conftest import TINY, TINY_LOC


class DriftingMachine:
    """A fake clock and models whose call costs ``cost × drift(now) × noise``.

    The drift swings the machine's speed by a factor of 2.5 over a few dozen calls (the teacher's
    rate moved 464 → 880 images/s between two calls on the shared VM); the noise is log-normal
    per call, and one call in ten is a 3× slow spell (another job taking the core).
    """

    def __init__(self, seed: int, noise: float = 0.15) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        self.noise = noise

    def clock(self) -> float:
        return self.now

    def model(self, cost: float):
        def call() -> None:
            drift = 1.75 + 0.75 * math.sin(self.now / 40.0)
            spell = 3.0 if self.rng.random() < 0.1 else 1.0
            self.now += cost * drift * spell * math.exp(self.rng.gauss(0.0, self.noise))

        return call


FAKE = dict(block_time=0.0, warmup_time=0.0)


def test_paired_median_recovers_a_known_speedup_on_a_drifting_machine():
    """Over 40 machines (seeds): the median of pair ratios is unbiased and its 95 % interval covers the truth."""
    errors, covered = {1.5: [], 2.0: []}, {1.5: 0, 2.0: 0}
    for seed in range(40):
        machine = DriftingMachine(seed)
        calls = [machine.model(1.0), machine.model(1 / 1.5), machine.model(1 / 2.0)]
        teacher, *timed = time_calls(calls, SpeedSettings(pairs=30, **FAKE), clock=machine.clock)
        assert teacher.ratios == [] and teacher.speedup is None
        assert len(teacher.seconds) == 30 * 2  # a fresh reference block for every pair
        for timing, true in zip(timed, (1.5, 2.0), strict=True):
            speedup = timing.speedup
            assert speedup.pairs == 30 and len(timing.seconds) == 30
            assert speedup.low <= speedup.value <= speedup.high
            errors[true].append(math.log(speedup.value / true))
            covered[true] += speedup.low <= true <= speedup.high
    for true in (1.5, 2.0):
        # One estimate scatters by ~6 % here (noise, 3× spells, a 2.5× drift); their mean is on target.
        assert abs(sum(errors[true]) / 40) < 0.025, true
        assert max(abs(e) for e in errors[true]) < 0.2, true
        assert covered[true] >= 34, true  # ≥ 85 % of 40 intervals (95 % expected; 34 is 3 s.d. below)


def test_the_interval_narrows_with_more_pairs():
    widths = {}
    for pairs in (10, 80):
        machine = DriftingMachine(seed=3)
        _, timing = time_calls(
            [machine.model(1.0), machine.model(0.5)], SpeedSettings(pairs=pairs, **FAKE), clock=machine.clock
        )
        widths[pairs] = timing.speedup.high - timing.speedup.low
        assert timing.speedup.low <= 2.0 <= timing.speedup.high
    assert widths[80] < widths[10] / 1.8


@pytest.mark.parametrize("cost", [0.002, 0.05, 1.0])
def test_warm_up_lasts_about_the_time_asked_and_skips_the_first_call(cost: float) -> None:
    """A 2 ms model warms up for 0.3 s, not the ~4 s of torch's blocked_autorange; a slow first call
    (one-off set-up) is never the per-call estimate."""
    machine = DriftingMachine(seed=0, noise=0.0)
    calls = []

    def call() -> None:
        machine.now += cost * (10.0 if not calls else 1.0)
        calls.append(machine.now)

    per_call = warm_up(call, 0.3, machine.clock)
    assert per_call == pytest.approx(cost)
    assert len(calls) >= 3
    assert machine.now < 2 * 0.3 + 10 * cost + 2 * cost
    before = len(calls)
    assert warm_up(call, 0.0, machine.clock) == pytest.approx(cost)
    assert len(calls) == before + 1


def test_pairs_alternate_their_order_and_the_models_alternate_theirs():
    order = []
    machine = DriftingMachine(seed=0, noise=0.0)
    calls = [machine.model(1.0), machine.model(0.5), machine.model(0.25)]
    logged = [lambda i=i, call=call: (order.append(i), call()) for i, call in enumerate(calls)]
    time_calls(logged, SpeedSettings(pairs=2, **FAKE), clock=machine.clock)
    timed = order[3:]  # after the warm-up: with warmup_time 0, one call per model
    assert order[:3] == [0, 1, 2]
    # Round 1: model 1 before its reference block, model 2 after; round 2: models reversed, and so are the pairs.
    assert timed == [1, 0, 0, 2] + [2, 0, 0, 1]


def test_setups_run_before_every_block_and_no_reference_times_each_model_once_per_round():
    machine = DriftingMachine(seed=0)
    setups = []
    calls = [machine.model(1.0), machine.model(2.0)]
    timings = time_calls(
        calls,
        SpeedSettings(pairs=5, **FAKE),
        reference=False,
        setups=[lambda: setups.append("a"), None],
        clock=machine.clock,
    )
    assert setups == ["a"] * 6  # warm-up and five blocks
    assert [len(t.seconds) for t in timings] == [5, 5] and all(t.speedup is None for t in timings)
    with pytest.raises(ValueError, match="2 setups for 1 calls"):
        time_calls(calls[:1], SpeedSettings(pairs=1), setups=[None, None], clock=machine.clock)


def test_median_interval_is_the_order_statistic_interval():
    samples = list(range(1, 31))
    # n = 30: P(Binomial(30, 1/2) <= 9) = 0.0214 <= 0.025 < P(<= 10) = 0.0494, so ranks 10 and 21.
    assert median_interval(samples) == (10, 21)
    assert median_interval([5.0, 1.0, 3.0, 2.0, 6.0, 4.0]) == (1.0, 6.0)  # n = 6: 1 - 2/64 = 96.9 %
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # n = 5: even (min, max) covers only 93.8 %
    for n in (6, 11, 30, 100):
        low, high = median_interval(list(range(n)))
        k = low + 1
        coverage = 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n
        assert coverage >= 0.95 and high == n - k
        assert 1 - 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n < 0.95  # and k is the largest


def test_settings_are_checked():
    with pytest.raises(ValueError, match="pairs must be >= 1, got 0"):
        SpeedSettings(pairs=0)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        SpeedSettings(threads=0)


def test_measure_speedup_times_student_and_teacher_in_pairs_and_restores_them():
    teacher = create_teacher("vit_tiny_patch16_224", **TINY).train()
    student = create_student("vit_tiny_patch16_224", keep_ratio=0.5, pruning_loc=TINY_LOC, **TINY).train()
    timing, reference = measure_speedup(
        student, teacher, SpeedSettings(batch_size=2, pairs=6, block_time=0.01, warmup_time=0.01)
    )
    assert len(timing.ratios) == 6 and len(reference.seconds) == 6  # one reference block per pair
    assert timing.speedup.low <= timing.speedup.value <= timing.speedup.high
    assert student.training and teacher.training


def test_environment_names_the_machine_and_settings():
    env = environment("cpu", batch_size=32, precisions=["fp32", "int8"], threads=2)
    assert env["device"] == "cpu" and env["batch_size"] == 32 and env["threads"] == 2
    assert env["precision"] == "fp32,int8" and env["torch"] == torch.__version__
    assert env["timm"] and env["cpu"] and env["gpu"] is None


def test_results_files_record_the_environment(tmp_path):
    rows = [
        ResultRow("teacher", 1.0, 4.6, 22.0, 100.0, 1.0),
        ResultRow("dynamicvit", 0.7, 3.0, 22.8, 150.0, 1.5, speedup_low=1.4, speedup_high=1.6, precision="int8"),
    ]
    env = environment("cpu", batch_size=8)
    paths = write_report(rows, tmp_path, environment=env)
    data = json.loads(paths["json"].read_text())
    assert data["environment"] == env and [r["precision"] for r in data["rows"]] == ["fp32", "int8"]
    assert [r.speedup_high for r in read_rows(paths["json"])] == [None, 1.6]
    with open(paths["csv"]) as f:
        first = next(csv.DictReader(f))
    assert first["env_cpu"] == env["cpu"] and first["env_batch_size"] == "8" and first["env_torch"] == torch.__version__


# Run in a fresh interpreter: keeping freed memory lasts for the rest of a process, and the page
# faults to count must not depend on what the test session allocated before.
FAULTS_SCRIPT = """
import json, resource
import torch
from dynvit.measure.allocator import allocator, keep_freed_memory
from dynvit.measure.throughput import SpeedSettings, time_calls

def faults_of_one_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)  # 64 MiB, written and freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def faults_per_tensor():
    # As in a warm-up: a kept heap grows over the first allocations until it holds the tensor (two
    # or three here, not always in a row: small allocations land between); then it stops faulting.
    # glibc's default never does.
    for _ in range(6):
        faults_of_one_tensor()
    return sorted(faults_of_one_tensor() for _ in range(5))[2]  # the median of five

quick = dict(pairs=1, block_time=0.0, warmup_time=0.0)
record = {"default": faults_per_tensor(), "allocator_default": allocator()}
time_calls([lambda: None], SpeedSettings(keep_freed_memory=False, **quick), reference=False)
record["allocator_opted_out"] = allocator()
time_calls([lambda: None], SpeedSettings(**quick), reference=False)
record.update(kept=faults_per_tensor(), allocator_kept=allocator(), again=keep_freed_memory())
print(json.dumps(record))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or "LD_PRELOAD" in os.environ, reason="glibc's malloc only")
def test_timing_makes_glibc_reuse_freed_memory_instead_of_faulting_it_in_again():
    """By default glibc serves a 64 MiB tensor with a fresh mmap: ~16k page faults on every call.
    After timing, freed memory is reused and the results files say so; opting out leaves glibc as it is."""
    done = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True, check=True)
    record = json.loads(done.stdout.splitlines()[-1])
    pages = 64 * 2**20 / resource.getpagesize()
    assert record["default"] > 0.9 * pages and record["kept"] < 0.01 * pages
    assert record["allocator_default"] == record["allocator_opted_out"] == "glibc"
    assert record["allocator_kept"] == "glibc (freed memory kept)" and record["again"] is True
    assert "malloc glibc" in describe(environment("cpu"))


def test_a_report_header_names_the_capability_the_kernels_ran_at(monkeypatch):
    # The header is what labels a table with its CPU: an AVX2 run on an AVX-512 CPU must say so.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    env = environment("cpu", batch_size=32, threads=2)
    assert env["cpu_capability"] == "AVX2" and env["onednn_max_cpu_isa"] == "AVX2"
    header = describe(env)
    assert "capability AVX2; oneDNN capped at AVX2) on cpu · 2 threads · batch 32 · fp32" in header
    for cap in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(cap, raising=False)
    assert "capability AVX2) on cpu" in describe(environment("cpu"))


def test_repeat_benchmark_runs_fresh_processes_and_reports_their_spread(tmp_path, capsys):
    """One real call (with glibc's default allocator: the setting only a fresh process can show),
    then the spread of three calls' speedups."""
    repeat = benchmark_scripts.load("repeat")
    out = tmp_path / "repeat.json"
    quick = ["--model", "vit_digits", "--ratios", "0.7", "--batch-size", "2", "--pairs", "2", "--block-time", "0"]
    repeat.main(["--calls", "1", "--allocator", "default", "--json", str(out), "--", *quick])
    data = json.loads(out.read_text())
    assert [call["allocator"] for call in data["calls"]] == ["default"]
    if platform.libc_ver()[0] == "glibc" and "LD_PRELOAD" not in os.environ:
        assert data["calls"][0]["environment"]["allocator"] == "glibc"
    assert [s["row"] for s in data["summary"]] == ["dynamicvit ρ 0.7 fp32 eager"]
    assert "largest deviation 0.0 %" in capsys.readouterr().out  # one call: no spread

    teacher, student = data["calls"][0]["rows"]
    calls = [
        {"allocator": "kept", "rows": [dict(teacher, images_per_s=rate), dict(student, speedup=s)]}
        for rate, s in [(100.0, 1.2), (110.0, 1.3), (90.0, 1.1)]
    ]
    (summary,) = repeat.summarise(calls)
    assert summary["speedups"] == [1.2, 1.3, 1.1] and summary["teacher_images_per_s"] == [100.0, 110.0, 90.0]
    assert summary["mean"] == pytest.approx(1.2) and summary["deviation"] == pytest.approx(0.1 / 1.2)
    with pytest.raises(SystemExit):
        repeat.parse_args(["--", "--json", "x.json"])
    with pytest.raises(SystemExit):
        repeat.parse_args(["--calls", "0"])


def test_repeat_benchmark_ends_on_the_failed_calls_own_message(tmp_path, monkeypatch):
    repeat = benchmark_scripts.load("repeat")
    failing = tmp_path / "throughput.py"
    failing.write_text("import sys\nprint('a warning first', file=sys.stderr)\nsys.exit('error: no model called x')\n")
    monkeypatch.setattr(repeat, "THROUGHPUT", failing)
    with pytest.raises(SystemExit, match=r"throughput.py --model x failed: error: no model called x$"):
        repeat.main(["--calls", "1", "--", "--model", "x"])
