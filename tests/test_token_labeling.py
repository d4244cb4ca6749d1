"""Token labeling: MixToken bookkeeping, the loss, the annotators and the score-map files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynvit import create_teacher
from dynvit.objectives.token_labeling import (
    TeacherAnnotator,
    TokenBox,
    load_token_labels,
    mix_class_targets,
    mix_tokens,
    resize_token_labels,
    sample_token_box,
    token_labeling_loss,
)

TINY_LV = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
BOX = TokenBox(top=1, left=2, height=3, width=2, grid_size=(4, 5))


def test_token_box_area_mask_and_bounds() -> None:
    assert BOX.area == pytest.approx(6 / 20)
    grid = BOX.mask().view(4, 5)
    assert grid.sum() == 6 and grid[1:4, 2:4].all()
    with pytest.raises(ValueError, match="does not fit"):
        TokenBox(top=2, left=0, height=3, width=1, grid_size=(4, 5))


def test_sampled_boxes_fit_and_cover_at_most_one_minus_lam() -> None:
    np.random.seed(0)
    for lam in np.linspace(0.0, 1.0, 21):
        box = sample_token_box((14, 14), lam=float(lam))  # TokenBox itself rejects boxes outside the grid
        assert 0.0 <= box.area <= 1.0 - lam + 1e-9
    assert sample_token_box((14, 14), lam=1.0).area == 0.0
    areas = [sample_token_box((14, 14), alpha=1.0).area for _ in range(200)]
    assert 0.0 < np.mean(areas) < 0.5  # lam ~ U(0, 1), shrunk further by integer sizes and clipping
    with pytest.raises(ValueError, match="alpha"):
        sample_token_box((14, 14), alpha=0.0)


@pytest.mark.parametrize("shape", [(4, 20), (4, 20, 3), (5, 20, 2, 2)])
def test_mix_tokens_swaps_the_box_between_paired_images_and_is_its_own_inverse(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    mixed = mix_tokens(x, BOX)
    inside = BOX.mask()
    B = shape[0]
    for i in range(B):
        torch.testing.assert_close(mixed[i, inside], x[B - 1 - i, inside])
        torch.testing.assert_close(mixed[i, ~inside], x[i, ~inside])
    torch.testing.assert_close(mix_tokens(mixed, BOX), x)


def test_token_labels_move_with_their_tokens() -> None:
    B, N = 4, 20
    # Each token carries its image index; each label names (image, token) uniquely.
    source = torch.arange(B, dtype=torch.float)[:, None, None].expand(B, N, 1)
    labels = F.one_hot(torch.arange(B * N).view(B, N), B * N).float()
    moved_from = mix_tokens(source, BOX)[..., 0].long()
    mixed_labels = mix_tokens(labels, BOX)
    for i in range(B):
        for n in range(N):
            torch.testing.assert_close(mixed_labels[i, n], labels[moved_from[i, n], n])


def test_mix_tokens_rejects_a_sequence_with_the_class_token() -> None:
    with pytest.raises(ValueError, match="class token"):
        mix_tokens(torch.randn(2, 21, 8), BOX)


def test_class_targets_are_weighted_by_box_area() -> None:
    targets = torch.tensor([0, 1, 2, 3])
    mixed = mix_class_targets(targets, BOX, num_classes=5)
    for i in range(4):
        assert mixed[i, i].item() == pytest.approx(1 - BOX.area)
        assert mixed[i, 3 - i].item() == pytest.approx(BOX.area)
    torch.testing.assert_close(mixed.sum(-1), torch.ones(4))
    soft = F.one_hot(targets, 5).float()
    torch.testing.assert_close(mix_class_targets(soft, BOX), mixed)
    with pytest.raises(ValueError, match="num_classes"):
        mix_class_targets(targets, BOX)


def test_loss_is_class_ce_plus_weighted_token_soft_ce() -> None:
    cls_logits, aux_logits = torch.randn(3, 7), torch.randn(3, 5, 7)
    labels = torch.tensor([1, 4, 6])
    token_targets = torch.randn(3, 5, 7).softmax(-1)
    out = token_labeling_loss(cls_logits, aux_logits, labels, token_targets, weight=0.25)
    expected_token = F.cross_entropy(aux_logits.reshape(15, 7), token_targets.reshape(15, 7))
    torch.testing.assert_close(out.token_loss, expected_token)
    torch.testing.assert_close(out.cls_loss, F.cross_entropy(cls_logits, labels))
    torch.testing.assert_close(out.loss, out.cls_loss + 0.25 * expected_token)
    soft = token_labeling_loss(cls_logits, aux_logits, F.one_hot(labels, 7).float(), token_targets, weight=0.25)
    torch.testing.assert_close(soft.loss, out.loss)
    with pytest.raises(ValueError, match="resize_token_labels"):
        token_labeling_loss(cls_logits, aux_logits, labels, token_targets[:, :4])


def test_token_labeling_loss_falls_on_a_fixed_batch() -> None:
    np.random.seed(0)
    annotator = TeacherAnnotator(create_teacher("lvvit_s", **TINY_LV), temperature=0.1)
    model = create_teacher("lvvit_s", **TINY_LV).train()
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    grid = model.patch_embed.grid_size
    token_targets = annotator(images, grid)
    box = sample_token_box(grid, lam=0.6)
    assert box.area > 0
    token_targets, targets = mix_tokens(token_targets, box), mix_class_targets(labels, box, 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        cls_logits, aux_logits = model(images, mix_box=box)
        out = token_labeling_loss(cls_logits, aux_logits, targets, token_targets)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out)
    assert losses[-1].loss < 0.85 * losses[0].loss
    assert losses[-1].token_loss < 0.95 * losses[0].token_loss


def test_teacher_annotator_labels_with_dense_predictions_and_stays_frozen() -> None:
    teacher = create_teacher("lvvit_s", **TINY_LV)
    annotator = TeacherAnnotator(teacher, temperature=2.0).train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    images = torch.randn(2, 3, 32, 32)
    labels = annotator(images)
    torch.testing.assert_close(labels, (teacher.forward_dense(images)[1] / 2.0).softmax(-1))
    coarse = annotator(images, grid_size=(4, 4))
    assert coarse.shape == (2, 16, 10)
    torch.testing.assert_close(coarse.sum(-1), torch.ones(2, 16))


def test_teacher_annotator_applies_a_plain_vit_classifier_to_every_patch() -> None:
    vit = create_teacher("deit_tiny_patch16_224", **TINY_LV)
    images = torch.randn(2, 3, 32, 32)
    expected = vit.eval().head(vit.forward_features(images)[:, 1:]).softmax(-1)
    torch.testing.assert_close(TeacherAnnotator(vit)(images), expected)


def test_resize_token_labels_checks_the_source_grid() -> None:
    with pytest.raises(ValueError, match="tokens"):
        resize_token_labels(torch.rand(1, 15, 3), (4, 4), (2, 2))


def _write_score_map(path, num_classes: int = 10) -> None:
    """A 4×4 map in the released layout (2, k, h, w) float16: class 3 on the left half, class 7 on the right."""
    top1 = torch.full((4, 4), 7.0)
    top1[:, :2] = 3.0
    others = torch.stack([(top1 + d) % num_classes for d in (1, 2)])
    indices = torch.cat([top1[None], others])
    scores = torch.tensor([12.0, 1.0, 0.5])[:, None, None].expand(3, 4, 4)
    torch.save(torch.stack([scores, indices]).half(), path)


def test_score_map_labels_follow_the_crop_and_the_flip(tmp_path) -> None:
    path = tmp_path / "n01440764_10026.pt"
    _write_score_map(path)
    whole = load_token_labels(path, num_classes=10, grid_size=(2, 2))
    assert whole.shape == (4, 10)
    torch.testing.assert_close(whole.sum(-1), torch.ones(4))
    assert whole.argmax(-1).tolist() == [3, 7, 3, 7]  # row-major 2×2 grid
    flipped = load_token_labels(path, num_classes=10, grid_size=(2, 2), flip=True)
    assert flipped.argmax(-1).tolist() == [7, 3, 7, 3]
    left_half = load_token_labels(path, num_classes=10, grid_size=(2, 2), crop=(0.0, 0.0, 1.0, 0.5))
    assert left_half.argmax(-1).tolist() == [3, 3, 3, 3]
    assert left_half[0, 3].item() == pytest.approx(torch.tensor([12.0, 1.0, 0.5]).softmax(0)[0].item(), rel=1e-3)


def test_score_map_errors_name_the_problem(tmp_path) -> None:
    path = tmp_path / "bad.pt"
    torch.save(torch.zeros(3, 5, 4, 4), path)
    with pytest.raises(ValueError, match="not a score map"):
        load_token_labels(path, 10, (2, 2))
    _write_score_map(path)
    with pytest.raises(ValueError, match="num_classes"):
        load_token_labels(path, 5, (2, 2))
    with pytest.raises(ValueError, match="crop"):
        load_token_labels(path, 10, (2, 2), crop=(0.5, 0.0, 0.8, 1.0))
