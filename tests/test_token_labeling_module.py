"""TokenLabelingModule: the training step, the frozen annotator, MixToken, score maps; LV-ViT configs and pruning."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dynvit.data import ImageFolderDataModule, SyntheticDataModule, write_image_folder
from dynvit.lightning import DynamicViTModule, TokenLabelingModule
from dynvit.lightning.token_labeling import ScoreMapDataset
from dynvit.models import CheckpointMismatch, LVViT, create_teacher, read_state_dict
from dynvit.objectives.token_labeling import (
    TokenBox,
    annotator_targets,
    blend_with_ground_truth,
    mix_class_targets,
    mix_tokens,
    sample_token_box,
    token_labeling_loss,
)
from dynvit.run.cli import DynViTCLI

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
TINY_KWARGS = {k: TINY[k] for k in ("patch_size", "embed_dim", "depth", "num_heads")}
# LV-ViT's 64-channel conv stem would cost more than the tiny transformer behind it.
LV_KWARGS = TINY_KWARGS | {"stem_chans": 16}
GRID = (8, 8)


@pytest.fixture(scope="module")
def annotator_ckpt(tmp_path_factory) -> str:
    """A tiny plain ViT annotator (its classifier labels each patch) in the DeiT release layout."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("annotator") / "annotator.pth"
    torch.save({"model": create_teacher("deit_tiny_patch16_224", **TINY).state_dict()}, path)
    return str(path)


def tiny_module(annotator_ckpt: str | None, **kwargs) -> TokenLabelingModule:
    args = dict(
        model_name="lvvit_s",
        num_classes=TINY["num_classes"],
        img_size=TINY["img_size"],
        model_kwargs=LV_KWARGS,
        annotator_name="deit_tiny_patch16_224",
        annotator_checkpoint=annotator_ckpt,
        annotator_kwargs=TINY_KWARGS,
        lr=5e-3,
        lr_base_batch_size=None,
        warmup_epochs=0,
    )
    return TokenLabelingModule(**(args | kwargs))


def tiny_data(**kwargs) -> SyntheticDataModule:
    args = dict(num_classes=TINY["num_classes"], img_size=TINY["img_size"], train_size=32, val_size=16, batch_size=16)
    return SyntheticDataModule(**(args | kwargs))


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    args = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**(args | kwargs))


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.terms: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        m = trainer.callback_metrics
        self.terms.append((float(m["train/cls"]), float(m["train/token"])))


def test_step_is_class_loss_plus_token_loss_on_mixed_tokens(annotator_ckpt):
    module = tiny_module(annotator_ckpt).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    np.random.seed(3)
    box = sample_token_box(GRID)
    assert 0 < box.area < 1
    # Official: targets of the *unmixed* images (the annotator's crop label as the class target), then
    # moved by the same box as the tokens; token weight 1.
    with torch.no_grad():
        labels = module.annotator(x, GRID)
        token_targets = mix_tokens(labels.tokens, box)
        targets = mix_class_targets(labels.cls, box)
        out = module.net(x, mix_box=box)
        expected = token_labeling_loss(out.logits, out.aux_logits, targets, token_targets, weight=1.0).loss
        np.random.seed(3)
        got = module.training_step((x, y), 0)
    torch.testing.assert_close(got, expected)
    # dynvit's earlier recipe, as options: the smoothed true label, top-k softmax targets, weight 0.5.
    module = tiny_module(
        annotator_ckpt, mixtoken=False, class_target="dynvit_label", token_targets="dynvit", token_weight=0.5
    ).train()
    with torch.no_grad():
        out = module.net(x)
        label = torch.nn.functional.one_hot(y, 10).float() * 0.9 + 0.01
        expected = token_labeling_loss(out.logits, out.aux_logits, label, module.annotator(x, GRID).tokens, 0.5).loss
        torch.testing.assert_close(module.training_step((x, y), 0), expected)
    # The official --ground-truth blend.
    module = tiny_module(annotator_ckpt, mixtoken=False, class_target="official_ground_truth").train()
    with torch.no_grad():
        out, labels = module.net(x), module.annotator(x, GRID)
        blended = blend_with_ground_truth(labels.cls, y, 0.1)
        expected = token_labeling_loss(out.logits, out.aux_logits, blended, labels.tokens).loss
        torch.testing.assert_close(module.training_step((x, y), 0), expected)
    with pytest.raises(ValueError, match="class_target"):
        tiny_module(annotator_ckpt, class_target="label")


def test_loss_and_both_terms_fall_over_a_few_steps(tmp_path, annotator_ckpt):
    recorder = LossRecorder()
    # A sharp annotator over all classes: near one-hot token labels leave the token term room to fall below
    # ln(10) (its top-5 alone would share the mass with five zero logits: a random net's logits are small).
    # The class term learns the true labels: a random annotator's label of a whole image is nearly flat.
    module = tiny_module(annotator_ckpt, annotator_temperature=0.05, annotator_topk=None, class_target="dynvit_label")
    trainer(tmp_path, max_steps=25, limit_val_batches=0, callbacks=[recorder]).fit(module, tiny_data(batch_size=32))
    first, last = slice(0, 5), slice(-5, None)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    assert mean(recorder.losses[last]) < 0.88 * mean(recorder.losses[first])
    cls, token = (list(t) for t in zip(*recorder.terms, strict=True))
    assert mean(cls[last]) < mean(cls[first]) - 0.15
    assert mean(token[last]) < mean(token[first]) - 0.1


def test_annotator_stays_frozen_and_out_of_optimiser_and_checkpoints(tmp_path, annotator_ckpt):
    module = tiny_module(annotator_ckpt)
    before = {k: v.clone() for k, v in module.annotator.state_dict().items()}
    t = trainer(tmp_path, max_steps=3, limit_val_batches=1, enable_checkpointing=True)
    t.fit(module, tiny_data())
    optimised = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.net.parameters()}
    assert module.annotator.teacher.training is False and module.net.training is True
    assert all(p.grad is None and not p.requires_grad for p in module.annotator.parameters())
    for k, v in module.annotator.state_dict().items():
        assert torch.equal(v, before[k]), k

    ckpt = next(tmp_path.rglob("*.ckpt"))
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert raw["state_dict"] and not any(k.startswith("annotator.") for k in raw["state_dict"])
    # The checkpoint is an LV-ViT teacher for pruning, and the module reloads with its annotator.
    teacher = create_teacher("lvvit_s", **TINY, stem_chans=16)
    teacher.load_state_dict(read_state_dict(ckpt))
    reloaded = TokenLabelingModule.load_from_checkpoint(ckpt)
    for k, v in module.net.state_dict().items():
        assert torch.equal(reloaded.net.state_dict()[k], v), k
    for k, v in reloaded.annotator.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("mixtoken", [True, False])
def test_mixtoken_is_applied_in_training_only(tmp_path, annotator_ckpt, mixtoken):
    module = tiny_module(annotator_ckpt, mixtoken=mixtoken)
    calls: list[tuple[bool, TokenBox | None]] = []
    module.net.register_forward_pre_hook(
        lambda net, args, kwargs: calls.append((net.training, kwargs.get("mix_box"))), with_kwargs=True
    )
    trainer(tmp_path, max_steps=2, limit_val_batches=1, num_sanity_val_steps=1).fit(module, tiny_data())
    train_boxes = [box for training, box in calls if training]
    eval_boxes = [box for training, box in calls if not training]
    assert len(train_boxes) == 2 and len(eval_boxes) >= 1
    assert all(box is None for box in eval_boxes)
    assert all(isinstance(box, TokenBox) if mixtoken else box is None for box in train_boxes)


def test_validation_scores_lvvit_eval_prediction(annotator_ckpt):
    module = tiny_module(annotator_ckpt).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        cls_logits, dense = module.net.forward_dense(x)
        torch.testing.assert_close(module(x), cls_logits + 0.5 * dense.amax(dim=1))


def test_backbone_without_dense_outputs_is_refused(annotator_ckpt):
    with pytest.raises(TypeError, match="lvvit"):
        tiny_module(annotator_ckpt, model_name="deit_tiny_patch16_224", model_kwargs=TINY_KWARGS)


@pytest.mark.parametrize(
    "problem, error, match",
    [
        ("missing", FileNotFoundError, "does not exist"),
        ("other_classes", CheckpointMismatch, "head"),
        ("other_arch", CheckpointMismatch, "blocks"),
        ("no_checkpoint", ValueError, "annotator_checkpoint"),
        ("two_annotators", ValueError, "exactly one annotator"),
        # A ConvNeXt has no patch tokens to label; its build used to fail on the tuple img_size.
        ("hierarchical", TypeError, "convnext_tiny is a ConvNeXt: use a ViT annotator"),
        ("model_kwargs_in_chans", ValueError, r"model_kwargs sets in_chans"),
    ],
)
def test_bad_annotator_fails_at_construction(tmp_path, problem, error, match):
    path = str(tmp_path / "a.pth")
    kwargs = {}
    if problem == "other_classes":
        torch.save({"model": create_teacher("deit_tiny_patch16_224", **(TINY | {"num_classes": 3})).state_dict()}, path)
    elif problem == "other_arch":
        torch.save({"model": create_teacher("deit_tiny_patch16_224", **(TINY | {"depth": 2})).state_dict()}, path)
    elif problem == "no_checkpoint":
        path = None
    elif problem == "two_annotators":
        kwargs = {"score_map_root": str(tmp_path)}
    elif problem == "model_kwargs_in_chans":
        kwargs = {"model_kwargs": {**LV_KWARGS, "in_chans": 3}}
    elif problem == "hierarchical":
        kwargs = {"annotator_name": "convnext_tiny", "annotator_kwargs": {}}
    with pytest.raises(error, match=match):
        tiny_module(path, **kwargs)


def test_fine_tuning_a_released_lvvit_on_other_classes_resets_both_heads(tmp_path, annotator_ckpt):
    source = create_teacher("lvvit_s", **(TINY | {"num_classes": 5}), stem_chans=16)
    path = tmp_path / "lvvit.pth"
    torch.save({"model": source.state_dict()}, path)
    module = tiny_module(annotator_ckpt, checkpoint=str(path), reset_head=True)
    assert module.net.aux_head.out_features == module.net.head.out_features == 10
    assert torch.equal(module.net.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    with pytest.raises(CheckpointMismatch, match="aux_head"):
        tiny_module(annotator_ckpt, checkpoint=str(path))


# -- score maps --------------------------------------------------------------------------------------


def write_score_maps(images: Path, maps: Path, split_column: int = 3) -> None:
    """A 2-class top-2 map (2, 2, 6, 6) per image: class 0 left of ``split_column``, class 1 right of it."""
    for image in (images / "train").rglob("*.png"):
        scores = torch.zeros(2, 2, 6, 6)
        scores[0, 0] = 10.0  # the top-1 logit: far above the top-2, so labels are nearly one-hot
        scores[1, 0, :, :split_column], scores[1, 0, :, split_column:] = 0, 1
        scores[1, 1, :, :split_column], scores[1, 1, :, split_column:] = 1, 0
        folder = maps / image.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(scores.half(), folder / f"{image.stem}.pt")


def test_score_map_labels_follow_the_eval_crop_and_the_flip(tmp_path):
    images = write_image_folder(tmp_path / "images", classes=("a", "b"), per_class=1, img_size=40)
    # A wide image: the centre crop keeps its middle, so the class boundary moves.
    Image.new("RGB", (80, 40)).save(images / "train/a/0.png")
    write_score_maps(images, tmp_path / "maps", split_column=3)
    folder = ImageFolderDataModule(images, img_size=32, crop_pct=1.0, verify_images=False, batch_size=2)
    folder.setup("fit")
    kwargs = dict(img_size=32, crop_pct=1.0, interpolation="bilinear", mean=folder.mean, std=folder.std)
    plain = ScoreMapDataset(folder.datasets["train"], tmp_path / "maps", 2, hflip=0.0, **kwargs)
    flipped = ScoreMapDataset(folder.datasets["train"], tmp_path / "maps", 2, hflip=1.0, **kwargs)
    index = [p for p, _ in plain.samples].index(str(images / "train/a/0.png"))
    image, label, score_map, geometry = plain[index]
    assert image.shape == (3, 32, 32) and label == 0 and score_map.dtype == torch.float16
    assert score_map.shape == (2, 2, 6, 6) and geometry.tolist() == [0.0, 0.25, 1.0, 0.5, 0.0]  # the middle half

    def tokens(score_map: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        scores, indices = score_map[None, 0].float(), score_map[None, 1].long()
        return annotator_targets(scores, indices, 2, (4, 4), geometry[None, :4], geometry[None, 4] > 0.5).tokens[0]

    # The crop is the middle half of the width: the map's boundary (half-way) falls between token columns 1 and 2.
    labels = tokens(score_map, geometry)
    assert torch.equal(labels.view(4, 4, 2).argmax(-1), torch.tensor([[0, 0, 1, 1]] * 4))
    image_f, _, map_f, geometry_f = flipped[index]
    torch.testing.assert_close(image_f, image.flip(-1))
    assert torch.equal(map_f, score_map) and geometry_f[4] == 1.0
    torch.testing.assert_close(tokens(map_f, geometry_f).view(4, 4, 2), labels.view(4, 4, 2).flip(1))


def test_score_maps_train_the_module_end_to_end(tmp_path):
    images = write_image_folder(tmp_path / "images", classes=("a", "b"), per_class=4, img_size=40)
    write_score_maps(images, tmp_path / "maps")
    data = ImageFolderDataModule(images, img_size=32, batch_size=4, num_workers=0, verify_images=False)
    module = TokenLabelingModule(
        model_name="lvvit_s",
        num_classes=2,
        img_size=32,
        model_kwargs=LV_KWARGS,
        score_map_root=str(tmp_path / "maps"),
        lr_base_batch_size=None,
        warmup_epochs=0,
    )
    assert module.annotator is None
    recorder = LossRecorder()
    with pytest.warns(UserWarning, match="centre crop"):
        trainer(tmp_path, max_steps=2, limit_val_batches=1, callbacks=[recorder]).fit(module, data)
    assert isinstance(data.datasets["train"], ScoreMapDataset)
    assert len(recorder.terms) == 2 and all(0 < token < 10 for _, token in recorder.terms)


def test_score_maps_need_an_image_folder_and_existing_maps(tmp_path):
    images = write_image_folder(tmp_path / "images", classes=("a", "b"), per_class=2, img_size=32)
    (tmp_path / "empty").mkdir()
    module = TokenLabelingModule(
        model_name="lvvit_s", num_classes=2, img_size=32, model_kwargs=LV_KWARGS, score_map_root=str(tmp_path)
    )
    with pytest.raises(TypeError, match="ImageFolderDataModule"):
        trainer(tmp_path, max_steps=1).fit(module, tiny_data(num_classes=2))
    module = TokenLabelingModule(
        model_name="lvvit_s",
        num_classes=2,
        img_size=32,
        model_kwargs=LV_KWARGS,
        score_map_root=str(tmp_path / "empty"),
    )
    with pytest.raises(FileNotFoundError, match="no score map"):
        trainer(tmp_path, max_steps=1).fit(
            module, ImageFolderDataModule(images, img_size=32, batch_size=4, num_workers=0)
        )
    with pytest.raises(FileNotFoundError, match="score_map_root"):
        TokenLabelingModule(model_name="lvvit_s", score_map_root=str(tmp_path / "nowhere"))


# -- the DynamicViT-LV-ViT student and the configs -------------------------------------------------


def test_dynamic_lvvit_student_trains_two_steps_with_dense_kl(tmp_path):
    torch.manual_seed(2)
    path = tmp_path / "lvvit.pth"
    torch.save({"model": create_teacher("lvvit_s", **TINY, stem_chans=16).state_dict()}, path)
    module = DynamicViTModule(
        model_name="lvvit_s",
        num_classes=10,
        img_size=32,
        pruning_loc=(1, 2, 3),
        model_kwargs=LV_KWARGS,
        teacher_checkpoint=str(path),
        lr_base_batch_size=None,
        warmup_epochs=0,
    )
    assert isinstance(module.teacher, LVViT) and module.net.token_distill == "kl"
    before = module.net.score_predictor[0].in_conv[1].weight.clone()
    t = trainer(tmp_path, max_steps=2, limit_val_batches=1)
    t.fit(module, tiny_data())
    metrics = t.callback_metrics
    # Token distillation is a KL between class distributions over the kept tokens: finite, >= 0, > 0 once trained.
    assert 0 < float(metrics["train/token"]) < 10 and torch.isfinite(metrics["train/loss"])
    assert not torch.equal(module.net.score_predictor[0].in_conv[1].weight, before)
    assert 0.0 <= float(metrics["val/top1"]) <= 1.0


def print_config(config: str, capsys) -> dict:
    with pytest.raises(SystemExit) as done:
        DynViTCLI(args=["fit", "--config", str(ROOT / "experiments" / config), "--print_config"])
    assert done.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_of_the_lvvit_s_teacher_recipe(capsys):
    cfg = print_config("lvvit_s_teacher.yaml", capsys)
    model = cfg["model"]["init_args"]
    assert cfg["model"]["class_path"] == "dynvit.lightning.TokenLabelingModule"
    assert model["model_name"] == "lvvit_s" and model["token_weight"] == 1.0 and model["mixtoken"] is True
    # The official script's targets and class target.
    assert model["token_targets"] == "official" and model["class_target"] == "official"
    assert model["annotator_topk"] == 5 and model["label_smoothing"] == 0.1
    assert model["annotator_checkpoint"] and model["score_map_root"] is None
    assert cfg["data"]["class_path"] == "dynvit.data.ImageFolderDataModule"


def test_print_config_of_the_lvvit_s_prune_recipe(capsys):
    cfg = print_config("lvvit_s_prune.yaml", capsys)
    model = cfg["model"]["init_args"]
    assert cfg["model"]["class_path"] == "dynvit.lightning.DynamicViTModule"
    assert model["model_name"] == "lvvit_s" and model["keep_ratio"] == 0.7 and model["pruning_loc"] == [4, 8, 12]
    assert model["teacher_checkpoint"] and model["pretrained"] is False
    assert model["lr"] == 1e-3 and model["lr_base_batch_size"] == 1024 and model["backbone_lr_scale"] == 0.01
