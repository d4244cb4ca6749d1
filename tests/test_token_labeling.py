"""Token labeling: MixToken bookkeeping, the loss, the annotators and the score-map files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from dynvit import create_teacher
from dynvit.objectives.token_labeling import (
    TeacherAnnotator,
    TokenBox,
    annotator_targets,
    blend_with_ground_truth,
    load_token_labels,
    mix_class_targets,
    mix_tokens,
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


def official_rand_bbox(rows: int, cols: int, lam: float) -> tuple[int, int, int, int]:
    """LV-ViT's ``rand_bbox`` (tlt/models/lvvit.py), written out: (row0, col0, row1, col1) of the box."""
    cut = np.sqrt(1.0 - lam)
    cut_r, cut_c = int(rows * cut), int(cols * cut)
    cr, cc = np.random.randint(rows), np.random.randint(cols)
    r0, r1 = np.clip(cr - cut_r // 2, 0, rows), np.clip(cr + cut_r // 2, 0, rows)
    c0, c1 = np.clip(cc - cut_c // 2, 0, cols), np.clip(cc + cut_c // 2, 0, cols)
    return int(r0), int(c0), int(r1), int(c1)


@pytest.mark.parametrize("grid", [(14, 14), (7, 10)])
def test_mixtoken_box_is_the_official_one(grid: tuple[int, int]) -> None:
    rows, cols = grid
    np.random.seed(5)
    ours = [sample_token_box(grid) for _ in range(2000)]
    np.random.seed(5)
    official = []
    for _ in range(2000):
        lam = np.random.beta(1.0, 1.0)
        official.append(official_rand_bbox(rows, cols, lam))
    assert [(b.top, b.left, b.top + b.height, b.left + b.width) for b in ours] == official
    if grid == (14, 14):
        # Edges at centre ± cut // 2: mean area 0.27 (timm's upper edge centre + (cut + 1) // 2 gives 0.30).
        assert np.mean([b.area for b in ours]) == pytest.approx(0.2715, abs=0.01)


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
    # The official --dense-weight default: class and token terms count the same.
    default = token_labeling_loss(cls_logits, aux_logits, labels, token_targets)
    torch.testing.assert_close(default.loss, out.cls_loss + expected_token)
    with pytest.raises(ValueError, match="grid_size"):
        token_labeling_loss(cls_logits, aux_logits, labels, token_targets[:, :4])


def random_score_maps(B: int = 3, C: int = 20, k: int = 5, size: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(B, k, size, size, generator=g) * 3 + 4
    indices = torch.stack([torch.randperm(C, generator=g)[:k] for _ in range(B * size * size)])
    return scores, indices.view(B, size, size, k).permute(0, 3, 1, 2).contiguous()


def official_targets(scores, indices, C, grid, crops, smoothing):
    """The official script's targets (tlt/data/mixup.py, get_featuremaps + get_label), written out,
    with the RoI box in (x1, y1, x2, y2) = (left, top, right, bottom) order: (cls (B, C), tokens (B, N, C))."""
    B, _, h, w = scores.shape
    maps = torch.zeros(B, C, h, w).scatter_(1, indices, scores)  # top-k scores into zeros, no softmax
    top, left, height, width = crops.unbind(1)
    coords = torch.stack([left, top, left + width, top + height], 1)
    boxes = torch.cat([torch.arange(B).float()[:, None], coords * w - 0.5], 1)
    tokens = roi_align(maps, boxes, output_size=grid)  # aligned=False with the -0.5 shift, as there
    whole = roi_align(maps, boxes, output_size=(1, 1))
    both = torch.cat([whole.view(B, C, 1), tokens.view(B, C, -1)], dim=2).softmax(1)  # over all classes
    off = smoothing / C
    both = both * (1 - smoothing + off) + off
    return both[:, :, 0], both[:, :, 1:].transpose(1, 2)


def test_targets_are_the_official_formulas() -> None:
    scores, indices = random_score_maps()
    crops = torch.tensor([[0.1, 0.2, 0.6, 0.5], [0.0, 0.0, 1.0, 1.0], [0.3, 0.05, 0.4, 0.9]])
    got = annotator_targets(scores, indices, 20, (4, 6), crops=crops, smoothing=0.1)
    want_cls, want_tokens = official_targets(scores, indices, 20, (4, 6), crops, 0.1)
    torch.testing.assert_close(got.cls, want_cls)
    torch.testing.assert_close(got.tokens, want_tokens)
    assert got.tokens.shape == (3, 24, 20)
    torch.testing.assert_close(got.tokens.sum(-1), torch.full((3, 24), 1 + 0.1 / 20))  # as the script's
    # dynvit's variant: a softmax over the stored top-k first, averaged over the crop, no smoothing.
    ours = annotator_targets(scores, indices, 20, (4, 6), crops=crops, token_targets="dynvit")
    maps = torch.zeros(3, 20, 9, 9).scatter_(1, indices, scores.softmax(1))
    torch.testing.assert_close(
        ours.tokens[1], roi_align(maps[1:2], [torch.tensor([[0.0, 0, 9, 9]])], (4, 6), aligned=True)[0].flatten(1).T
    )
    torch.testing.assert_close(ours.tokens.sum(-1), torch.ones(3, 24))
    with pytest.raises(ValueError, match="token_targets"):
        annotator_targets(scores, indices, 20, (4, 6), token_targets="top5")


def test_ground_truth_blend_is_the_official_one() -> None:
    cls = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]])
    labels = torch.tensor([0, 0])
    # The script's one_hot(on_value=1 - eps + eps/C, off_value=eps/C).
    truth = torch.tensor([[1 - 0.1 + 0.1 / 3, 0.1 / 3, 0.1 / 3]] * 2)
    # ratio 0.9 - 0.4 * [argmax agree]: image 0 agrees (0.5), image 1 does not (0.9).
    want = torch.stack([cls[0] * 0.5 + truth[0] * 0.5, cls[1] * 0.9 + truth[1] * 0.1])
    torch.testing.assert_close(blend_with_ground_truth(cls, labels, 0.1), want)


def test_token_labeling_loss_falls_on_a_fixed_batch() -> None:
    np.random.seed(0)
    annotator = TeacherAnnotator(create_teacher("lvvit_s", **TINY_LV), temperature=0.1)
    model = create_teacher("lvvit_s", **TINY_LV).train()
    images = torch.randn(8, 3, 32, 32)
    grid = model.patch_embed.grid_size
    labels = annotator(images, grid)
    box = sample_token_box(grid, lam=0.6)
    assert box.area > 0
    token_targets, targets = mix_tokens(labels.tokens, box), mix_class_targets(labels.cls, box)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        cls_logits, aux_logits = model(images, mix_box=box)
        out = token_labeling_loss(cls_logits, aux_logits, targets, token_targets)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out)

    # Soft targets: the loss cannot fall below their entropy, so compare what lies above it.
    def entropy(t: torch.Tensor) -> torch.Tensor:
        return -(t * t.clamp_min(1e-12).log()).sum(-1).mean()

    floor_cls, floor_token = entropy(targets), entropy(token_targets)
    assert losses[-1].loss - floor_cls - floor_token < 0.7 * (losses[0].loss - floor_cls - floor_token)
    assert losses[-1].token_loss - floor_token < 0.8 * (losses[0].token_loss - floor_token)


def test_teacher_annotator_labels_with_its_top5_logits_and_stays_frozen() -> None:
    teacher = create_teacher("lvvit_s", **TINY_LV)
    annotator = TeacherAnnotator(teacher, temperature=2.0).train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    images = torch.randn(2, 3, 32, 32)
    labels = annotator(images)
    # On its own grid: the top-5 logits scattered into zeros, softmax over all classes, smoothing 0.1.
    logits = teacher.forward_dense(images)[1] / 2.0
    top = logits.topk(5, dim=-1)
    dense = torch.zeros_like(logits).scatter(-1, top.indices, top.values)
    torch.testing.assert_close(labels.tokens, dense.softmax(-1) * (0.9 + 0.01) + 0.01)
    torch.testing.assert_close(labels.cls, dense.mean(1).softmax(-1) * (0.9 + 0.01) + 0.01)
    coarse = annotator(images, grid_size=(4, 4))
    assert coarse.tokens.shape == (2, 16, 10)
    torch.testing.assert_close(coarse.tokens.sum(-1), torch.full((2, 16), 1.01))
    full = TeacherAnnotator(teacher, temperature=2.0, topk=None, token_targets="dynvit")(images)
    torch.testing.assert_close(full.tokens, logits.softmax(-1))  # dynvit's earlier labels


def test_teacher_annotator_applies_a_plain_vit_classifier_to_every_patch() -> None:
    vit = create_teacher("deit_tiny_patch16_224", **TINY_LV)
    images = torch.randn(2, 3, 32, 32)
    expected = vit.eval().head(vit.forward_features(images)[:, 1:]).softmax(-1)
    got = TeacherAnnotator(vit, topk=None, token_targets="dynvit")(images)
    torch.testing.assert_close(got.tokens, expected)


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
    assert whole.tokens.shape == (4, 10) and whole.cls.shape == (10,)
    assert whole.tokens.argmax(-1).tolist() == [3, 7, 3, 7]  # row-major 2×2 grid: columns are left-right
    flipped = load_token_labels(path, num_classes=10, grid_size=(2, 2), flip=True)
    assert flipped.tokens.argmax(-1).tolist() == [7, 3, 7, 3]
    left_half = load_token_labels(path, num_classes=10, grid_size=(2, 2), crop=(0.0, 0.0, 1.0, 0.5))
    assert left_half.tokens.argmax(-1).tolist() == [3, 3, 3, 3] and left_half.cls.argmax() == 3
    # Official: logits 12, 1, 0.5 among zeros for the 7 other classes, softmax over all 10, smoothing 0.1.
    p = torch.tensor([12.0, 1.0, 0.5] + [0.0] * 7).softmax(0)[0].item()
    assert left_half.tokens[0, 3].item() == pytest.approx(p * 0.91 + 0.01, rel=1e-4)
    ours = load_token_labels(path, 10, (2, 2), crop=(0.0, 0.0, 1.0, 0.5), token_targets="dynvit")
    assert ours.tokens[0, 3].item() == pytest.approx(torch.tensor([12.0, 1.0, 0.5]).softmax(0)[0].item(), rel=1e-3)


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
