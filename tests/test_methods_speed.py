"""``benchmarks/methods_speed.py --quick``: every registered method's released DeiT-S settings, end to end, at a
tiny width (no timing is asserted: only what the numbers are made of)."""

from __future__ import annotations

import copy
import json

import pytest

from dynvit import count_flops, create_teacher, methods
from tests import benchmark_scripts


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[object, dict]:
    script = benchmark_scripts.load("methods_speed")
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    script.main(["--quick", "--json", str(out)])
    return script, json.loads(out.read_text())


def test_every_released_setting_of_every_method_has_a_row(run):
    _, data = run
    expected = [(name, s) for name, m in methods.registered().items() for s in m.released]
    assert [(r["method"], r["setting"]) for r in data["rows"]] == expected
    # Every method declares its authors' DeiT-S setting, so every one is timed.
    assert {name for name, _ in expected} == set(methods.registered())
    assert ("tome", "r=13") in expected and ("mctf", "Fast") in expected and ("diffrate", "2.9 GFLOPs") in expected


def test_ratios_and_flags_are_made_of_the_measured_numbers(run):
    script, data = run
    plain = data["plain_gflops"]
    for row in data["rows"]:
        assert row["flop_ratio"] == pytest.approx(plain / row["gflops"])
        assert row["speedup"] > 0 and row["images_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["speedup"] / row["flop_ratio"])
        assert row["flagged"] == (row["ratio"] < script.FLAG_BELOW)
        if methods.get(row["method"]).cost == "schedule" and not methods.get(row["method"]).learned:
            assert row["gflops"] < plain
    assert data["environment"]["threads"] == 2 and data["environment"]["batch_size"] == 2


def test_gflops_are_fvcore_counts_of_the_method_built_at_its_setting(run):
    script, data = run
    plain = create_teacher("deit_small_patch16_224", **script.QUICK_MODEL).eval()
    assert data["plain_gflops"] == pytest.approx(count_flops(plain))
    for name, setting in (("tome", "r=13"), ("mctf", "Fast")):
        (row,) = [r for r in data["rows"] if (r["method"], r["setting"]) == (name, setting)]
        method = methods.get(name)
        model = method.build(copy.deepcopy(plain), **{**method.default_params(plain), **method.released[setting]})
        assert row["gflops"] == pytest.approx(count_flops(model))


def test_table_flags_slow_methods_and_an_unknown_method_is_refused(capsys):
    script = benchmark_scripts.load("methods_speed")
    row = script.Row("tome", "r=13", {}, 2.0, 2.0, 1.0, 0.9, 1.1, 10.0, 0.5, True)
    table = script.table(4.0, [row])
    assert "| tome | r=13 | 2.000 | 2.00 | 1.00× (0.90–1.10) | 10.0 | 0.50 **< 0.8** |" in table
    # A usage error (exit 2, no traceback) that names the near miss.
    with pytest.raises(SystemExit, match="2"):
        script.parse_args(["--methods", "tomee"])
    assert "did you mean 'tome'" in capsys.readouterr().err
