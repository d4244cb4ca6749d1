"""FLOPs, throughput and kept-token callbacks: what they log (CSV and offline W&B), save and draw."""

from __future__ import annotations

import csv
import glob
import json
import struct
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torchvision.io import read_image

from dynvit.data import ClutteredDigitsDataModule
from dynvit.lightning import DynamicViTModule
from dynvit.measure import (
    FlopsCallback,
    KeptTokensCallback,
    ThroughputCallback,
    count_flops,
    kept_token_recall,
    kept_tokens_grid,
    to_display,
)
from tests.tiny_config import DIGITS, STUDENT

KEEP_BEFORE, KEEP_AFTER = 0.7, 0.5


def wandb_records(run_dir: Path) -> list:
    """Records of an offline W&B run, read from its ``run-*.wandb`` file.

    Offline mode writes no ``files/wandb-summary.json``; everything logged is in this append-only
    file: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a 7-byte
    header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last) holding protobuf ``Record``s.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(glob.glob(str(run_dir / "run-*.wandb"))[0]).read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too short for a header: skip to the next block
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending + chunk)
            out.append(record)
            pending = b""
        elif kind in (2, 3):
            pending += chunk
    return out


def wandb_history(run_dir: Path) -> list[dict]:
    """Every ``log`` call of the run as a dict of key → decoded JSON value."""
    rows = []
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


class ChangeKeepRatio(L.Callback):
    """Lowers the student's keep ratio when epoch 1 starts, as a keep-ratio schedule would."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            pl_module.net.keep_ratio = KEEP_AFTER


def tiny_module() -> DynamicViTModule:
    return DynamicViTModule(num_classes=10, img_size=32, in_chans=1, keep_ratio=KEEP_BEFORE, **STUDENT)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Two epochs of a tiny student with every callback, a CSV logger and an offline W&B logger."""
    root = tmp_path_factory.mktemp("fit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(root))
        mp.setenv("WANDB_SILENT", "true")
        import wandb

        L.seed_everything(0)
        module = tiny_module()
        wandb_logger = WandbLogger(save_dir=str(root), project="dynvit-tests", group="callbacks", offline=True)
        callbacks = [
            ChangeKeepRatio(),
            FlopsCallback(),
            ThroughputCallback(batch_size=2, pairs=6, block_time=0.0, warmup_time=0.0),
            KeptTokensCallback(num_images=3),
            ModelCheckpoint(dirpath=root / "checkpoints", save_last=True),
        ]
        trainer = L.Trainer(
            default_root_dir=root,
            max_epochs=2,
            limit_train_batches=2,
            limit_val_batches=1,
            num_sanity_val_steps=0,
            accelerator="cpu",
            logger=[CSVLogger(root, name="csv"), wandb_logger],
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule=ClutteredDigitsDataModule(**DIGITS))
        run_dir = Path(wandb_logger.experiment.dir).parent
        wandb.finish()
    with open(root / "csv" / "version_0" / "metrics.csv") as f:
        csv_rows = list(csv.DictReader(f))
    return SimpleNamespace(root=root, module=module, csv=csv_rows, wandb_dir=run_dir, trainer=trainer)


def logged(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def gflops_at(module: DynamicViTModule, ratio: float) -> float:
    old = module.net.keep_ratio
    module.net.keep_ratio = ratio
    try:
        return count_flops(module.net)
    finally:
        module.net.keep_ratio = old


def test_logged_gflops_equal_count_flops_at_each_keep_ratio(fitted):
    expected = [gflops_at(fitted.module, KEEP_BEFORE), gflops_at(fitted.module, KEEP_AFTER)]
    assert expected[1] < expected[0]
    # Logged once at fit start and once more when the ratio changed, not every epoch.
    assert logged(fitted.csv, "cost/gflops") == pytest.approx(expected, rel=1e-9)
    assert logged(fitted.csv, "cost/keep_ratio") == [KEEP_BEFORE, KEEP_AFTER]
    assert logged(fitted.csv, "cost/teacher_gflops") == pytest.approx([count_flops(fitted.module.teacher)] * 2)
    params = sum(p.numel() for p in fitted.module.net.parameters()) / 1e6
    assert logged(fitted.csv, "cost/params_m") == pytest.approx([params, params])


def test_drawing_kept_tokens_leaves_the_random_stream_where_it_was(fitted, tmp_path):
    # Its first call in a process builds a loader, which draws a seed: a resumed run then trained on other noise.
    callback = KeptTokensCallback(num_images=3, dirname=str(tmp_path / "pictures"))
    before = torch.get_rng_state()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fitted.trainer, "loggers", [])  # W&B finished with the fit
        callback.on_validation_epoch_end(fitted.trainer, fitted.module)
    assert callback.last_path is not None and callback.last_path.is_file()
    assert torch.equal(torch.get_rng_state(), before)


def test_checkpoint_metadata_holds_the_latest_cost(fitted):
    meta = torch.load(fitted.root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["dynvit"]
    assert meta["keep_ratio"] == KEEP_AFTER
    assert meta["gflops"] == pytest.approx(gflops_at(fitted.module, KEEP_AFTER), rel=1e-9)
    assert meta["teacher_gflops"] == pytest.approx(count_flops(fitted.module.teacher), rel=1e-9)


def test_throughput_logged_with_speedup_over_teacher(fitted):
    student = logged(fitted.csv, "throughput/images_per_s")
    teacher = logged(fitted.csv, "throughput/teacher_images_per_s")
    speedup = logged(fitted.csv, "throughput/speedup")
    assert len(student) == len(teacher) == len(speedup) == 1
    assert student[0] > 0 and teacher[0] > 0 and speedup[0] > 0
    # Six pairs: the 95 % interval (the extreme ratios) is logged beside the median.
    low, high = logged(fitted.csv, "throughput/speedup_low"), logged(fitted.csv, "throughput/speedup_high")
    assert len(low) == len(high) == 1 and low[0] <= speedup[0] <= high[0]


def test_offline_wandb_run_holds_the_metrics(fitted):
    history = wandb_history(fitted.wandb_dir)
    cost = [h["cost/gflops"] for h in history if "cost/gflops" in h]
    assert cost == pytest.approx(logged(fitted.csv, "cost/gflops"), rel=1e-9)
    top1 = [h["val/top1"] for h in history if "val/top1" in h]
    assert top1 == pytest.approx(logged(fitted.csv, "val/top1"))
    assert any("throughput/speedup" in h for h in history)
    # An image is logged as a file in the run folder plus its description (nested keys).
    images = [h for h in history if h.get("val/kept_tokens/_type") == "images/separated"]
    assert [(h["val/kept_tokens/count"], h["val/kept_tokens/width"]) for h in images] == [(1, 522), (1, 522)]
    for h in images:
        assert (fitted.wandb_dir / "files" / h["val/kept_tokens/filenames"][0]).is_file()
    run = next(r.run for r in wandb_records(fitted.wandb_dir) if r.WhichOneof("record_type") == "run")
    assert run.run_group == "callbacks"


def test_kept_tokens_png_per_epoch_with_one_row_per_image(fitted):
    paths = sorted((fitted.root / "kept_tokens").glob("*.png"))
    assert [p.name for p in paths] == ["epoch_000.png", "epoch_001.png"]
    image = read_image(str(paths[-1]))
    tile = 32 * 4  # 32-px digits are enlarged 4× for legibility
    columns, rows = 1 + 3, 3  # input + 3 stages; 3 images
    assert tuple(image.shape) == (3, rows * (tile + 2) + 2, columns * (tile + 2) + 2)


def test_callbacks_do_nothing_off_rank_zero(fitted):
    logger = SimpleNamespace(log_metrics=lambda *a, **k: pytest.fail("logged off rank 0"))
    trainer = SimpleNamespace(is_global_zero=False, loggers=[logger], global_step=0)
    flops = FlopsCallback()
    flops.on_fit_start(trainer, fitted.module)
    checkpoint: dict = {}
    flops.on_save_checkpoint(trainer, fitted.module, checkpoint)
    throughput = ThroughputCallback()
    throughput.on_fit_end(trainer, fitted.module)
    assert flops.metrics == {} and throughput.metrics == {} and checkpoint == {}


def test_kept_tokens_needs_a_pruned_model():
    plain = SimpleNamespace(net=torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="reports none"):
        KeptTokensCallback().setup(None, plain, "fit")


def test_grid_greys_dropped_patches_and_outlines_the_object():
    images = torch.ones(1, 3, 8, 8)  # a white 2×2-patch image (patch 4)
    keep = torch.tensor([[True, False, False, False]])
    target = torch.tensor([[False, False, False, True]])
    grid = kept_tokens_grid(images, [keep], (2, 2), target)
    tile = 8 * 16  # enlarged to 128 px
    kept_col = grid[:, 2 : 2 + tile, 2 + tile + 2 : 2 + 2 * tile + 2]
    half = tile // 2
    assert torch.all(kept_col[:, :half, :half] == 1.0)  # patch 0 kept as is
    assert torch.allclose(kept_col[:, 4 : half - 4, half + 4 : -4], torch.tensor(0.625))  # patch 1 greyed
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1)
    assert torch.equal(kept_col[:, -1, half:], red.expand(-1, half))  # object's bottom edge outlined
    assert torch.all(kept_col[:, half + 8, half + 8] == 0.625)  # inside the object: not outlined


def test_to_display_handles_one_and_three_channels():
    gray = torch.tensor([[[[-1.0, 0.0], [1.0, 3.0]]]])  # normalised with mean 0.5, std 0.25
    shown = to_display(gray, (0.5,), (0.25,))
    assert shown.shape == (1, 3, 2, 2)
    assert torch.allclose(shown[0, 0], torch.tensor([[0.25, 0.5], [0.75, 1.0]]))  # 3.0 → 1.25, clamped
    assert torch.equal(shown[0, 0], shown[0, 2])
    rgb = torch.randn(2, 3, 4, 4) * 5
    stretched = to_display(rgb, None, None)
    assert stretched.amin(dim=(1, 2, 3)).tolist() == [0.0, 0.0]
    assert stretched.amax(dim=(1, 2, 3)).tolist() == [1.0, 1.0]


def test_kept_token_recall_per_image_skips_images_without_object():
    keep = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    target = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert kept_token_recall(keep, target).tolist() == [0.5, 1.0]
    with pytest.raises(ValueError, match="same patch grid"):
        kept_token_recall(keep, target[:, :3])


def test_grid_colours_each_patch_by_its_group():
    """A column of patch groups tints every patch half-way to its group's colour (a golden-ratio hue step per
    group id, written out here), greys a patch in no group out, and gives one group one colour."""
    import colorsys

    images = torch.full((1, 3, 8, 8), 0.2)  # 2×2 patches of 4 px
    groups = torch.tensor([[3, 0, 3, -1]])
    grid = kept_tokens_grid(images, [groups], (2, 2))
    tile, half = 8 * 16, 8 * 16 // 2  # enlarged to 128 px
    column = grid[:, 2 : 2 + tile, 2 + tile + 2 : 2 + 2 * tile + 2]
    corners = {0: (0, 0), 1: (0, half), 2: (half, 0), 3: (half, half)}  # patch → top-left pixel
    for patch, group in enumerate(groups[0].tolist()):
        r, c = corners[patch]
        block = column[:, r : r + half, c : c + half]
        if group < 0:
            expected = torch.full((3,), 0.25 * 0.2 + 0.375)
        else:
            hue = (group * 0.6180339887) % 1.0
            expected = 0.5 * 0.2 + 0.5 * torch.tensor(colorsys.hsv_to_rgb(hue, 0.75, 0.95))
        torch.testing.assert_close(block, expected.view(3, 1, 1).expand_as(block))
    # Patches 0 and 2 share a token, so a colour; patch 1's token differs.
    assert torch.equal(column[:, 0, 0], column[:, half, 0]) and not torch.equal(column[:, 0, 0], column[:, 0, half])


def test_flops_callback_logs_the_registry_knob_of_any_method():
    """ToMe's cost is set by r, a student's by its keep ratio, a plain ViT's by nothing: the callback logs what the
    registry names (and GFLOPs follow it when it changes)."""
    from dynvit import create_teacher
    from dynvit.reducers import apply_reducer

    arch = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=3)
    trainer = SimpleNamespace(is_global_zero=True, loggers=[])
    for model, knob, value in (
        (apply_reducer(create_teacher("vit_tiny_patch16_224", **arch), "tome", r=2), "cost/r", 2.0),
        (create_teacher("vit_tiny_patch16_224", **arch), None, None),
    ):
        module = SimpleNamespace(net=model, teacher=None, device=torch.device("cpu"))
        callback = FlopsCallback()
        callback.on_fit_start(trainer, module)
        assert callback.metrics["cost/gflops"] == pytest.approx(count_flops(model))
        assert {k for k in callback.metrics if k not in ("cost/gflops", "cost/params_m")} == ({knob} if knob else set())
        if knob:
            assert callback.metrics[knob] == value
            model.configure(r=4)  # a new setting is measured again at the next check
            callback.on_train_epoch_start(trainer, module)
            assert callback.metrics[knob] == 4.0 and callback.metrics["cost/gflops"] == pytest.approx(
                count_flops(model)
            )
