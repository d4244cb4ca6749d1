"""The DynamicViT student: shapes, kept counts, gradients, the eval gather, masking edge cases, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynvit import create_student, create_teacher
from dynvit.models import KeepPredictor, MaskedAttention, masked_softmax
from tests.conftest import TINY, TINY_LOC

NAME = "deit_tiny_patch16_224"
N = (TINY["img_size"] // TINY["patch_size"]) ** 2


def student(keep_ratio: float = 0.7, **kwargs):
    return create_student(NAME, keep_ratio=keep_ratio, pruning_loc=TINY_LOC, **{**TINY, **kwargs})


def images(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, TINY["img_size"], TINY["img_size"])


def expected_counts(keep_ratio: float) -> list[int]:
    return [int(N * keep_ratio ** (s + 1)) for s in range(len(TINY_LOC))]


def force_decisions(model, keep: bool) -> None:
    """Make every predictor say keep (or drop) whatever the Gumbel noise: a huge bias on the last layer."""
    with torch.no_grad():
        for predictor in model.score_predictor:
            predictor.out_conv[4].bias.copy_(torch.tensor([1e4, -1e4] if keep else [-1e4, 1e4]))


# --- shapes and kept counts ------------------------------------------------------------------------


@pytest.mark.parametrize("keep_ratio", [1.0, 0.7, 0.5])
def test_eval_masks_keep_the_stage_counts(keep_ratio: float) -> None:
    model = student(keep_ratio).eval()
    x = images()
    logits, masks = model.predict_with_masks(x)
    assert model.stage_keep_counts == expected_counts(keep_ratio)
    assert logits.shape == (4, TINY["num_classes"])
    assert len(masks) == len(TINY_LOC)
    for mask, count in zip(masks, expected_counts(keep_ratio), strict=True):
        assert mask.shape == (4, N) and mask.dtype == torch.bool
        assert mask.sum(dim=1).tolist() == [count] * 4
    # A token dropped at one stage never comes back at a later one.
    for earlier, later in zip(masks, masks[1:], strict=False):
        assert not (later & ~earlier).any()
    torch.testing.assert_close(model(x), logits)


def test_train_output_shapes() -> None:
    model = student().train()
    out = model(images(3))
    C = TINY["embed_dim"]
    assert out.logits.shape == (3, TINY["num_classes"])
    assert out.tokens.shape == (3, N, C)
    assert out.mask.shape == (3, N) and not out.mask.requires_grad
    assert len(out.decisions) == len(TINY_LOC)
    for d in out.decisions:
        assert d.shape == (3, N) and d.requires_grad
        assert set(d.unique().tolist()) <= {0.0, 1.0}
    for earlier, later in zip(out.decisions, out.decisions[1:], strict=False):
        assert (later <= earlier).all()
    torch.testing.assert_close(out.mask, out.decisions[-1].detach())


def test_setting_keep_ratio_changes_counts_with_the_same_weights() -> None:
    model = student(0.7).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x = images()
    logits_07, masks_07 = model.predict_with_masks(x)
    model.keep_ratio = 0.5
    logits_05, masks_05 = model.predict_with_masks(x)
    assert model.keep_ratio == 0.5
    assert model.stage_keep_ratios == pytest.approx([0.5, 0.25, 0.125])
    assert [m.sum(1)[0].item() for m in masks_07] == expected_counts(0.7)
    assert [m.sum(1)[0].item() for m in masks_05] == expected_counts(0.5)
    assert not torch.allclose(logits_07, logits_05)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


# --- gradients --------------------------------------------------------------------------------------


def test_every_predictor_parameter_gets_gradient_from_the_class_loss_alone() -> None:
    model = student().train()
    out = model(images(8))
    F.cross_entropy(out.logits, torch.randint(0, TINY["num_classes"], (8,))).backward()
    params = dict(model.score_predictor.named_parameters())
    assert len(params) == 10 * len(TINY_LOC)
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_masked_attention_passes_gradient_to_the_keep_mask() -> None:
    attn = MaskedAttention(dim=16, num_heads=2)
    x = torch.randn(2, 9, 16)
    keep = torch.cat([torch.ones(2, 1), torch.randint(0, 2, (2, 8)).float()], dim=1).requires_grad_()
    attn(x, keep=keep).square().sum().backward()
    # Every key's mask entry (kept or dropped) changes other queries' weights, so all get gradient.
    assert keep.grad is not None and (keep.grad[:, 1:] != 0).all()


# --- the eval gather and the masked softmax against explicit computations ---------------------------


@torch.no_grad()
def per_image_gather(model, x: torch.Tensor) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """The eval forward written out one image at a time: argsort the keep scores, index, run the blocks."""
    logits, kept = [], []
    for img in x:
        t = model.patch_embed(img[None])
        t = torch.cat([model.cls_token, t], dim=1) + model.pos_embed
        index = torch.arange(N)
        img_kept, stage = [], 0
        for i, block in enumerate(model.blocks):
            if stage < len(TINY_LOC) and i == TINY_LOC[stage]:
                patches = t[0, 1:]
                score = model.score_predictor[stage](patches[None], torch.ones(1, len(patches), 1))[0]
                score = score[:, 0] - score[:, 1]
                order = torch.argsort(score, descending=True)[: int(N * model.keep_ratio ** (stage + 1))]
                t = torch.cat([t[0, :1], patches[order]])[None]
                index = index[order]
                img_kept.append(index)
                stage += 1
            t = block(t)
        logits.append(model.head(model.norm(t)[0, 0]))
        kept.append(img_kept)
    return torch.stack(logits), kept


def test_eval_equals_an_explicit_per_image_gather() -> None:
    model = student(0.7).eval()
    x = images(5)
    expected, kept = per_image_gather(model, x)
    logits, masks = model.predict_with_masks(x)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    for b, img_kept in enumerate(kept):
        for s, index in enumerate(img_kept):
            assert set(masks[s][b].nonzero().flatten().tolist()) == set(index.tolist())


def test_eval_ranks_a_saturated_predictor_by_its_keep_odds() -> None:
    # A predictor trained to keep (nearly) everything: keep odds of e^40 and more, so log p(keep)
    # is exactly 0.0 in float32 for every token. The order must still follow the odds.
    model = student(0.5).eval()
    predictor = model.score_predictor[0]
    with torch.no_grad():
        predictor.out_conv[4].bias.copy_(torch.tensor([40.0, 0.0]))
    x = images(3)
    patches = model.blocks[: TINY_LOC[0]](model.embed(x))[:, 1:]
    scores = predictor(patches, patches.new_ones(3, N, 1))
    assert (scores[..., 0] == 0).all()  # the released code's ranking key ties everywhere
    odds = scores[..., 0] - scores[..., 1]
    _, masks = model.predict_with_masks(x)
    # The largest odds; odds near 40 are float32 values 3.8e-6 apart, so some are equal: the first in index order.
    expected = torch.argsort(odds, dim=1, descending=True, stable=True)[:, : model.stage_keep_counts[0]]
    for b in range(3):
        assert set(masks[0][b].nonzero().flatten().tolist()) == set(expected[b].tolist())
        # ...and it is not the first tokens of the grid, which a tie-broken top-k would return.
        assert set(expected[b].tolist()) != set(range(model.stage_keep_counts[0]))


def test_keep_log_odds_are_forwards_score_difference_bit_for_bit() -> None:
    """The inference scores equal the difference of the module's two log-probabilities exactly (prefix rows
    skipped), so the inference ranking is the training scores' ranking."""
    torch.manual_seed(0)
    predictor = KeepPredictor(64).eval()
    for p in predictor.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(3, 1 + N, 64)
    with torch.no_grad():
        scores = predictor(x[:, 1:])
        odds = predictor.keep_log_odds(x[:, 1:])
        with_prefix = predictor.keep_log_odds(x, num_prefix=1)
    assert torch.equal(odds, scores[..., 0] - scores[..., 1])
    torch.testing.assert_close(with_prefix, odds, rtol=0, atol=1e-5)


@pytest.mark.parametrize("keep", [[1, 0, 1, 1, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0]])
def test_masked_softmax_equals_softmax_over_allowed_keys(keep: list[int]) -> None:
    scores = torch.randn(3, 2, 7, 7)
    keep = torch.tensor(keep).float().expand(3, -1)
    allowed = keep.bool()[:, None, None, :] | torch.eye(7, dtype=torch.bool)
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    # Equal up to the eps smoothing, which is small while the kept keys are not all far below the row max.
    torch.testing.assert_close(masked_softmax(scores, keep), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(masked_softmax(scores, torch.ones(3, 7)), scores.softmax(-1), rtol=0, atol=1e-6)


def test_student_at_keep_ratio_one_matches_its_teacher() -> None:
    teacher = create_teacher(NAME, **TINY).eval()
    model = student(1.0)
    model.load_state_dict(teacher.state_dict(), strict=False)
    x = images()
    with torch.no_grad():
        expected = teacher(x)
        torch.testing.assert_close(model.eval()(x), expected, rtol=1e-4, atol=1e-5)
        # Training with every token kept: the masked attention is then plain attention.
        force_decisions(model, keep=True)
        torch.testing.assert_close(model.train()(x).logits, expected, rtol=1e-4, atol=1e-5)


# --- a mask that drops every patch token --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_attention_with_every_patch_dropped_is_finite(dtype: torch.dtype) -> None:
    keep = torch.zeros(2, 9, dtype=dtype)
    keep[:, 0] = 1  # only the class token is kept
    scores = (torch.randn(2, 2, 9, 9) * 30).to(dtype)
    p = masked_softmax(scores, keep)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 9), rtol=0, atol=1e-5)

    attn = MaskedAttention(dim=16, num_heads=2).to(dtype)
    x = torch.randn(2, 9, 16, dtype=dtype, requires_grad=True)
    out = attn(x, keep=keep)
    out.float().sum().backward()
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_student_that_drops_every_patch_is_finite(dtype: torch.dtype) -> None:
    model = student().to(dtype).train()
    force_decisions(model, keep=False)
    out = model(images(2).to(dtype))
    assert all((d == 0).all() for d in out.decisions)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.tokens).all()
    F.cross_entropy(out.logits.float(), torch.tensor([1, 2])).backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_predictor_context_of_an_all_dropped_stage_is_finite() -> None:
    predictor = KeepPredictor(16)
    scores = predictor(torch.randn(2, 5, 16), torch.zeros(2, 5, 1))
    assert scores.shape == (2, 5, 2) and torch.isfinite(scores).all()


@pytest.mark.parametrize("keep_ratio", [0.7, 0.5])
def test_predictors_started_at_target_sample_the_target_keep_rates(keep_ratio: float) -> None:
    torch.manual_seed(0)
    model = student(keep_ratio).train()
    x = images(64)
    with torch.no_grad():
        even = [d.mean().item() for d in model(x).decisions]
        model.start_predictors_at_target()
        started = [d.mean().item() for d in model(x).decisions]
    # The reference's zero init keeps half of what is left at every stage; the target start keeps ρ of it.
    assert even == pytest.approx([0.5 ** (s + 1) for s in range(len(TINY_LOC))], abs=0.04)
    assert started == pytest.approx(model.stage_keep_ratios, abs=0.04)


@pytest.mark.parametrize("keep_prob", [0.0, 1.2, float("nan")])
def test_predictor_start_outside_unit_interval_raises(keep_prob: float) -> None:
    with pytest.raises(ValueError, match=r"keep_prob must be in \(0, 1\]"):
        KeepPredictor(16).start_at(keep_prob)


def test_predictor_started_to_keep_everything_is_finite() -> None:
    predictor = KeepPredictor(16)
    predictor.start_at(1.0)
    scores = predictor(torch.randn(2, 5, 16), torch.ones(2, 5, 1))
    assert torch.isfinite(scores).all() and (scores[..., 0] > scores[..., 1] + 10).all()


# --- bad input: each raises early with a message naming the fix ----------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(keep_ratio=0.0), ValueError, r"keep_ratio must be in \(0, 1\]"),
        (dict(keep_ratio=1.5), ValueError, r"keep_ratio must be in \(0, 1\]"),
        (dict(keep_ratio=-0.3), ValueError, r"keep_ratio must be in \(0, 1\]"),
        (dict(pruning_loc=(2, 1, 3)), ValueError, "strictly increasing"),
        (dict(pruning_loc=(1, 1, 3)), ValueError, "strictly increasing"),
        (dict(pruning_loc=(1, 2, 4)), ValueError, r"blocks 0\.\.3 of this 4-block model"),
        (dict(pruning_loc=()), ValueError, r"give at least one block index"),
        (dict(keep_ratio=0.01), ValueError, "keeps 0 of 64 patch tokens at stage 3: raise keep_ratio"),
        (dict(keep_ratio=0.2), ValueError, "keeps 0 of 64 patch tokens at stage 3: raise keep_ratio"),
        (dict(img_size=30), ValueError, r"not a multiple of .*patch size \(4, 4\): use e\.g\. 28"),
    ],
)
def test_bad_student_setup_raises(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        create_student(NAME, **{"pruning_loc": TINY_LOC, **TINY, **kwargs})


@pytest.mark.parametrize("value", [0.0, 1.01, -1.0, float("nan"), 0.05])
def test_setting_a_bad_keep_ratio_raises_and_keeps_the_old_one(value: float) -> None:
    model = student(0.7)
    with pytest.raises(ValueError, match="keep_ratio"):
        model.keep_ratio = value
    assert model.keep_ratio == 0.7


def test_input_of_another_size_raises() -> None:
    model = student()
    for mode in (model.train, model.eval):
        mode()
        with pytest.raises(ValueError, match=r"expects \(B, 3, 32, 32\) images; resize"):
            model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="resize"):
        model.predict_with_masks(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match=r"expects \(B, 3, 32, 32\) images"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expects \(B, 3, 32, 32\)"):
        model(torch.randn(3, 32, 32))


def test_teacher_image_size_not_a_multiple_of_the_patch_raises() -> None:
    with pytest.raises(ValueError, match=r"not a multiple of .*patch size \(4, 4\): use e\.g\. 32"):
        create_teacher(NAME, **{**TINY, "img_size": 34})


def test_unknown_model_name_suggests_close_ones() -> None:
    with pytest.raises(
        ValueError, match="unknown model name 'deit_tiny_patch16_22'; did you mean deit_tiny_patch16_224"
    ):
        create_student("deit_tiny_patch16_22", **TINY)
    with pytest.raises(ValueError, match="unknown model name"):
        create_teacher("no_such_vit", **TINY)


@pytest.mark.parametrize("factory", [create_student, create_teacher])
def test_model_that_is_not_a_vit_raises(factory) -> None:
    with pytest.raises(TypeError, match="not a vision transformer.*pick a ViT such as deit_small_patch16_224"):
        factory("resnet18", num_classes=10)
