"""Every ```python block of README.md runs, and every value a README comment states holds.

The blocks read as one session (later blocks use ``dynvit``, ``images`` and the students of earlier
ones), so they run in order in one namespace; asking for a later block runs the earlier ones first.
They load checkpoints by the names users' files have. The fixture writes those files from scratch,
with random weights, in a temporary working folder, each in its release's key layout: DeiT's is
timm's; the released DynamicViT, DynamicCNN and DynamicSwin files and FB's ConvNeXt and MSRA's Swin
come from the tests' independent reference models, whose ``state_dict()`` has those layouts.

An expression statement whose comment begins with a number or a list of numbers
(``count_flops(student)  # 2.988 GFLOPs``) states its value: the test compares it at the precision written.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

from tests.reference_dynamic_convnext import DynamicCNNReference
from tests.reference_dynamic_swin import DynamicSwinReference
from tests.reference_dynamicvit import VisionTransformerDiffPruning

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
# A comment that states a value: a number, or a bracketed list of numbers, before any other word.
STATED = re.compile(r"#\s*(\[[-\d.,\s]*\]|-?\d+(?:\.\d+)?)(?=\s|$|,)")


def python_blocks() -> list[tuple[int, str]]:
    """(first line number, source) of every ```python block, in README order."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


BLOCKS = python_blocks()


def checkpoint_files(folder: Path) -> None:
    """The checkpoint files the README names, with random weights, each in its release's layout."""
    torch.manual_seed(0)
    deit = timm.create_model("deit_small_patch16_224", pretrained=False)
    torch.save({"model": deit.state_dict()}, folder / "deit_small_patch16_224-cd65a155.pth")
    dynamicvit = VisionTransformerDiffPruning()  # DeiT-S with predictors before blocks 3, 6, 9
    torch.save({"model": dynamicvit.state_dict()}, folder / "dynamicvit_deit_s_0.7.pth")
    torch.save({"model": DynamicCNNReference().state_dict()}, folder / "dynamic_convnext_t_0.7.pth")
    fb = DynamicCNNReference(pruning_loc=None).state_dict()
    torch.save({"model": fb, "model_ema": fb}, folder / "convnext_tiny_1k_224_ema.pth")
    torch.save({"model": DynamicSwinReference().state_dict()}, folder / "dynamic_swin_t_0.7.pth")
    msra = DynamicSwinReference(pruning_loc=None).state_dict()
    torch.save({"model": msra}, folder / "swin_tiny_patch4_window7_224.pth")


def stated_values(source: str) -> dict[int, Any]:
    """Line number -> the value its comment states (see the module docstring)."""
    stated = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and (match := STATED.match(token.string)):
            stated[token.start[0]] = ast.literal_eval(match.group(1))
    return stated


def decimals(number: float) -> int:
    text = repr(number)
    return len(text.split(".")[1]) if "." in text else 0


def agrees(value: Any, stated: Any) -> bool:
    """``value`` written at the precision of ``stated`` is ``stated`` (element-wise for lists)."""
    if isinstance(stated, list):
        return len(list(value)) == len(stated) and all(agrees(v, s) for v, s in zip(value, stated, strict=True))
    return round(float(value), decimals(stated)) == stated


class Session:
    """The README's blocks run in order in one namespace, inside the folder of checkpoint files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.namespace: dict[str, Any] = {"__name__": "readme"}
        self.done = 0
        self.failed: int | None = None

    def run_through(self, index: int) -> None:
        while self.done <= index:
            if self.failed is not None:
                pytest.fail(f"the block at README.md:{self.failed} failed, and this one continues its session")
            line, source = BLOCKS[self.done]
            self.failed = line
            self.run_block(line, source)
            self.failed = None
            self.done += 1

    def run_block(self, first_line: int, source: str) -> None:
        tree = ast.parse(source)
        ast.increment_lineno(tree, first_line - 1)  # tracebacks name README.md's lines
        stated = {line + first_line - 1: value for line, value in stated_values(source).items()}
        for statement in tree.body:
            if isinstance(statement, ast.Expr):
                value = eval(compile(ast.Expression(statement.value), str(README), "eval"), self.namespace)
                if statement.end_lineno in stated:
                    claim = stated[statement.end_lineno]
                    assert agrees(value, claim), f"README.md:{statement.end_lineno} states {claim}, got {value}"
            else:
                exec(compile(ast.Module([statement], type_ignores=[]), str(README), "exec"), self.namespace)


@contextmanager
def working_folder(folder: Path) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        yield


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Iterator[Session]:
    folder = tmp_path_factory.mktemp("readme")
    checkpoint_files(folder)
    yield Session(folder)


def test_readme_has_python_blocks_and_stated_values() -> None:
    assert len(BLOCKS) >= 5
    assert sum(len(stated_values(source)) for _, source in BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(session, index) -> None:
    with working_folder(session.folder):
        session.run_through(index)
