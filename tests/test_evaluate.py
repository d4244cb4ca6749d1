"""Scoring any registered model: purity of merged tokens, the images a limited loader leaves, and evaluate()."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dynvit import create_teacher
from dynvit.measure.evaluate import LimitedLoader, count_images, evaluate
from dynvit.measure.recall import source_purity
from dynvit.models.tokens import MergePlan, index_to_mask, merge_index, merge_sources
from dynvit.reducers import apply_reducer


def test_purity_counts_object_patches_in_object_majority_tokens():
    # 6 patches, the object is patches 0, 1, 2. Tokens: {0, 1} (all object), {2, 3, 4} (1 of 3 object), {5}.
    sources = torch.tensor([[[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]], dtype=torch.bool)
    target = torch.tensor([[1, 1, 1, 0, 0, 0]])
    # Object patches in object-majority tokens: 0 and 1 (patch 2 sits in a mostly-background token).
    assert source_purity(sources, target).tolist() == pytest.approx([2 / 3])
    # Half object is no majority: tokens {0, 3} and {1, 2, 4, 5} are both half object, so purity 0.
    tie = torch.tensor([[[1, 0, 0, 1, 0, 0], [0, 1, 1, 0, 1, 1]]], dtype=torch.bool)
    assert source_purity(tie, target).tolist() == [0.0]
    # An image without object is left out.
    assert source_purity(sources, torch.zeros(1, 6)).numel() == 0
    with pytest.raises(ValueError, match="patch grid"):
        source_purity(sources, torch.zeros(1, 5))


def test_merge_index_and_sources_follow_a_plan():
    # Tokens 0..5: A = (0, 2, 4), B = (1, 3, 5). A's 2 merges into B's 5 (dst index 2), A's 4 into B's 1.
    plan = MergePlan(unmerged=torch.tensor([[0]]), src=torch.tensor([[1, 2]]), dst=torch.tensor([[2, 0]]))
    index = torch.tensor([[10, 11, 12, 13, 14, 15]])
    # Survivors keep their own places: unmerged A first, then every B token.
    assert merge_index(plan, index).tolist() == [[10, 11, 13, 15]]
    sources = merge_sources(plan, torch.eye(6, dtype=torch.bool).unsqueeze(0))
    assert sources.int().tolist() == [[[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 1]]]
    assert index_to_mask(torch.tensor([[3, 0, 6]]), 6).tolist() == [[True, False, False, True, False, False]]


def loader(images: int, batch_size: int) -> DataLoader:
    data = TensorDataset(torch.randn(images, 3, 32, 32), torch.arange(images) % 5)
    return DataLoader(data, batch_size=batch_size)


@pytest.mark.parametrize(
    ("limit", "batches", "images"), [(None, 4, 10), (1.0, 4, 10), (2, 2, 6), (0.5, 2, 6), (0.3, 1, 3), (9, 4, 10)]
)
def test_a_limited_loader_keeps_the_batches_lightning_would(limit, batches, images):
    limited = LimitedLoader(loader(10, 3), limit)  # batches of 3, 3, 3, 1
    assert len(limited) == batches == len(list(limited)) == len(list(limited))  # the same batches every time
    assert count_images(limited) == images == sum(len(x) for x, _ in limited)


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        LimitedLoader(loader(4, 2), 1.5)
    with pytest.raises(ValueError, match="leaves none: use at least 0.5"):
        LimitedLoader(loader(4, 2), 0.1)
    with pytest.raises(TypeError, match="int, a float or None"):
        LimitedLoader(loader(4, 2), "all")


def test_evaluate_scores_what_a_model_reports():
    torch.manual_seed(0)
    vit = create_teacher(
        "deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=5
    ).eval()
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6) % 5
    target = torch.zeros(6, 16, dtype=torch.bool)
    target[:, :4] = True
    batches = [(x[:4], y[:4], target[:4]), (x[4:], y[4:], target[4:])]
    plain = evaluate(vit, batches)
    with torch.no_grad():
        assert plain.top1 == pytest.approx((vit(x).argmax(dim=1) == y).float().mean().item())
    assert plain.recall == [] and plain.purity is None and plain.images == 6
    tome = apply_reducer(copy.deepcopy(vit), "tome", r=3)
    scored = evaluate(tome, batches)
    _, masks = tome.predict_with_masks(x)
    _, sources = tome.predict_with_sources(x)
    want_recall = [((m & target).sum(1) / 4).mean().item() for m in masks]
    assert scored.recall == pytest.approx(want_recall) and len(scored.recall) == 4  # one stage per merging block
    assert scored.purity == pytest.approx(source_purity(sources, target).mean().item())
