"""Output files: written through a temporary file with the mode a plain ``open()`` gives, and checked up front."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dynvit.files import check_output_file, check_output_folder, staged, write_text
from dynvit.models.checkpoint import save_atomic


@pytest.fixture
def umask():
    """Set the process umask for the test; restore it after."""
    before = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(before)


def _writers(folder: Path):
    def staged_bytes(path: Path) -> None:
        with staged(path) as staging:
            staging.write_bytes(b"graph")

    return {
        "staged": (staged_bytes, folder / "model.onnx"),
        "save_atomic": (lambda path: save_atomic({"w": torch.ones(2)}, path), folder / "predictions.pt"),
        "write_text": (lambda path: write_text(path, '{"done": true}'), folder / "done.json"),
    }


@pytest.mark.parametrize("mask", [0o022, 0o077])
@pytest.mark.parametrize("writer", ["staged", "save_atomic", "write_text"])
def test_files_written_through_a_temporary_file_get_the_mode_open_would_give(tmp_path, umask, mask, writer):
    umask(mask)
    write, path = _writers(tmp_path)[writer]
    write(path)
    # 0o644 under the usual umask: readable by a server running as another user (mkstemp's 0o600 was not).
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_an_output_path_that_cannot_be_written_is_named_with_its_option(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^--out .*/file is a file: give a folder"):
        check_output_folder(tmp_path / "file", "--out")
    with pytest.raises(ValueError, match=r"^cannot write --out .*/file/sub: .*/file is a file, not a folder"):
        check_output_folder(tmp_path / "file" / "sub", "--out")
    with pytest.raises(ValueError, match=r"^--out .* is a folder: give the file to write in it"):
        check_output_file(tmp_path, "--out", writable=True)
    # /proc takes no new files, even from root (for whom os.access says yes everywhere).
    with pytest.raises(ValueError, match=r"^cannot write --out /proc/nope/x.onnx: no file can be created in /proc \("):
        check_output_file("/proc/nope/x.onnx", "--out", writable=True)
    with pytest.raises(ValueError, match=r"^cannot write --out /proc/nope: no file can be created in /proc"):
        check_output_folder("/proc/nope", "--out")
    # A folder that does not exist yet is fine, and is not made by the check.
    assert check_output_folder(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert check_output_file(tmp_path / "c" / "m.onnx", "--out", writable=True) == tmp_path / "c" / "m.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
