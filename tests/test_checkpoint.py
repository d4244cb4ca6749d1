"""Checkpoints: the file formats users have, teacher → student, clear mismatches, atomic saves, and
equivalence with an independent re-implementation of the reference DynamicViT (released-checkpoint layout)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dynvit import create_student, create_teacher, load_checkpoint
from dynvit.models import CheckpointMismatch, UnreadableCheckpoint, masked_softmax, read_state_dict
from dynvit.models.checkpoint import save_atomic
from tests.conftest import TINY, TINY_LOC
from tests.reference_dynamicvit import VisionTransformerDiffPruning, softmax_with_policy

NAME = "deit_tiny_patch16_224"


def teacher(**kwargs):
    return create_teacher(NAME, **{**TINY, **kwargs})


def student(keep_ratio: float = 0.7, **kwargs):
    return create_student(NAME, keep_ratio=keep_ratio, pruning_loc=TINY_LOC, **{**TINY, **kwargs})


def images(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, TINY["img_size"], TINY["img_size"])


def predictor_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("score_predictor.")}


# Each writer saves a teacher state dict the way some tool does; all must load into a student.
WRITERS = {
    "deit_pth": lambda sd, d: _save({"model": sd}, d / "deit.pth"),
    "deit_pth_tar": lambda sd, d: _save({"model": sd}, d / "checkpoint.pth.tar"),
    "plain_state_dict": lambda sd, d: _save(sd, d / "weights.pth"),
    "safetensors": lambda sd, d: _save_safetensors(sd, d / "model.safetensors"),
    "ddp_module_prefix": lambda sd, d: _save({"model": {f"module.{k}": v for k, v in sd.items()}}, d / "ddp.pth"),
    # DeiT's training script also pickles its argparse namespace, which weights_only loading refuses.
    "deit_full_training_state": lambda sd, d: _save(
        {"model": sd, "optimizer": {"state": {}}, "epoch": 299, "args": argparse.Namespace(lr=5e-4)},
        d / "deit_full.pth",
    ),
    # This toolkit's classifier LightningModule keeps the network as ``net``.
    "lightning_ckpt": lambda sd, d: _save(
        {
            "state_dict": {f"net.{k}": v for k, v in sd.items()},
            "pytorch-lightning_version": "2.4.0",
            "epoch": 3,
            "hyper_parameters": {"lr": 1e-3},
        },
        d / "last.ckpt",
    ),
}


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _save_safetensors(sd: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_teacher_checkpoint_loads_into_student(fmt: str, tmp_path: Path) -> None:
    source = teacher()
    path = WRITERS[fmt](source.state_dict(), tmp_path)
    model = student()
    fresh = predictor_state(model)
    report = load_checkpoint(model, path)
    assert report.unexpected == [] and report.reset == []
    assert set(report.missing) == set(fresh)
    for k, v in model.state_dict().items():
        expected = fresh[k] if k in fresh else source.state_dict()[k]
        assert torch.equal(v, expected), k
    # The same file works through the factories.
    assert torch.equal(
        create_student(NAME, pruning_loc=TINY_LOC, checkpoint=path, **TINY).head.weight, source.head.weight
    )
    assert torch.equal(create_teacher(NAME, checkpoint=path, **TINY).pos_embed, source.pos_embed)


@pytest.mark.parametrize("prefix", ["net.", "student.", "model.", ""])
def test_lightning_student_checkpoint_round_trips(prefix: str, tmp_path: Path) -> None:
    """A pruning run stores student and teacher in one file; the student's keys (predictors included) load.

    ``net.`` is this toolkit's attribute name; ``student.``/``model.`` are common elsewhere; a module
    may also hold the network's layers itself (no prefix).
    """
    trained, frozen = student(), teacher()
    sd = {f"{prefix}{k}": v for k, v in trained.state_dict().items()}
    if prefix:
        sd.update({f"teacher.{k}": torch.zeros_like(v) for k, v in frozen.state_dict().items()})
    path = _save({"state_dict": sd, "pytorch-lightning_version": "2.4.0"}, tmp_path / "epoch=1.ckpt")
    model = student()
    report = load_checkpoint(model, path)
    assert report.missing == [] and report.unexpected == []
    x = images()
    torch.testing.assert_close(model.eval()(x), trained.eval()(x), rtol=0, atol=0)


def test_head_of_another_class_count_needs_reset_head(tmp_path: Path) -> None:
    source = teacher(num_classes=1000)
    path = _save({"model": source.state_dict()}, tmp_path / "imagenet.pth")
    model = student(num_classes=TINY["num_classes"])
    with pytest.raises(CheckpointMismatch, match=r"head.weight: checkpoint \(1000, 32\) vs model \(10, 32\)") as err:
        load_checkpoint(model, path)
    assert "reset_head=True" in str(err.value)
    head = model.head.weight.clone()
    report = load_checkpoint(model, path, reset_head=True)
    assert sorted(report.reset) == ["head.bias", "head.weight"]
    assert torch.equal(model.head.weight, head)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_checkpoint_of_another_architecture_lists_what_does_not_fit(tmp_path: Path) -> None:
    # Five blocks (one unexpected), an MLP of another width (shape clashes).
    other = teacher(depth=5, mlp_ratio=2.0)
    path = _save({"model": other.state_dict()}, tmp_path / "other.pth")
    with pytest.raises(CheckpointMismatch) as err:
        load_checkpoint(student(), path)
    message = str(err.value)
    assert "shape clashes" in message and "blocks.0.mlp.fc1.weight: checkpoint (64, 32) vs model (128, 32)" in message
    assert "unexpected keys (12): blocks.4.norm1.weight" in message
    # Three blocks: the fourth block's weights are missing (the predictors' absence is fine).
    shallow = _save({"model": teacher(depth=3).state_dict()}, tmp_path / "shallow.pth")
    with pytest.raises(CheckpointMismatch, match=r"missing keys \(\d+\): blocks\.3\.norm1\.weight") as err:
        load_checkpoint(student(), shallow)
    assert "score_predictor" not in str(err.value)
    # The factories raise the same error.
    with pytest.raises(CheckpointMismatch, match="does not fit"):
        create_student(NAME, pruning_loc=TINY_LOC, checkpoint=shallow, **TINY)


def test_non_strict_load_takes_what_fits_and_reports_the_rest(tmp_path: Path) -> None:
    shallow = teacher(depth=3)
    path = _save(shallow.state_dict(), tmp_path / "shallow.pth")
    model = teacher()
    last = model.blocks[3].mlp.fc1.weight.clone()
    report = load_checkpoint(model, path, strict=False)
    assert report.unexpected == [] and all(k.startswith("blocks.3.") for k in report.missing) and report.missing
    assert torch.equal(model.blocks[0].mlp.fc1.weight, shallow.blocks[0].mlp.fc1.weight)
    assert torch.equal(model.blocks[3].mlp.fc1.weight, last)


def test_files_without_weights_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    path = _save({"epoch": 3, "lr": [0.1]}, tmp_path / "not_weights.pth")
    with pytest.raises(CheckpointMismatch, match="holds no state dict"):
        read_state_dict(path)


def test_save_atomic_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "run" / "last.ckpt"
    save_atomic({"w": torch.ones(3)}, path)
    assert torch.equal(torch.load(path)["w"], torch.ones(3))
    # A lambda cannot be pickled: torch.save fails after it has started writing.
    with pytest.raises(Exception, match="lambda|pickle"):
        save_atomic({"w": torch.zeros(1000), "f": lambda: 0}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert torch.equal(torch.load(path)["w"], torch.ones(3))
    with pytest.raises(Exception, match="lambda|pickle"):
        save_atomic({"f": lambda: 0}, tmp_path / "never.ckpt")
    assert not (tmp_path / "never.ckpt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


# --- the released-checkpoint layout: an independent reference model ------------------------------------


def reference(keep_ratio: float = 0.7) -> VisionTransformerDiffPruning:
    kwargs = {k: v for k, v in TINY.items()}
    return VisionTransformerDiffPruning(
        **kwargs, pruning_loc=TINY_LOC, token_ratio=tuple(keep_ratio ** (s + 1) for s in range(len(TINY_LOC)))
    )


@pytest.fixture
def released(tmp_path: Path) -> tuple[VisionTransformerDiffPruning, Path]:
    ref = reference()
    with torch.no_grad():  # predictors with non-trivial weights, as after training
        for p in ref.score_predictor.parameters():
            p.normal_(0, 0.3)
    return ref, _save({"model": ref.state_dict()}, tmp_path / "dynamicvit_tiny_0.7.pth")


def test_released_checkpoint_loads_strictly_and_gives_the_reference_eval_logits(released) -> None:
    ref, path = released
    model = create_student(NAME, keep_ratio=0.7, pruning_loc=TINY_LOC, checkpoint=path, **TINY)
    assert set(model.state_dict()) == set(ref.state_dict())
    model.load_state_dict(ref.state_dict(), strict=True)
    assert load_checkpoint(model, path) == ([], [], [], [])
    x = images(6)
    for keep_ratio in (0.7, 0.5):
        model.keep_ratio = keep_ratio
        ref.token_ratio = tuple(keep_ratio ** (s + 1) for s in range(len(TINY_LOC)))
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)


def test_released_checkpoint_gives_the_reference_training_forward(released) -> None:
    ref, path = released
    model = create_student(NAME, keep_ratio=0.7, pruning_loc=TINY_LOC, checkpoint=path, **TINY).train()
    x = images(6)
    # The only random ops are the per-stage Gumbel draws, in the same order and shape: same seed, same noise.
    torch.manual_seed(7)
    logits, tokens, mask, decisions = ref.train()(x)
    torch.manual_seed(7)
    out = model(x)
    for ours, theirs in zip(out.decisions, decisions, strict=True):
        assert torch.equal(ours, theirs)
    assert 0 < mask.sum() < mask.numel()  # some tokens dropped, some kept: the masks matter
    assert torch.equal(out.mask, mask.squeeze(-1))
    torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.tokens, tokens, rtol=1e-4, atol=1e-5)
    # The gradients agree too: the straight-through path and the masked softmax are the same math.
    y = torch.arange(6) % TINY["num_classes"]
    torch.nn.functional.cross_entropy(logits, y).backward()
    torch.nn.functional.cross_entropy(out.logits, y).backward()
    theirs = dict(ref.named_parameters())
    for name, p in model.score_predictor.named_parameters():
        torch.testing.assert_close(p.grad, theirs[f"score_predictor.{name}"].grad, rtol=1e-3, atol=1e-6)


def test_masked_softmax_is_the_reference_formula() -> None:
    scores = torch.randn(2, 3, 11, 11) * 5
    keep = torch.rand(2, 11)  # soft values too: the straight-through gradient sees them
    keep[:, 0] = 1
    torch.testing.assert_close(masked_softmax(scores, keep), softmax_with_policy(scores, keep[..., None]))
    # In half precision the reference subtracts the row max before its float32 cast, we after: equal up
    # to half-precision rounding of the logits.
    for dtype in (torch.bfloat16, torch.float16):
        ours = masked_softmax(scores.to(dtype), keep.to(dtype))
        theirs = softmax_with_policy(scores.to(dtype), keep[..., None].to(dtype))
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.to(dtype), theirs, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (None, FileNotFoundError, "checkpoint {path} does not exist"),
        (
            "truncated",
            UnreadableCheckpoint,
            "checkpoint {path} is truncated or damaged: torch cannot read its 600 bytes",
        ),
        (b"\x13\x37" * 300, UnreadableCheckpoint, "checkpoint {path} is not a PyTorch checkpoint: its 600 bytes"),
        (b"", UnreadableCheckpoint, "checkpoint {path} is not a PyTorch checkpoint: its 0 bytes"),
        (b"\x13\x37" * 300, UnreadableCheckpoint, "checkpoint {path} is not a readable safetensors file"),
    ],
)
def test_files_that_are_no_checkpoints_are_named_in_the_error(tmp_path: Path, content, error, message) -> None:
    path = tmp_path / ("student.safetensors" if "safetensors" in message else "student.pth")
    if content == "truncated":
        whole = _save({"model": create_teacher("deit_tiny_patch16_224", **TINY).state_dict()}, tmp_path / "whole.pth")
        path.write_bytes(whole.read_bytes()[:600])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(error) as raised:
        load_checkpoint(create_student("deit_tiny_patch16_224", pruning_loc=TINY_LOC, **TINY), path)
    assert str(raised.value).startswith(message.format(path=path))
    assert "weights_only" not in str(raised.value)
