"""The recent mergers (DiffRate, ToFu, PiToMe) on tiny ViTs: counts, one merge step by hand, sizes, sources, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynvit import count_flops, create_teacher, load_checkpoint, methods
from dynvit.models.checkpoint import CheckpointMismatch
from dynvit.reducers.diffrate import DiffRateViT
from dynvit.reducers.pitome import PiToMeViT
from dynvit.reducers.tofu import ToFuViT, merge_mlerp
from tests.conftest import REDUCED_NAME, TINY, N, record_counts

NAME = REDUCED_NAME


@pytest.fixture(scope="module")
def base(base) -> nn.Module:
    vit = copy.deepcopy(base)
    # Spread-out weights, so attention and similarities are far from uniform (no near-ties).
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1)
    return vit


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32)


def first_input(model: nn.Module, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """The first input of ``layer`` (a norm inside ``model``) while the model runs on ``x``."""
    seen = []
    hook = layer.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    return seen[0]


def mlp_inputs(model: nn.Module, x: torch.Tensor, block: int) -> torch.Tensor:
    """The tokens entering block ``block``'s MLP, as the model runs."""
    return first_input(model, x, model.blocks[block].norm2)


def block_inputs(model: nn.Module, x: torch.Tensor, block: int) -> torch.Tensor:
    """The tokens entering block ``block`` (its first norm's input), as the model runs."""
    return first_input(model, x, model.blocks[block].norm1)


def check_sources(sources: list[torch.Tensor], counts: list[tuple[int, int]], prefix: int = 1) -> None:
    """Per block: one row per non-prefix token entering the MLP, each standing for at least one patch, each
    patch in at most one token, and every patch from a token of the block before (none from nowhere)."""
    previous = torch.ones(N, dtype=torch.bool)
    for s, (_, mlp) in zip(sources, counts, strict=True):
        assert s.dtype == torch.bool and s.shape[1:] == (mlp - prefix, N)
        assert (s.sum(dim=1) <= 1).all()
        assert (s.sum(dim=2) >= 1).all()
        covered = s.any(dim=1)
        assert not (covered & ~previous).any()
        previous = covered


def check_final_sources(model: nn.Module, images: torch.Tensor, sources: list[torch.Tensor]) -> None:
    """``predict_with_sources`` reports the last block's sources beside the logits of a plain forward."""
    logits, final = model.predict_with_sources(images)
    torch.testing.assert_close(logits, model(images))
    assert torch.equal(final, sources[-1])


# ---------------------------------------------------------------- DiffRate

PRUNE, MERGE = [65, 50, 40, 20], [65, 45, 30, 10]


def diffrate(base: nn.Module, **params) -> DiffRateViT:
    return DiffRateViT.from_vit(copy.deepcopy(base), **params).eval()


def test_diffrate_counts_follow_the_schedule(base, images):
    model = diffrate(base, prune_kept_num=PRUNE, merge_kept_num=MERGE)
    expected = [(65, 65), (65, 45), (45, 30), (30, 10)]
    assert model.token_schedule() == expected
    assert record_counts(model, images) == expected
    _, counts = model.predict_with_counts(images)
    assert counts.tolist() == [[list(c) for c in expected]] * 3
    # A count above the tokens left changes nothing, as DiffRate's slicing keeps what there is.
    model = diffrate(base, prune_kept_num=[65, 60, 50, 20], merge_kept_num=[65, 40, 40, 20])
    assert record_counts(model, images) == [(65, 65), (65, 40), (40, 40), (40, 20)]


def test_diffrate_reduction_step_equals_explicit_computation(base, images):
    """Block 1 (prune 65 → 50, merge → 45) written out token by token."""
    model = diffrate(base, prune_kept_num=PRUNE, merge_kept_num=MERGE)
    block = model.blocks[1]
    x_in = block_inputs(model, images, 1)
    with torch.no_grad():
        hidden, stats = block.attend(x_in, cls_attn=True)  # sizes are all 1 before the first merge
    expected = []
    for b in range(images.shape[0]):
        attention = stats.cls_attn[b].mean(dim=0)
        ranked = sorted(range(1, 65), key=lambda i: -attention[i].item())
        kept = [hidden[b, 0]] + [hidden[b, i] for i in ranked[:49]]  # prune: class token + 49 patches
        dst, src = kept[:45], kept[45:]
        groups = [[t] for t in dst]
        for s in src:
            similarity = [F.cosine_similarity(s, d, dim=0).item() for d in dst[1:]]
            groups[1 + similarity.index(max(similarity))].append(s)
        expected.append(torch.stack([torch.stack(g).mean(dim=0) for g in groups]))
    torch.testing.assert_close(mlp_inputs(model, images, 1), torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_diffrate_sizes_grow_by_similarity_and_sources_follow_merges():
    from dynvit.reducers.diffrate import merge_into_kept

    x = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.2], [0.1, 3.0], [1.0, 1.0]]])
    size = torch.tensor([[1.0, 1.0, 2.0, 1.0, 1.0, 1.0]])
    sources = torch.eye(6, dtype=torch.bool)[None, :, :]
    merged, new_size, new_sources = merge_into_kept(x, size, sources, kept=3, num_prefix=1)
    # Token 3 ([2, .2]) is nearest [1, 0], token 4 ([.1, 3]) nearest [0, 1]; token 5 ([1, 1]) ties between
    # them and goes to the first (torch.max's rule, as in DiffRate). The class token ([5, 5]) is the most
    # similar to [1, 1] but never receives.
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    s3, s4, s5 = cos(x[0, 3], x[0, 1]), cos(x[0, 4], x[0, 2]), cos(x[0, 5], x[0, 1])
    assert cos(x[0, 5], x[0, 1]) == cos(x[0, 5], x[0, 2])  # a tie goes to the first, as torch.max does
    torch.testing.assert_close(merged[0, 1], (x[0, 1] + x[0, 3] + x[0, 5]) / 3)  # unweighted mean
    torch.testing.assert_close(merged[0, 2], (x[0, 2] + x[0, 4]) / 2)
    torch.testing.assert_close(merged[0, 0], x[0, 0])
    torch.testing.assert_close(new_size[0], torch.tensor([1.0, 1.0 + s3 + s5, 2.0 + s4]))
    assert new_sources[0].tolist() == [
        [True, False, False, False, False, False],
        [False, True, False, True, False, True],
        [False, False, True, False, True, False],
    ]


def test_diffrate_sources_and_sizes_over_a_run(base, images):
    model = diffrate(base, prune_kept_num=PRUNE, merge_kept_num=MERGE)
    _, sources = model.predict_with_block_sources(images)
    check_final_sources(model, images, sources)
    check_sources(sources, model.token_schedule())
    _, run = model.predict(images)
    # Merged tokens are heavier than one token, by the similarities they brought (all positive here).
    merged = sources[-1].sum(dim=-1) > 1
    assert merged.any() and (run.sizes[:, 1:][merged] > 1).all()
    assert (run.sizes[:, 1:][~merged] == 1).all() and (run.sizes[:, 0] == 1).all()


def test_diffrate_proportional_attention_uses_sizes(base, images):
    """Attention after a merge adds log(size) to its logits: block 2 of a schedule that reduces only in block 1."""
    model = diffrate(base, prune_kept_num=[65, 50, 45, 45], merge_kept_num=[65, 45, 45, 45])
    sizes = model.predict(images)[1].sizes  # as block 1 left them, nothing changes after
    x_in = block_inputs(model, images, 2)
    with torch.no_grad():
        with_bias, _ = model.blocks[2].attend(x_in, bias=sizes.log()[:, None, None, :])
        without, _ = model.blocks[2].attend(x_in)
    hidden = mlp_inputs(model, images, 2)
    torch.testing.assert_close(hidden, with_bias)
    assert not torch.allclose(hidden, without)


def test_diffrate_named_schedules(base):
    narrow = dict(embed_dim=32, num_heads=2)  # DeiT-S's 12 blocks and 196 patches, cheap to build
    model = DiffRateViT.from_vit(create_teacher(NAME, **narrow), schedule="deit_s_2.3")
    # compression_rate.json, "ViT-S-DeiT", "2.3"
    assert model.prune_kept_num == [197, 192, 168, 143, 121, 105, 92, 74, 62, 45, 33, 3]
    assert model.merge_kept_num == [197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3]
    default = DiffRateViT.from_vit(create_teacher(NAME, **narrow))
    assert default.schedule == "deit_s_2.9"
    assert default.prune_kept_num == [197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3]
    assert default.merge_kept_num == [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3]
    # On 4 blocks of 64 patches, block i reads the released block round(11 i / 3) and scales its patches.
    tiny = diffrate(base, schedule="deit_s_2.9")
    released = ((197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3), (197, 194, 176, 156, 141, 133, 121, 107))
    prune = [1 + round(64 * (released[0][j] - 1) / 196) for j in (0, 4, 7, 11)]
    assert tiny.prune_kept_num == prune and prune[-1] == 2  # at least one patch stays
    assert tiny.merge_kept_num[:3] == [1 + round(64 * (released[1][j] - 1) / 196) for j in (0, 4, 7)]


def test_diffrate_strength_bends_the_schedule(base):
    assert diffrate(base, prune_kept_num=PRUNE, merge_kept_num=MERGE, strength=0).token_schedule() == [(65, 65)] * 4
    strong = diffrate(base, prune_kept_num=PRUNE, merge_kept_num=MERGE, strength=2)
    assert strong.prune_kept_num == [1 + round(64 * ((k - 1) / 64) ** 2) for k in PRUNE]
    assert strong.merge_kept_num == [1 + max(1, round(64 * ((k - 1) / 64) ** 2)) for k in MERGE]


def test_diffrate_gflops_match_its_own_formula():
    """fvcore on the 2.9 schedule is within 1 % of DiffRate's count (4NC² + 2N²C per attention, 8NC² per MLP)."""
    model = DiffRateViT.from_vit(create_teacher(NAME), schedule="deit_s_2.9")
    C, flops = 384, 197 * 384 * 16 * 16 * 3 + 384 * 1000  # patch embedding (as DiffRate counts it) and head
    for attn, mlp in model.token_schedule():
        flops += 4 * attn * C * C + 2 * attn * attn * C + 8 * mlp * C * C
    assert flops / 1e9 == pytest.approx(2.905, abs=5e-4)
    assert count_flops(model) == pytest.approx(flops / 1e9, rel=0.01)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (dict(prune_kept_num=PRUNE[:3], merge_kept_num=MERGE), "one int per block"),
        (dict(prune_kept_num=[65, 50, 55, 20], merge_kept_num=MERGE), r"running minimum \[65, 50, 50, 20\]"),
        (dict(prune_kept_num=PRUNE, merge_kept_num=[65, 55, 30, 10]), r"merge_kept_num\[1\]=55 exceeds"),
        (dict(prune_kept_num=[66, 50, 40, 20], merge_kept_num=MERGE), r"in \[2, 65\]"),
        (dict(prune_kept_num=PRUNE), "both prune_kept_num and merge_kept_num"),
        (dict(schedule="deit_s_2.9", prune_kept_num=PRUNE, merge_kept_num=MERGE), "either a named schedule"),
        (dict(schedule="deit_s_2.8"), "choose one of"),
        (dict(strength=-1.0), "strength must be a number >= 0"),
    ],
)
def test_diffrate_bad_input(base, params, message):
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=message):
        DiffRateViT.from_vit(model, **params)
    assert type(model).__name__ == "VisionTransformer"  # a rejected schedule leaves the model as it was


def test_diffrate_needs_a_class_token():
    vit = create_teacher(NAME, **{**TINY, "class_token": False, "global_pool": "avg"})
    with pytest.raises(TypeError, match="class token"):
        DiffRateViT.from_vit(vit)


def test_diffrate_is_registered(base, images):
    method = methods.get("diffrate")
    assert not method.learned and "sources" in method.reports and method.needs_class_token
    assert method.objective == "diffrate"  # its fine-tuning searches the rates
    model = method.build(copy.deepcopy(base), **method.default_params(base))
    assert isinstance(model, DiffRateViT)
    low, high = method.knob.bounds(model)
    cheap = method.build(copy.deepcopy(base), strength=high)
    assert sum(m for _, m in cheap.token_schedule()) < sum(m for _, m in model.token_schedule())
    model.train()
    model(images).sum().backward()  # fine-tunes like the plain model


# What OpenGVLab/DiffRate's search computes (DiffRate/ddp.py, DiffRate/patch/deit.py, timm 0.4.5) for a ViT of
# 64 patches (64² images, patch 8, width 96, 6 blocks) with rate logits 2 · randn from Generator(2), drawn in its
# order (every block's pruning, then merging; block 0's single candidate included): the kept counts with the
# class token and its training FLOPs formula, at granularity 4 and 1 (/work/scratch/drsearch/ref_search.py).
OFFICIAL_SEARCH = {
    4: (([65, 34, 38, 33, 22, 41], [65, 31, 41, 31, 43, 45]), 27392640.0),
    1: (([65, 25, 48, 26, 29, 51], [65, 30, 35, 38, 28, 30]), 25788480.0),
}


def searching(base: nn.Module, granularity: int = 4, **params) -> DiffRateViT:
    model = DiffRateViT.from_vit(copy.deepcopy(base), **params)
    model.learn_rates(granularity)
    return model.train()


@pytest.mark.parametrize("granularity", sorted(OFFICIAL_SEARCH))
def test_diffrate_search_counts_and_flops_equal_the_official_code(granularity):
    vit = create_teacher(NAME, img_size=64, patch_size=8, embed_dim=96, depth=6, num_heads=3, num_classes=10)
    model = searching(vit, granularity)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i in range(6):
            for rates in (model.prune_rates, model.merge_rates):
                logits = 2.0 * torch.randn(1 if i == 0 else 64 // granularity, generator=g)
                if i > 0:
                    rates[i - 1].logits.copy_(logits)
    counts, flops = OFFICIAL_SEARCH[granularity]
    assert model.kept_counts() == counts
    assert model.formula_flops().item() == flops
    # Eval runs those counts: what is left after each block is the running minimum of both.
    prune, merge = counts
    assert [m for _, m in model.token_schedule()] == [min(prune[: i + 1] + merge[: i + 1]) for i in range(6)]


def test_diffrate_search_starts_uniform_and_the_first_block_keeps_everything(base):
    model = searching(base, granularity=4)
    assert len(model.prune_rates) == len(model.merge_rates) == len(model.blocks) - 1
    # Uniform over 64, 60, …, 4 patches: expectation 34, plus the class token.
    assert model.kept_counts() == ([65] + [35] * 3, [65] + [35] * 3)
    assert {k for k, p in model.named_parameters() if k.startswith(model.new_param_prefixes)} == {
        f"{kind}_rates.{i}.logits" for kind in ("prune", "merge") for i in range(3)
    }
    with pytest.raises(ValueError, match="granularity is the gap"):
        model.learn_rates(65)


def test_diffrate_keep_mask_is_exact_with_the_keep_probability_as_gradient(base):
    rates = searching(base).prune_rates[0]
    with torch.no_grad():
        rates.logits.normal_()
    mask = rates.keep_mask(30, 50)
    assert torch.equal(mask, torch.cat([torch.ones(30), torch.zeros(20), torch.ones(15)]))
    weights = torch.randn(65)
    (grad,) = torch.autograd.grad((mask * weights).sum(), rates.logits)
    # The probability that position j is kept: the mass of the candidates that reach it (class token: all).
    probability = torch.stack(
        [
            sum(q for c, q in zip(rates.candidates, rates.logits.softmax(-1), strict=True) if c + 1 > j)
            for j in range(65)
        ]
    )
    (expected,) = torch.autograd.grad((probability * weights).sum(), rates.logits)
    torch.testing.assert_close(grad, expected)


def test_diffrate_search_masks_in_training_what_eval_removes(base, images):
    model = searching(base)
    with torch.no_grad():
        for i, (prune, merge) in enumerate(zip(model.prune_rates, model.merge_rates, strict=True)):
            prune.logits.copy_(-30.0 * (prune.candidates != 48 - 16 * i).float())  # prune to 48, 32, 16 patches
            merge.logits.copy_(-30.0 * (merge.candidates != 64).float())  # no merging
    assert model.kept_counts() == ([65, 49, 33, 17], [65] * 4)
    # Masked keys are out of every later attention (to DynamicViT's eps), as removed ones are in eval.
    torch.testing.assert_close(model.train()(images), model.eval()(images), atol=1e-4, rtol=1e-4)
    # Keeping every token, the training forward is the plain ViT's.
    with torch.no_grad():
        for rates in (*model.prune_rates, *model.merge_rates):
            rates.logits.copy_(-30.0 * (rates.candidates != 64).float())
    torch.testing.assert_close(model.train()(images), base(images), atol=1e-4, rtol=1e-4)


def test_diffrate_search_merges_in_training_and_reaches_every_rate(base, images):
    model = searching(base)
    with torch.no_grad():
        for rates in (*model.prune_rates, *model.merge_rates):
            rates.logits.normal_()
    logits = model(images)
    assert logits.shape == (3, 10)
    loss = F.cross_entropy(logits, torch.arange(3)) + model.formula_flops() / 1e6
    loss.backward()
    for rates in (*model.prune_rates, *model.merge_rates):
        assert rates.logits.grad is not None and rates.logits.grad.abs().sum() > 0
    # The backbone's gradient passes the masks and merges.
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="sources are traced in eval"):
        model.trace(model.embed(images), track_sources=True)


def test_diffrate_loads_the_official_search_checkpoint_layout(base, tmp_path):
    searched = searching(base)
    with torch.no_grad():
        for rates in (*searched.prune_rates, *searched.merge_rates):
            rates.logits.normal_()
    # OpenGVLab/DiffRate's checkpoint.pth: the backbone's keys, and per block (block 0 included) two DiffRate
    # modules with their candidates and logits (/work/scratch/drsearch/ref_ckpt.py loads the real one the same).
    official = dict(base.state_dict())
    for i in range(4):
        for kind in ("prune", "merge"):
            candidates = torch.arange(64, 0, -4).float() if i else torch.tensor([64.0])
            logits = getattr(searched, f"{kind}_rates")[i - 1].logits.detach() if i else torch.zeros(1)
            official[f"blocks.{i}.{kind}_ddp.kept_token_candidate"] = candidates
            official[f"blocks.{i}.{kind}_ddp.selected_probability"] = logits
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": official, "epoch": 2}, path)
    plain = DiffRateViT.from_vit(copy.deepcopy(base))
    with pytest.raises(CheckpointMismatch, match=r"call model.learn_rates\(4\) before loading it"):
        load_checkpoint(plain, path)
    fresh = searching(base)
    report = load_checkpoint(fresh, path)
    assert report.missing == report.unexpected == []
    assert fresh.kept_counts() == searched.kept_counts()


def test_a_searched_diffrate_compiles_to_one_graph_with_its_learned_counts(base, images):
    import torch._dynamo as dynamo

    model = searching(base)
    with torch.no_grad():
        for rates in (*model.prune_rates, *model.merge_rates):
            rates.logits.normal_()
    model.eval()
    dynamo.reset()
    with torch.inference_mode():
        explained = dynamo.explain(model)(images)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        assert record_counts(model, images) == model.token_schedule()


# ---------------------------------------------------------------- ToFu


def tofu(base: nn.Module, **params) -> ToFuViT:
    return ToFuViT.from_vit(copy.deepcopy(base), **params).eval()


def explicit_matching(keys: torch.Tensor, r: int) -> list[tuple[int, int]]:
    """ToMe's matching written out for one image: (A position, B position) of the r best-matched A tokens
    (A = even tokens, B = odd, class token = A's first, never merged), in tokens' own numbering."""
    a, b = list(range(0, keys.shape[0], 2)), list(range(1, keys.shape[0], 2))
    best = []
    for i in a[1:]:
        similarity = [F.cosine_similarity(keys[i], keys[j], dim=0).item() for j in b]
        best.append((max(similarity), i, b[similarity.index(max(similarity))]))
    return [(i, j) for _, i, j in sorted(best, reverse=True)[:r]]


def test_tofu_counts_and_which_blocks_prune(base, images):
    model = tofu(base, r=5)
    expected = [(65, 60), (60, 55), (55, 50), (50, 45)]
    assert model.token_schedule() == expected == record_counts(model, images)
    assert [model.prunes(i) for i in range(4)] == [True, True, True, False]  # blocks <= depth // 2 prune
    assert tofu(base, r=[0, 20, 20, 20]).token_schedule() == [(65, 65), (65, 45), (45, 25), (25, 13)]  # capped


@pytest.mark.parametrize("index", [0, 3])  # a pruning block, a merging block
def test_tofu_step_equals_explicit_computation(base, images, index):
    model = tofu(base, r=5)
    block = model.blocks[index]
    x_in = block_inputs(model, images, index)
    with torch.no_grad():
        hidden, stats = block.attend(x_in)
    keys = stats.keys.mean(dim=1)
    expected = []
    for b in range(images.shape[0]):
        pairs = explicit_matching(keys[b], r=5)
        gone = {i for i, _ in pairs}
        tokens = {t: hidden[b, t] for t in range(hidden.shape[1]) if t not in gone}
        if not model.prunes(index):  # MLERP: the mean, rescaled to the largest norm, over the destination's norm
            for j in {j for _, j in pairs}:
                group = [hidden[b, j]] + [hidden[b, i] for i, d in pairs if d == j]
                largest = max(t.norm() for t in group)
                tokens[j] = torch.stack(group).mean(dim=0) / hidden[b, j].norm() * largest
        order = [t for t in tokens if t % 2 == 0] + [t for t in tokens if t % 2 == 1]  # unmerged A, then B
        expected.append(torch.stack([tokens[t] for t in order]))
    torch.testing.assert_close(mlp_inputs(model, images, index), torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_tofu_mlerp_by_hand():
    from dynvit.models.tokens import MergePlan

    x = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [0.0, -1.0], [6.0, 8.0], [1.0, 1.0]]])
    # A = tokens 0, 2, 4; B = 1, 3, 5. A's 2 and 4 (positions 1, 2) both merge into B's 1 (position 0).
    plan = MergePlan(unmerged=torch.tensor([[0]]), src=torch.tensor([[1, 2]]), dst=torch.tensor([[0, 0]]))
    merged = merge_mlerp(plan, x)
    mean = (x[0, 1] + x[0, 2] + x[0, 4]) / 3
    # OpenToMe divides by the original destination's norm (1), not the mean's; the largest norm is 10.
    torch.testing.assert_close(merged[0], torch.stack([x[0, 0], mean / 1.0 * 10.0, x[0, 3], x[0, 5]]))


def test_tofu_exports_its_merging_blocks_to_onnx(images, tmp_path):
    # scatter_reduce(reduce="mean") exported to a graph onnxruntime refused (torch 2.15), or one that summed wrongly.
    from dynvit.deploy import export_onnx
    from dynvit.deploy.onnx import check_onnx

    torch.manual_seed(0)
    # Two merging blocks in a row are what the exporter got wrong; the pruning blocks merely cost time.
    model = tofu(create_teacher(REDUCED_NAME, **{**TINY, "depth": 5}).eval(), r=[0, 0, 0, 4, 4])
    assert [model.prunes(i) for i in range(5)] == [True] * 3 + [False] * 2
    path = export_onnx(model, tmp_path / "tofu.onnx", images=images)
    assert check_onnx(model, path, images[:1]).ties == ()


def test_tofu_sources_lose_pruned_patches_and_join_merged_ones(base, images):
    model = tofu(base, r=5)
    _, sources = model.predict_with_block_sources(images)
    check_final_sources(model, images, sources)
    check_sources(sources, model.token_schedule())
    # Blocks 0-2 prune 5 single patches each; block 3 merges 5 tokens into others, losing no patch.
    assert [s.any(dim=1).sum(dim=1).tolist() for s in sources] == [[59] * 3, [54] * 3, [49] * 3, [49] * 3]
    assert (sources[2].sum(dim=-1) == 1).all() and (sources[3].sum(dim=-1) > 1).any()
    assert model.predict(images)[1].sizes is None  # ToFu tracks no sizes: plain attention, plain pooling


@pytest.mark.parametrize(("r", "message"), [(-1, "r must be >= 0"), (33, "use r <= 32"), ([5, 5], "one per block")])
def test_tofu_bad_input(base, r, message):
    with pytest.raises(ValueError, match=message):
        ToFuViT.from_vit(copy.deepcopy(base), r=r)


def test_tofu_is_registered(base, images):
    method = methods.get("tofu")
    assert not method.learned and "sources" in method.reports and not method.needs_class_token
    assert method.knob.bounds(base) == (0, 32)
    model = method.build(copy.deepcopy(base), **method.default_params(base))
    assert isinstance(model, ToFuViT) and model.r == 13
    model.train()
    model(images).sum().backward()  # fine-tunes like the plain model


# ---------------------------------------------------------------- PiToMe


def pitome(base: nn.Module, **params) -> PiToMeViT:
    return PiToMeViT.from_vit(copy.deepcopy(base), **params).eval()


def test_pitome_counts_follow_the_ratio(base, images):
    model = pitome(base, ratio=0.9)
    expected, n = [], 64
    for _ in range(4):
        r = math.floor(n - n * 0.9)
        expected.append((n + 1, n + 1 - r))
        n -= r
    assert model.token_schedule() == expected == record_counts(model, images)
    assert expected[0] == (65, 59)  # floor(64 − 57.6)
    assert model.margins == [0.75, 0.5625, 0.375, 0.1875]


@pytest.mark.parametrize("index", [1, 2])  # the first half matches all tokens, the second half 2r of them
def test_pitome_step_equals_explicit_computation(base, images, index):
    model = pitome(base, ratio=0.9)
    _, sources = model.predict_with_block_sources(images)
    # The tokens entering the block, each the patches it holds; the class token 1.
    sizes = torch.cat([torch.ones(images.shape[0], 1), sources[index - 1].sum(dim=-1).float()], dim=1)
    x_in = block_inputs(model, images, index)
    with torch.no_grad():
        hidden, stats = model.blocks[index].attend(x_in)  # no proportional attention
    keys = stats.keys.mean(dim=1)
    r, margin = model.merges[index], 0.75 - 0.75 * index / 4
    expected = []
    for b in range(images.shape[0]):
        patches = list(range(1, hidden.shape[1]))
        cos = F.cosine_similarity(keys[b, patches][:, None], keys[b, patches][None], dim=-1)
        energy = F.elu(cos - margin).mean(dim=1)
        ranked = [patches[i] for i in sorted(range(len(patches)), key=lambda i: -energy[i].item())]
        matched = ranked if index < 2 else ranked[: 2 * r]  # ceil(4 / 2) = 2 blocks match everything
        a, bs = matched[0::2], matched[1::2]
        best = []
        for i in a:
            similarity = [F.cosine_similarity(keys[b, i], keys[b, j], dim=0).item() for j in bs]
            best.append((max(similarity), i, bs[similarity.index(max(similarity))]))
        pairs = [(i, j) for _, i, j in sorted(best, reverse=True)[:r]]
        merged = {i for i, _ in pairs}
        groups = {j: [j] + [i for i, d in pairs if d == j] for j in bs}
        tokens = [hidden[b, 0]] + [hidden[b, t] for t in ranked if t not in matched]  # class token, protected
        tokens += [hidden[b, i] for i in sorted(set(a) - merged, key=ranked.index)]  # unmerged A
        for j in bs:  # B, each the size-weighted mean of its group
            w = sizes[b, groups[j]]
            tokens.append((hidden[b, groups[j]] * w[:, None]).sum(dim=0) / w.sum())
        expected.append(torch.stack(tokens))
    torch.testing.assert_close(mlp_inputs(model, images, index), torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_pitome_sizes_count_the_patches_each_token_holds(base, images):
    model = pitome(base, ratio=0.8)
    _, sources = model.predict_with_block_sources(images)
    check_final_sources(model, images, sources)
    check_sources(sources, model.token_schedule())
    assert all(s.any(dim=1).all() for s in sources)  # merging loses no patch
    sizes = model.predict(images)[1].sizes
    assert sizes[:, 0].eq(1).all()
    torch.testing.assert_close(sizes[:, 1:], sources[-1].sum(dim=-1).float())
    assert sizes.max() > 1


def test_pitome_ratio_one_is_the_plain_model(base, images):
    model = pitome(base, ratio=1.0)
    assert model.token_schedule() == [(65, 65)] * 4
    with torch.no_grad():
        torch.testing.assert_close(model(images), base(images))


@pytest.mark.parametrize(
    ("ratio", "message"),
    [(0.0, r"in \(0, 1\]"), (1.5, r"in \(0, 1\]"), (True, r"in \(0, 1\]"), ("0.9", r"in \(0, 1\]"), (0.3, ">= 0.5")],
)
def test_pitome_bad_input(base, ratio, message):
    with pytest.raises(ValueError, match=message):
        PiToMeViT.from_vit(copy.deepcopy(base), ratio=ratio)


def test_pitome_is_registered(base, images):
    method = methods.get("pitome")
    assert not method.learned and "sources" in method.reports and method.knob.cheaper == "lower"
    model = method.build(copy.deepcopy(base), **method.default_params(base))
    assert isinstance(model, PiToMeViT) and model.ratio == 0.9
    model.train()
    model(images).sum().backward()  # fine-tunes like the plain model
