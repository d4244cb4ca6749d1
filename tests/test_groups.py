"""Pictures of clusters and merges: every patch's group is the token it went to, taken from what the method's
registry entry says it reports (cluster assignments, merge sources), on tiny ViTs."""

from __future__ import annotations

import pytest
import torch

from dynvit import methods
from dynvit.measure.callbacks import picture_stages
from dynvit.measure.groups import groups_of_sources, token_groups
from dynvit.models.contract import BlockSourceReporting
from tests.test_methods_contract import N, built, images, teacher  # noqa: F401 (teacher is a fixture)

GROUPED = [name for name, m in methods.registered().items() if {"assignments", "sources"} & m.reports]


def token_of(stage: dict[str, torch.Tensor], b: int, t: int) -> int:
    """The output token input token t of image b went to in one clustering stage."""
    if "assignment" in stage:
        return int(stage["assignment"][b, t])
    return int(stage["weights"][b, :, t].argmax())


def holder(sources: torch.Tensor, b: int, p: int) -> int:
    """The token whose sources hold patch p of image b, or -1."""
    rows = [k for k in range(sources.shape[1]) if sources[b, k, p]]
    assert len(rows) <= 1
    return rows[0] if rows else -1


@pytest.mark.parametrize("name", GROUPED)
def test_each_patch_is_grouped_with_the_token_it_went_to(teacher, name):  # noqa: F811
    method = methods.get(name)
    model = built(teacher, name)
    x = images(2)
    groups = token_groups(model, x)
    assert groups and all(g.shape == (2, N) and g.dtype == torch.int64 for g in groups)
    if "assignments" in method.reports:
        _, stages = model.predict_with_assignments(x)
        assert len(groups) == len(stages)
        for s, column in enumerate(groups):
            for b in range(2):
                for p in range(N):
                    t = p
                    for stage in stages[: s + 1]:
                        t = token_of(stage, b, t)
                    assert column[b, p] == t, (s, b, p)
        return
    _, final = model.predict_with_sources(x)
    if isinstance(model, BlockSourceReporting):
        _, blocks = model.predict_with_block_sources(x)
        assert len(groups) <= 3 and torch.equal(blocks[-1], final)
    else:
        assert len(groups) == 1
    # The last column is the final tokens: each patch in the token whose sources hold it.
    expected = torch.tensor([[holder(final, b, p) for p in range(N)] for b in range(2)])
    assert torch.equal(groups[-1], expected)


def test_per_block_sources_show_the_last_block_and_evenly_spaced_earlier_ones(teacher):  # noqa: F811
    model = built(teacher, "tofu", r=2)  # 4 blocks, each merging (or pruning) 2 tokens
    assert isinstance(model, BlockSourceReporting)
    x = images(2)
    _, blocks = model.predict_with_block_sources(x)
    groups = token_groups(model, x)
    # Three columns of four merging blocks: blocks round(4/3) - 1 = 0, round(8/3) - 1 = 2 and 3.
    for column, block in zip(groups, (0, 2, 3), strict=True):
        expected = torch.tensor([[holder(blocks[block], b, p) for p in range(N)] for b in range(2)])
        assert torch.equal(column, expected)


def test_selection_methods_draw_masks_and_plain_models_are_refused(teacher):  # noqa: F811
    evit = built(teacher, "evit")
    stages, caption = picture_stages(evit, images(2))
    assert all(s.dtype == torch.bool for s in stages) and caption.startswith("input, then kept")
    assert token_groups(evit, images(2)) is None
    with pytest.raises(TypeError, match="nothing to draw"):
        picture_stages(teacher, images(2))


def test_sources_with_a_patch_in_two_tokens_are_refused():
    sources = torch.tensor([[[True, True], [True, False]]])
    with pytest.raises(ValueError, match="more than one token"):
        groups_of_sources(sources)
    assert groups_of_sources(torch.tensor([[[False, True], [False, False]]])).tolist() == [[-1, 0]]
