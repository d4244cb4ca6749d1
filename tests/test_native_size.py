"""The model decides its input: native resolution by default, DataModules that follow it, configs that
name the backbone once, and checkpoints of another grid."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import yaml
from timm.layers import resample_abs_pos_embed

from dynvit import create_student, create_teacher, load_checkpoint
from dynvit.data import ClutteredDigitsDataModule, ImageFolderDataModule, SyntheticDataModule, write_image_folder
from dynvit.lightning import ClassifierModule, DynamicViTModule
from dynvit.models import data_config
from dynvit.reducers import create_reduced
from dynvit.run.cli import DynViTCLI

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(depth=4, embed_dim=32, num_heads=2)  # a 384-px ViT made cheap: its grid is what is tested
LOC = (1, 2, 3)


def test_a_384_model_is_built_at_384_by_every_entry_point() -> None:
    name = "vit_small_patch16_384"
    teacher = create_teacher(name, **SMALL)
    student = create_student(name, keep_ratio=0.7, pruning_loc=LOC, **SMALL)
    reduced = create_reduced(name, "random", params={"pruning_loc": LOC}, **SMALL)
    module = DynamicViTModule(model_name=name, pruning_loc=LOC, model_kwargs=SMALL)
    classifier = ClassifierModule(model_name=name, model_kwargs=SMALL)
    for model in (teacher, student, reduced, module.net, module.teacher, classifier.net):
        assert tuple(model.patch_embed.img_size) == (384, 384) and model.patch_embed.num_patches == 576
    assert student.stage_keep_counts == [403, 282, 197]
    assert module.net.stage_keep_counts == [403, 282, 197]
    with torch.no_grad():
        assert student.eval()(torch.randn(1, 3, 384, 384)).shape == (1, 1000)
    # Another size stays possible: a 14x14 grid keeps what a 224 model keeps.
    at_224 = create_student(name, keep_ratio=0.7, pruning_loc=LOC, img_size=224, **SMALL)
    assert at_224.stage_keep_counts == [137, 96, 67]


def test_data_config_is_the_built_models_not_the_pretrained_configs() -> None:
    config = data_config(create_teacher("vit_small_patch16_384", img_size=224, **SMALL))
    assert config.img_size == (224, 224) and config.patch_size == (16, 16) and config.in_chans == 3
    assert (config.mean, config.std, config.crop_pct) == ((0.5,) * 3, (0.5,) * 3, 1.0)
    # A timm model without patch tokens still names its input size; the digits keep their own patch grid.
    cnn = timm.create_model("resnet18", in_chans=1)
    assert data_config(cnn)[:3] == ((224, 224), 1, None)
    digits = ClutteredDigitsDataModule(digit_scale=1)
    digits.follow(cnn)
    assert (digits.img_size, digits.patch_size) == (224, 8)


def test_image_folder_follows_the_model_and_names_both_sizes_on_a_mismatch(tmp_path) -> None:
    root = write_image_folder(tmp_path / "images", classes=("a", "b"), per_class=2, img_size=24)
    module = ClassifierModule(model_name="vit_small_patch16_384", num_classes=2, model_kwargs=SMALL)
    dm = ImageFolderDataModule(root, num_workers=0, verify_images=False)
    assert (dm.img_size, dm.mean) == (224, (0.485, 0.456, 0.406))  # no model yet: timm's defaults
    dm.follow(module)
    assert (dm.img_size, dm.mean, dm.std, dm.crop_pct) == (384, (0.5,) * 3, (0.5,) * 3, 1.0)
    dm.setup("validate")
    assert next(iter(dm.val_dataloader()))[0].shape[-2:] == (384, 384)
    # Explicit preprocessing wins; an explicit size must be the model's.
    explicit = ImageFolderDataModule(root, mean=(0.1, 0.2, 0.3), crop_pct=0.5)
    explicit.follow(module)
    assert (explicit.mean, explicit.std, explicit.crop_pct) == ((0.1, 0.2, 0.3), (0.5,) * 3, 0.5)
    with pytest.raises(ValueError, match=r"img_size=224 but the model expects 384x384 images"):
        ImageFolderDataModule(root, img_size=224).follow(module)
    with pytest.raises(ValueError, match="makes 3-channel images but the model expects 1"):
        ImageFolderDataModule(root).follow(create_teacher("vit_digits"))


def test_digits_and_synthetic_data_follow_the_model() -> None:
    model = create_teacher("vit_tiny_patch16_224", img_size=48, patch_size=4, in_chans=1, num_classes=10, **SMALL)
    digits = ClutteredDigitsDataModule(digit_scale=1, num_val=8, batch_size=4)
    assert (digits.img_size, digits.patch_size) == (64, 8)  # without a model
    digits.follow(model)
    assert (digits.img_size, digits.patch_size, digits.num_patches) == (48, 4, 144)
    digits.setup("validate")
    x, _, mask = next(iter(digits.val_dataloader()))
    assert x.shape == (4, 1, 48, 48) and mask.shape == (4, 144)
    with pytest.raises(ValueError, match=r"patch_size=8 but the model's patches are 4x4"):
        ClutteredDigitsDataModule(patch_size=8, digit_scale=1).follow(model)
    synthetic = SyntheticDataModule(in_chans=1, train_size=8, batch_size=4)
    synthetic.follow(model)
    synthetic.setup("fit")
    assert next(iter(synthetic.train_dataloader()))[0].shape == (4, 1, 48, 48)
    with pytest.raises(ValueError, match=r"img_size=32 but the model expects 48x48"):
        SyntheticDataModule(img_size=32, in_chans=1).follow(model)


def test_a_datamodule_follows_the_trainers_model_in_setup(tmp_path) -> None:
    module = ClassifierModule(model_name="vit_tiny_patch16_224", num_classes=3, img_size=48, model_kwargs=SMALL)
    data = SyntheticDataModule(num_classes=3, train_size=8, val_size=4, batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, data)
    assert data.img_size == 48 and trainer.global_step == 1


def run_teacher_config(tmp_path: Path, *overrides: str) -> DynViTCLI:
    root = write_image_folder(tmp_path / "images", classes=("a", "b"), per_class=2, img_size=24)
    return DynViTCLI(
        args=[
            "fit",
            "--config",
            str(ROOT / "experiments/deit_s_teacher.yaml"),
            "--model.init_args.pretrained=false",
            f"--model.init_args.model_kwargs={yaml.safe_dump(SMALL, default_flow_style=True).strip()}",
            f"--data.init_args.root={root}",
            "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0",
            "--data.init_args.verify_images=false",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=1",
            "--trainer.precision=32",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.enable_progress_bar=false",
            "--throughput.enabled=false",
            "--wandb.enabled=false",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            *overrides,
        ]
    )


@pytest.mark.parametrize(("name", "size", "mean"), [("vit_small_patch16_384", 384, (0.5,) * 3)])
def test_changing_only_the_model_name_of_the_teacher_config_trains(tmp_path, name, size, mean) -> None:
    # The hparams of model and data are logged together (CSV): a backbone named twice would clash here.
    cli = run_teacher_config(tmp_path, f"--model.init_args.model_name={name}")
    assert cli.trainer.global_step == 1
    assert tuple(cli.model.net.patch_embed.img_size) == (size, size)
    assert (cli.datamodule.img_size, cli.datamodule.mean) == (size, mean)
    hparams = yaml.safe_load(next((tmp_path / "run/csv").rglob("hparams.yaml")).read_text())
    assert hparams["model_name"] == name and "img_size" in hparams


def test_a_data_size_that_contradicts_the_model_is_an_error_naming_both(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"img_size=256 but the model expects 224x224 images"):
        run_teacher_config(tmp_path, "--data.init_args.img_size=256")


def test_a_checkpoint_of_another_grid_loads_with_a_resampled_position_embedding(tmp_path) -> None:
    kwargs = dict(patch_size=8, num_classes=4, **SMALL)
    for name, prefix in (("deit_tiny_patch16_224", 1), ("vit_small_patch14_reg4_dinov2", 0)):  # dinov2: no_embed_class
        small = create_teacher(name, img_size=32, **kwargs)  # a 4x4 grid
        path = tmp_path / f"{name}.pth"
        torch.save({"model": small.state_dict()}, path)
        large = create_student(name, pruning_loc=LOC, img_size=48, **kwargs)  # 6x6
        with pytest.warns(UserWarning, match="4x4 position embedding, the model a 6x6 patch grid: resampled"):
            report = load_checkpoint(large, path)
        assert report.resampled == ["pos_embed"]
        expected = resample_abs_pos_embed(small.pos_embed.detach(), (6, 6), (4, 4), num_prefix_tokens=prefix)
        torch.testing.assert_close(large.pos_embed.detach(), expected)
        torch.testing.assert_close(large.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
