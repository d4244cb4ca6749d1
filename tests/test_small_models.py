"""benchmarks/small_models.py in its quick mode: every row's share is its speedup over its FLOP ratio."""

from __future__ import annotations

import json

import pytest

from dynvit import methods
from tests import benchmark_scripts


def test_quick_run_times_the_student_and_tome_against_the_teacher_at_each_batch(tmp_path, capsys):
    out = tmp_path / "small.json"
    rows = benchmark_scripts.load("small_models").main(["--quick", "--attention-kernel", "sdpa", "--json", str(out)])
    assert [(r["method"], r["batch_size"]) for r in rows] == [
        ("dynamicvit", 1),
        ("tome", 1),
        ("dynamicvit", 2),
        ("tome", 2),
    ]
    # ToMe is set to the student's GFLOPs (within one merge per block) and both cost less than the teacher.
    student, tome = rows[0]["gflops"], rows[1]["gflops"]
    assert abs(tome - student) / student < 0.05 and min(r["flop_ratio"] for r in rows) > 1.2
    for r in rows:
        assert r["share"] == pytest.approx(r["speedup"] / r["flop_ratio"]) and r["speedup"] > 0
    assert json.loads(out.read_text())["rows"] == rows
    printed = capsys.readouterr().out
    assert "| tome | 2 |" in printed and "attention kernel sdpa" in printed and "runtime: eager" in printed
    assert benchmark_scripts.load("small_models").parse_args(["--compile"]).compile


def test_merging_names_every_merging_method_and_unknown_ones_are_refused(capsys):
    module = benchmark_scripts.load("small_models")
    args = module.parse_args(["--methods", "dynamicvit,merging,tome"])
    assert args.methods[0] == "dynamicvit" and args.methods.count("tome") == 1
    assert set(args.methods[1:]) == {m.name for m in methods.registered().values() if "sources" in m.reports}
    with pytest.raises(SystemExit, match="2"):
        module.parse_args(["--methods", "tomee"])
    assert "unknown token-reduction method 'tomee'" in capsys.readouterr().err
