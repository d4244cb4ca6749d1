"""Every benchmark script refuses a bad option as a usage error naming the fix, before it builds a model."""

from __future__ import annotations

import re

import pytest

from tests import benchmark_scripts

# (script, options) each script must refuse while parsing: before, each was found only after models were
# built (--threads 0, --device cuda) or after the whole run (an unwritable --json: the results were lost).
# Unknown method names: test_methods_speed.py and test_small_models.py.
BAD = [
    ("throughput", ["--threads", "0"], r"--threads must be >= 1, got 0"),
    ("throughput", ["--device", "nodevice"], r"--device nodevice: not a device torch knows"),
    ("deploy_paths", ["--threads", "0"], r"--threads must be >= 1"),
    ("gpu", ["--device", "cpu", "--json", "{folder}"], r"--json .* is a folder"),
    ("repeat", ["--json", "{file}/x.json"], r"cannot write --json .*is a file, not a folder"),
    ("methods_speed", ["--quick", "--json", "{file}/x.json"], r"cannot write --json"),
    ("small_models", ["--quick", "--json", "{file}/x.json"], r"cannot write --json"),
]


@pytest.mark.parametrize(("script", "options", "message"), BAD, ids=[f"{s}:{' '.join(o)}" for s, o, _ in BAD])
def test_a_bad_option_is_a_usage_error_naming_it(tmp_path, capsys, script: str, options: list, message: str) -> None:
    file = tmp_path / "a_file"
    file.write_text("")
    argv = [o.format(folder=tmp_path, file=file) for o in options]
    with pytest.raises(SystemExit) as exit_:
        benchmark_scripts.load(script).parse_args(argv)
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_an_existing_json_file_may_be_overwritten(tmp_path) -> None:
    out = tmp_path / "rows.json"
    out.write_text("{}")
    assert benchmark_scripts.load("throughput").parse_args(["--json", str(out)]).json == str(out)
