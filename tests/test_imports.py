"""What importing dynvit loads: timm's own modules and dynvit's, nothing heavier.

Lightning, matplotlib, torchao, ONNX and fvcore take seconds to import and serve only training,
reports, deployment and FLOP counts, so they load where they are used (benchmarks/import_time.py
times the difference). wandb is the exception the test cannot demand: timm 1.0 imports it itself
(``timm/utils/summary.py``), so it is absent only where timm's own import leaves it out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("lightning", "pytorch_lightning", "matplotlib", "torchao", "onnx", "onnxruntime", "fvcore", "sklearn")
# In this order in one interpreter: a submodule's import runs its package's __init__ first, so after
# each statement ``sys.modules`` holds what a fresh interpreter running it alone loads (and no less).
STATEMENTS = ("import dynvit", "import dynvit.models", "import dynvit.reducers")
SNAPSHOT = "import sys\nprint(*sorted(sys.modules), '--', sep='\\n', flush=True)"


def modules_after(statements: tuple[str, ...]) -> subprocess.Popen:
    """A fresh interpreter that prints ``sys.modules`` after each statement, ending each list with ``--``."""
    code = "\n".join(f"{statement}\n{SNAPSHOT}" for statement in statements)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def loaded() -> dict[str, set[str]]:
    """The modules in ``sys.modules`` after ``import timm`` alone, and after each of ``STATEMENTS``."""
    timm, dynvit = modules_after(("import timm",)), modules_after(STATEMENTS)  # side by side
    snapshots = []
    for process in (timm, dynvit):
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        snapshots += [set(block.split()) for block in out.split("--")[:-1]]
    return dict(zip(("import timm", *STATEMENTS), snapshots, strict=True))


@pytest.mark.parametrize("statement", STATEMENTS)
def test_import_loads_only_what_timm_loads_and_dynvit(loaded, statement) -> None:
    modules = loaded[statement]
    assert {"dynvit", "timm", statement.split()[1]} <= modules
    beyond_timm = sorted(m for m in modules - loaded["import timm"] if m.split(".")[0] != "dynvit")
    assert beyond_timm == []
    assert [m for m in HEAVY if m in modules] == []
    assert "wandb" not in modules or "wandb" in loaded["import timm"]


def test_every_public_name_resolves_to_its_module_object() -> None:
    import dynvit
    import dynvit.measure
    from dynvit.measure import callbacks
    from dynvit.reducers import create_reduced

    for package in (dynvit, dynvit.measure):
        assert [name for name in package.__all__ if getattr(package, name, None) is None] == []
    assert dynvit.create_reduced is create_reduced
    assert dynvit.measure.FlopsCallback is callbacks.FlopsCallback
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        dynvit.no_such_name  # noqa: B018
