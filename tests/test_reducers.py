"""Token reducers (ToMe, EViT, top-k, ATS, random keep) on tiny ViTs: counts, maths, errors, FLOPs, matching."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from dynvit import count_flops, create_student, create_teacher, methods
from dynvit.measure.flops import count_module_flops
from dynvit.models import keep_counts
from dynvit.models.tokens import bipartite_soft_matching, gather_tokens, merge_sum, merge_weighted
from dynvit.reducers import TokenCost, apply_reducer, create_reduced, matching, realised_gflops
from dynvit.reducers.ats import inverse_transform_sample, significance
from dynvit.reducers.base import AttentionStats
from dynvit.reducers.evit import attentive_count
from dynvit.reducers.matching import match_gflops, nearest
from tests.conftest import REDUCED_NAME, TINY, TINY_LOC, N, record_counts

NAME = REDUCED_NAME
LOC = TINY_LOC


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32)


def reduced(base: nn.Module, method: str, **params) -> nn.Module:
    return apply_reducer(copy.deepcopy(base), method, **params).eval()


def expected_counts(method: str) -> list[tuple[int, int]]:
    """Per-block (attention, MLP) token counts, class token included, from each method's stated rule."""
    if method == "tome":  # r=5 merged in every block
        return [(65 - 5 * i, 60 - 5 * i) for i in range(4)]
    if method == "random":  # int(N * 0.5**s) before blocks 1, 2, 3
        return [(65, 65)] + [(1 + int(N * 0.5**s), 1 + int(N * 0.5**s)) for s in (1, 2, 3)]
    counts, n = [(65, 65)], N  # evit/topk at 0.5 in blocks 1, 2, 3: ceil(0.5 n) kept (+1 fused)
    for _ in LOC:
        attn = n + 1
        n = math.ceil(0.5 * n) + (method == "evit")
        counts.append((attn, n + 1))
    return counts


PARAMS = {
    "tome": dict(r=5),
    "evit": dict(keep_rate=0.5, pruning_loc=LOC),
    "topk": dict(keep_rate=0.5, pruning_loc=LOC),
    "random": dict(keep_ratio=0.5, pruning_loc=LOC),
}


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_token_counts_per_block(base, images, method):
    model = reduced(base, method, **PARAMS[method])
    want = expected_counts(method)
    assert record_counts(model, images) == want
    assert model.token_schedule() == want
    logits, counts = model.predict_with_counts(images)
    assert logits.shape == (4, 10)
    assert counts.tolist() == [[list(c) for c in want]] * 4


def test_tome_sizes_sum_to_token_count_and_class_token_is_never_merged(base, images):
    model = reduced(base, "tome", r=5)
    steps = model.sizes_per_block(images)
    for tokens, size in steps:
        assert tokens.shape[:2] == size.shape[:2]
        torch.testing.assert_close(size.sum(dim=(1, 2)), torch.full((4,), 65.0))
        assert torch.all(size[:, 0] == 1)
    # Block 0 attends over unmerged tokens, and the MLP is per token: the class token after it must
    # equal the plain block's, which only holds if it was not averaged into anything.
    with torch.no_grad():
        plain = base.blocks[0](base.norm_pre(base._pos_embed(base.patch_embed(images))))
    torch.testing.assert_close(steps[0][0][:, 0], plain[:, 0], rtol=0, atol=1e-6)


def test_bipartite_matching_merges_the_most_similar_pair_by_size():
    # Tokens [cls, t1, t2, t3, t4]: A = (cls, t2, t4), B = (t1, t3); t2 and t3 are nearly parallel.
    metric = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0.1, 1], [0, 0, 1], [1, 1, 0]]])
    # cls is identical to nothing but closest to t1 (cos 0) — still protected.
    plan = bipartite_soft_matching(metric, r=1)
    x = torch.arange(5.0).repeat(2, 1).T.unsqueeze(0)  # token i has value i in both channels
    size = torch.tensor([[[1.0], [1], [2], [3], [1]]])
    merged, new_size = merge_weighted(plan, x, size)
    assert new_size.squeeze().tolist() == [1, 1, 1, 5]  # cls, t4 (unmerged A), t1, t3+t2 (B)
    assert merged[0, :, 0].tolist() == pytest.approx([0, 4, 1, (2 * 2 + 3 * 3) / 5])


def test_merge_sum_and_weighted_merge_equal_their_unfused_computation():
    # 8 of 9 A tokens merge into 8 B tokens, several into the same one: the order of the sums matters.
    torch.manual_seed(3)
    x = torch.randn(3, 17, 6)
    plan = bipartite_soft_matching(torch.randn(3, 17, 2), r=8)
    assert (plan.dst.sort(dim=1).values.diff(dim=1) == 0).any()  # some B token takes several
    a, b = x[:, ::2], x[:, 1::2]
    summed = b.scatter_add(1, plan.dst.unsqueeze(-1).expand(-1, -1, 6), gather_tokens(a, plan.src))
    assert torch.equal(merge_sum(plan, x), torch.cat([gather_tokens(a, plan.unmerged), summed], dim=1))
    # The size-weighted merge: bit for bit the cat of x·size and size, merged, then divided.
    size = torch.rand(3, 17, 1) * 4 + 1
    side_by_side = merge_sum(plan, torch.cat([x * size, size], dim=-1))
    merged, merged_size = merge_weighted(plan, x, size)
    assert torch.equal(merged_size, side_by_side[..., -1:])
    assert torch.equal(merged, side_by_side[..., :-1] / side_by_side[..., -1:])
    # Training takes the autograd path, to the same values, and its gradient reaches x.
    leaf = x.clone().requires_grad_()
    trained, _ = merge_weighted(plan, leaf, size)
    assert torch.equal(trained, merged)
    trained.sum().backward()
    # Token i enters its output token with weight size_i / (that token's size): each output token's weights
    # sum to 1, so per channel the gradient sums to the 17 - 8 output tokens.
    torch.testing.assert_close(leaf.grad.sum(dim=1), torch.full((3, 6), 9.0))
    # ...and every B token is its own value plus those of the A tokens merged into it.
    for i in range(3):
        for j in range(8):
            merged_in = a[i, plan.src[i][plan.dst[i] == j]]
            torch.testing.assert_close(merge_sum(plan, x)[i, 1 + j], b[i, j] + merged_in.sum(dim=0))


def test_tome_r_is_capped_where_half_the_tokens_remain(base):
    model = reduced(base, "tome", r=32)
    assert model.merges == [32, 16, 8, 4]  # 64 → 32 → 16 → 8 → 4 patch tokens


def cls_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class-token attention (mean over heads) of a plain timm block, written out by hand."""
    attn = block.attn
    B, n, C = x.shape
    q, k, _ = attn.qkv(block.norm1(x)).reshape(B, n, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    return ((q[:, :, :1] @ k.transpose(-2, -1)) * attn.scale).softmax(-1)[:, :, 0].mean(1)


@pytest.mark.parametrize("fusion", ["official", "dynvit_mean"])
def test_evit_fused_token_is_the_official_attention_weighted_sum(base, images, fusion):
    model = reduced(base, "evit", keep_rate=0.5, pruning_loc=(1,), fusion=fusion)
    captured = {}
    hook = model.blocks[1].norm2.register_forward_pre_hook(lambda _, args: captured.update(x=args[0]))
    with torch.no_grad():
        model(images)
    hook.remove()
    with torch.no_grad():
        x = base.blocks[0](base.norm_pre(base._pos_embed(base.patch_embed(images))))
        a = cls_attention(base.blocks[1], x)[:, 1:]
        x = x + base.blocks[1].attn(base.blocks[1].norm1(x))
    top = a.topk(32, dim=1).indices.sort(dim=1).values
    dropped = torch.ones_like(a, dtype=torch.bool).scatter(1, top, False)
    w = a * dropped
    # The official EViT: extra_token = sum over the dropped tokens of a_i x_i, raw head-mean attention.
    fused = (w.unsqueeze(-1) * x[:, 1:]).sum(1)
    if fusion == "dynvit_mean":  # dynvit's variant: the same weights renormalised over the dropped set
        fused = fused / w.sum(1, keepdim=True)
    got = captured["x"]
    assert got.shape == (4, 1 + 32 + 1, 32)
    torch.testing.assert_close(got[:, -1], fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[:, 1:-1], torch.gather(x[:, 1:], 1, top.unsqueeze(-1).expand(-1, -1, 32)))
    _, masks = model.predict_with_masks(images)
    assert torch.equal(masks[0], ~dropped)
    with pytest.raises(ValueError, match="fusion"):
        reduced(base, "evit", fusion="mean")


def test_evit_keeps_the_official_float_ceil():
    # The official count is math.ceil(keep_rate * (N - 1)) on the float product, noise included.
    assert 0.55 * 100 > 55 and attentive_count(0.55, 100) == math.ceil(0.55 * 100) == 56
    assert attentive_count(0.5, 64) == 32 and attentive_count(0.7, 196) == 138


NO_REDUCTION = {
    "tome": dict(r=0),
    "topk": dict(keep_rate=1.0, pruning_loc=LOC),
    "evit": dict(keep_rate=1.0, pruning_loc=LOC),
    "random": dict(keep_ratio=1.0, pruning_loc=LOC),
}


@pytest.mark.parametrize("method", sorted(NO_REDUCTION))
def test_no_reduction_reproduces_the_plain_model(base, images, method):
    with torch.no_grad():
        want = base(images)
        got = reduced(base, method, **NO_REDUCTION[method])(images)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_unfused_attention_path_gives_the_same_selection(base, images):
    fused = reduced(base, "evit", **PARAMS["evit"])
    unfused = reduced(base, "evit", **PARAMS["evit"])
    for block in unfused.blocks:
        block.attn.fused_attn = False  # the explicit softmax path, whose class row is read off the matrix
    (want, want_masks), (got, got_masks) = fused.predict_with_masks(images), unfused.predict_with_masks(images)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(got_masks, want_masks, strict=True))


@pytest.fixture(scope="module")
def peaky() -> nn.Module:
    """A tiny ViT with sharp attention (large qkv weights), so significance differs between tokens."""
    torch.manual_seed(1)
    model = create_teacher(NAME, **TINY).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.normal_(std=0.6)
    return model


def test_ats_kept_counts_vary_per_image_and_never_exceed_k(peaky):
    k = 24
    model = reduced(peaky, "ats", max_tokens=k, pruning_loc=LOC)
    x = torch.randn(8, 3, 32, 32)
    logits, masks = model.predict_with_masks(x)
    _, counts = model.predict_with_counts(x)
    kept = torch.stack([m.sum(1) for m in masks], dim=1)  # (B, stages)
    assert kept.max() <= k and kept.min() >= 1
    assert len(set(kept[:, 0].tolist())) > 1  # adaptive: not every image keeps the same number
    assert torch.equal(counts[:, 1:, 1] - 1, kept)  # MLP of block s sees the tokens kept at its stage
    for earlier, later in zip(masks, masks[1:], strict=False):
        assert not (later & ~earlier).any()  # a dropped patch never comes back
    # Padding is invisible: each image alone gives the same logits and masks as in the batch.
    for i in range(x.shape[0]):
        alone, alone_masks = model.predict_with_masks(x[i : i + 1])
        torch.testing.assert_close(alone[0], logits[i], rtol=1e-4, atol=1e-5)
        assert all(torch.equal(a[0], m[i]) for a, m in zip(alone_masks, masks, strict=True))


def test_ats_drop_tokens_reproduces_the_authors_batch_dependence(peaky):
    """With DROP_TOKENS true the authors' padding enters later CDFs: an image's samples depend on its batch."""
    x = torch.randn(8, 3, 32, 32)
    dropped = reduced(peaky, "ats", max_tokens=24, pruning_loc=LOC, drop_tokens=True)
    kept = reduced(peaky, "ats", max_tokens=24, pruning_loc=LOC)
    _, masks = dropped.predict_with_masks(x)
    alone = [dropped.predict_with_masks(x[i : i + 1])[1] for i in range(8)]
    assert all(torch.equal(alone[i][0][0], masks[0][i]) for i in range(8))  # no padding before stage 1
    assert any(not torch.equal(alone[i][s][0], masks[s][i]) for i in range(8) for s in (1, 2))
    # Alone (no padding), a later stage differs from the default only through the CDF's minimum.
    assert any(
        not torch.equal(a[s], b[s])
        for i in range(8)
        for a, b in [(alone[i], kept.predict_with_masks(x[i : i + 1])[1])]
        for s in (1, 2)
    )


def official_ats_pick(sig: torch.Tensor, k: int) -> torch.Tensor:
    """The ATS authors' sampling (adaptivetokensampling/ATS, ats_block.py), written out: which tokens stay."""
    sorted_scores, order = torch.sort(sig, dim=1)
    cdf = torch.cumsum(sorted_scores, dim=1)
    lo, hi = cdf.min(dim=1)[0].unsqueeze(1), cdf.max(dim=1)[0].unsqueeze(1)
    ncdf = (cdf - lo) / (hi - lo)
    ys = torch.linspace(0, 1.0, k).unsqueeze(0).repeat(sig.shape[0], 1)
    start = torch.min(ncdf + (ncdf == 0).float() * 1e8, dim=1)[0].unsqueeze(-1)
    steps = torch.arange(k, dtype=torch.float).unsqueeze(0)
    ys = start + ((ys * (k - 1)) - start * steps) / (k - 1)
    pick = torch.min(torch.abs(ys.unsqueeze(2) - ncdf.unsqueeze(1)), dim=2)[1]  # nearest, first on ties
    kept = torch.zeros_like(sig, dtype=torch.bool)
    for b in range(sig.shape[0]):
        kept[b, order[b, pick[b].unique()]] = True  # duplicates count once
    return kept


def test_ats_sampling_is_the_authors_inverse_transform():
    torch.manual_seed(0)
    sig = torch.rand(6, 40) ** 4
    sig = sig / sig.sum(1, keepdim=True)
    for k in (2, 7, 20, 40, 64):
        picked = inverse_transform_sample(sig, k)
        assert torch.equal(picked, official_ats_pick(sig, k)), k
        assert (picked.sum(1) <= min(k, 39)).all()
        assert not picked.gather(1, sig.argmin(1, keepdim=True)).any()  # the least significant never stays
    # A worked case: sorted CDF 0.1, 0.2, 0.3, 1 → normalised 0, 1/9, 2/9, 1; 4 points 1/9, 11/27, 19/27, 1
    # pick sorted positions 1, 2, 3, 3: three tokens, and the 0.7 one once.
    picked = inverse_transform_sample(torch.tensor([[0.7, 0.1, 0.1, 0.1]]), 4)
    assert picked.tolist() == [[True, False, True, True]]
    assert inverse_transform_sample(torch.tensor([[0.25, 0.25, 0.25, 0.25]]), 4).sum() == 3
    assert inverse_transform_sample(torch.tensor([[0.2, 0.5, 0.3]]), 1).tolist() == [[False, True, False]]


def test_ats_significance_uses_the_norm_of_the_whole_value_vector():
    torch.manual_seed(0)
    B, H, n, d = 2, 3, 6, 4
    values, attn = torch.randn(B, H, n, d), torch.rand(B, H, n).softmax(-1)
    # The authors: attention of the class token summed over heads, times the norm of v over all heads.
    whole = values.transpose(1, 2).reshape(B, n, H * d).norm(dim=-1)
    want = (attn.sum(1) * whole)[:, 1:]
    want = want / want.sum(1, keepdim=True)
    got = significance(AttentionStats(keys=values, values=values, cls_attn=attn))
    torch.testing.assert_close(got, want)
    per_head = (attn * values.norm(dim=-1)).sum(1)[:, 1:]  # the per-head variant gives other scores
    assert not torch.allclose(got, per_head / per_head.sum(1, keepdim=True), atol=1e-3)


@pytest.mark.parametrize("vit", ["base", "peaky"])
def test_ats_stages_keep_what_the_authors_formulas_pick(vit, request):
    """Two stages (blocks 1, 2), one image at a time: the authors' significance and sampling, written out.

    In their default (removed tokens stay as zero rows) the second stage samples from all N slots, the
    removed ones with score 0.
    """
    peaky = request.getfixturevalue(vit)  # flat or sharp significance: many or few tokens kept
    model = reduced(peaky, "ats", max_tokens=N, pruning_loc=(1, 2))
    x = torch.randn(3, 3, 32, 32)

    def scores(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        q, k, v = block.attn.qkv(block.norm1(tokens)).reshape(n, 3, 2, 16).permute(1, 2, 0, 3)
        a = ((q @ k.transpose(-2, -1)) * block.attn.scale).softmax(-1)[:, 0]  # (H, n): the class row
        return (a.sum(0) * v.transpose(0, 1).reshape(n, 32).norm(dim=-1))[1:]

    for i in range(3):
        _, masks = model.predict_with_masks(x[i : i + 1])
        with torch.no_grad():
            t = peaky.blocks[0](peaky.norm_pre(peaky._pos_embed(peaky.patch_embed(x[i : i + 1]))))[0]
            sig = scores(peaky.blocks[1], t)
            first = official_ats_pick((sig / sig.sum())[None], N)[0]
            b1 = peaky.blocks[1]
            t = t + b1.attn(b1.norm1(t)[None])[0]
            t = torch.cat([t[:1], t[1:][first]])  # class token, then the kept ones in patch order
            t = t + b1.mlp(b1.norm2(t))
            full = torch.zeros(N).masked_scatter(first, scores(peaky.blocks[2], t))
            second = official_ats_pick((full / full.sum())[None], N)[0]
        assert torch.equal(masks[0][0], first) and torch.equal(masks[1][0], second)
        assert first.sum() < N and not (second & ~first).any()  # even K = N drops tokens


def test_random_keep_counts_and_seeded_eval(base, images):
    model = reduced(base, "random", keep_ratio=0.6, pruning_loc=LOC, seed=3)
    logits, masks = model.predict_with_masks(images)
    assert [m.sum(1).tolist() for m in masks] == [[k] * 4 for k in keep_counts(N, 0.6, 3)]
    again, masks_again = model.predict_with_masks(images)
    assert torch.equal(logits, again) and all(torch.equal(a, b) for a, b in zip(masks, masks_again, strict=True))
    assert not torch.equal(masks[0][0], masks[0][1])  # each image draws its own subset
    other = reduced(base, "random", keep_ratio=0.6, pruning_loc=LOC, seed=4)
    assert not torch.equal(other.predict_with_masks(images)[1][0], masks[0])


@pytest.mark.parametrize(
    ("method", "params", "error"),
    [
        ("nope", {}, ValueError),
        ("tome", dict(r=-1), ValueError),
        ("tome", dict(r=33), ValueError),  # more than 64 // 2 in the first block
        ("tome", dict(r=[1, 2]), ValueError),
        ("evit", dict(keep_rate=0.0), ValueError),
        ("topk", dict(keep_rate=1.5), ValueError),
        ("evit", dict(pruning_loc=(1, 4)), ValueError),  # past the last of 4 blocks
        ("topk", dict(pruning_loc=(2, 1)), ValueError),
        ("ats", dict(max_tokens=0), ValueError),
        ("ats", dict(max_tokens=[4, 4], pruning_loc=LOC), ValueError),
        ("ats", dict(max_tokens=2.5), ValueError),
        ("random", dict(keep_ratio=0.05), ValueError),  # int(64 * 0.05**3) = 0 tokens
        ("random", dict(keep_ratio=0.7, pruning_loc=(5,)), ValueError),
        ("evit", dict(keep_ratio=0.7), TypeError),  # that is random's parameter name
    ],
)
def test_bad_parameters_raise_and_leave_the_model_usable(base, images, method, params, error):
    model = copy.deepcopy(base)
    with pytest.raises(error, match=r"\S"):
        apply_reducer(model, method, **params)
    with torch.no_grad():
        torch.testing.assert_close(model(images), base(images), rtol=0, atol=0)
    if method in methods.registered():
        assert type(model) is type(base)


def test_only_plain_vits_are_reducible_and_class_attention_needs_a_class_token():
    with pytest.raises(TypeError, match="VisionTransformer"):
        apply_reducer(nn.Linear(2, 2), "tome", r=1)
    with pytest.raises(TypeError, match="subclass DynamicViT"):
        apply_reducer(create_student(NAME, pruning_loc=LOC, **TINY), "tome", r=1)
    pooled = create_teacher(NAME, global_pool="avg", class_token=False, **TINY)
    with pytest.raises(TypeError, match="evit ranks tokens by the class token's attention"):
        apply_reducer(copy.deepcopy(pooled), "evit", keep_rate=0.5)
    apply_reducer(pooled, "tome", r=1)  # ToMe needs no class token


def test_reduced_models_train_like_classifiers(base, images):
    for method, params in [
        ("tome", dict(r=5)),
        ("evit", PARAMS["evit"]),
        ("ats", dict(max_tokens=20, pruning_loc=LOC)),
    ]:
        model = reduced(base, method, **params).train()
        logits = model(images)
        assert logits.shape == (4, 10)
        nn.functional.cross_entropy(logits, torch.arange(4)).backward()
        assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_create_reduced_routes_params_and_checkpoint(base, images, tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save({"model": base.state_dict()}, path)
    model = create_reduced(NAME, "evit", checkpoint=path, params=dict(keep_rate=0.5, pruning_loc=LOC), **TINY).eval()
    assert model.keep_rate == 0.5 and model.pruning_loc == LOC
    with torch.no_grad():
        torch.testing.assert_close(model(images), reduced(base, "evit", **PARAMS["evit"])(images))
    with pytest.raises(ValueError, match="unknown token-reduction method"):
        create_reduced(NAME, "tomee", **TINY)


def test_token_cost_matches_fvcore(base, peaky):
    cost = TokenCost.from_model(base)  # reducers change no block, so one fit serves them all
    assert cost(torch.tensor([[[N + 1, N + 1]] * 4])).item() == pytest.approx(count_flops(base), rel=1e-12)
    for method in ("random", "topk", "evit", "tome"):
        model = reduced(base, method, **PARAMS[method])
        counts = torch.tensor([model.token_schedule()])
        # The reducers' own small matrix products (class-attention row, ToMe's similarities) are extra.
        assert cost(counts).item() == pytest.approx(count_flops(model), rel=0.02)
    model = reduced(peaky, "ats", max_tokens=24, pruning_loc=LOC)
    x = torch.randn(2, 3, 32, 32)
    gflops, counts = realised_gflops(model, x, cost)
    assert gflops[0] != gflops[1]
    for i in range(2):
        assert gflops[i].item() == pytest.approx(count_module_flops(model, x[i : i + 1]) / 1e9, rel=0.02)


def test_nearest_bisects_to_the_brute_force_answer():
    values = [10, 9, 9, 9, 7, 6, 6, 3, 1]  # non-increasing, with runs of equal GFLOPs
    calls: list[int] = []

    def g(i: int) -> float:
        calls.append(i)
        return values[i]

    for target in (11, 10, 9.5, 8, 6.5, 4.5, 2, 0):
        calls.clear()
        got = nearest(list(range(len(values))), g, target)
        want = min(range(len(values)), key=lambda i: (abs(values[i] - target), i))
        assert got == (want, values[want])
        assert len(set(calls)) <= 8


@pytest.fixture
def counted(monkeypatch) -> Callable[[nn.Module], float]:
    """``count_flops`` counted once per token schedule and shared by the sweep and the matcher, so the
    test compares the search against brute force on the same fvcore numbers without recounting."""
    cache: dict[tuple, float] = {}

    def count(model: nn.Module) -> float:
        key = (model.method, tuple(model.token_schedule()))
        if key not in cache:
            cache[key] = count_flops(model)
        return cache[key]

    monkeypatch.setattr(matching, "count_flops", count)
    return count


@pytest.mark.parametrize("method", ["tome", "evit", "topk"])
def test_matching_agrees_with_a_brute_force_sweep(counted, method):
    torch.manual_seed(0)
    small = create_teacher(NAME, **{**TINY, "img_size": 12})  # 9 patch tokens: a short sweep
    factory = lambda: copy.deepcopy(small)
    if method == "tome":
        candidates, name, extra = list(range(5)), "r", {}
    else:
        candidates, name, extra = [round(i / 10, 10) for i in range(10, 0, -1)], "keep_rate", dict(pruning_loc=LOC)
    sweep = [counted(apply_reducer(factory(), method, **{name: v}, **extra)) for v in candidates]
    lo, hi = min(sweep), max(sweep)
    assert lo < hi
    for target in (hi + 1, hi, (lo + hi) / 2, lo + (hi - lo) / 7, lo - 1):
        want = min(range(len(candidates)), key=lambda i: (abs(sweep[i] - target), i))
        got = match_gflops(method, factory(), target, steps=10, **extra)
        assert got == (candidates[want], sweep[want])


def test_token_cost_handles_a_conv_stem_and_one_channel():
    """vit_digits' patch embedding is a conv stack on 1-channel images, not one patchify convolution."""
    model = create_teacher("vit_digits", depth=2, embed_dim=32, num_heads=2)
    full = model.patch_embed.num_patches + 1
    cost = TokenCost.from_model(model)
    assert cost(torch.tensor([[[full, full]] * 2])).item() == pytest.approx(count_flops(model), rel=1e-9)
