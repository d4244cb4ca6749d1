"""benchmarks/dvt_digits.py: the equal-top-1 comparison it draws its verdicts from, and its refusals."""

from __future__ import annotations

import pytest

from dynvit.run.report import ResultRow
from tests import benchmark_scripts


def point(top1: float, speedup: float) -> ResultRow:
    return ResultRow("dynamicvit", 0.7, 0.05, 1.0, speedup=speedup, top1=top1)


def test_fastest_speedup_reaching_a_top1_walks_the_curve_from_the_fastest_point():
    fastest_reaching = benchmark_scripts.load("dvt_digits").fastest_reaching
    curve = [point(0.90, 2.0), point(0.94, 1.5), point(0.96, 1.2), point(0.95, 1.0)]
    assert fastest_reaching(0.89, curve) == 2.0  # the fastest point already reaches it
    # Between 2.0× at 90 % and 1.5× at 94 %: 92 % is reached halfway, at 1.75×.
    assert fastest_reaching(0.92, curve) == pytest.approx(1.75)
    # 95.5 % is first reached at 1.2× (96 %), three quarters of the way from 1.5× (94 %).
    assert fastest_reaching(0.955, curve) == pytest.approx(1.275)
    assert fastest_reaching(0.97, curve) is None  # no point reaches it


def test_missing_checkpoints_and_bad_ratios_are_refused_with_what_to_do(tmp_path, capsys):
    script = benchmark_scripts.load("dvt_digits")
    with pytest.raises(SystemExit):
        script.parse_args(["--dvt", str(tmp_path / "dvt.ckpt"), "--student", str(tmp_path / "student.ckpt")])
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and "train it first" in err
    for name in ("dvt.ckpt", "student.ckpt"):
        (tmp_path / name).write_bytes(b"")
    files = ["--dvt", str(tmp_path / "dvt.ckpt"), "--student", str(tmp_path / "student.ckpt")]
    with pytest.raises(SystemExit):
        script.parse_args([*files, "--ratios", "0.7", "1.5"])
    assert "keep ratios are in (0, 1]" in capsys.readouterr().err
