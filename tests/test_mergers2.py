"""DTEM, MCTF and ATC on tiny ViTs: token counts, one merge step written out by hand, sizes and sources,
DTEM's embedding and checkpoint layout, and the bad inputs."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynvit.reducers.atc  # noqa: F401  (registers "atc")
import dynvit.reducers.dtem  # noqa: F401  (registers "dtem")
import dynvit.reducers.mctf  # noqa: F401  (registers "mctf")
from dynvit import create_teacher, load_checkpoint
from dynvit.methods import get
from dynvit.models.checkpoint import CheckpointMismatch
from dynvit.models.tokens import log_sizes
from dynvit.reducers.mctf import merge_count
from tests.conftest import REDUCED_NAME, TINY, N, record_counts

NAME = REDUCED_NAME


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def build(base: nn.Module, method: str, **params) -> nn.Module:
    torch.manual_seed(2)  # new modules (DTEM's embedding) start at a fixed init
    return get(method).build(copy.deepcopy(base), **params).eval()


def heads(attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (H, T, d) of one image's normed tokens h (T, C), written out from the qkv weight."""
    T, C = h.shape
    qkv = h @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv.reshape(T, 3, attn.num_heads, C // attn.num_heads).permute(1, 2, 0, 3)
    return q, k, v


def attention_out(attn: nn.Module, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Projected attention output (T, C) of probabilities (H, T, T') over values (H, T', d)."""
    H, T, _ = probs.shape
    return attn.proj((probs @ v).transpose(0, 1).reshape(T, -1))


def check_sources(sources: torch.Tensor, sizes: torch.Tensor, num_prefix: int = 1) -> None:
    """Every patch stands in exactly one final token, and a token's size is the number of its patches."""
    assert sources.dtype == torch.bool
    assert torch.all(sources.sum(dim=1) == 1)
    torch.testing.assert_close(sources.sum(dim=-1).to(sizes.dtype), sizes[:, num_prefix:])


# --- DTEM ---------------------------------------------------------------------------------------------------


def test_dtem_token_counts_follow_r_capped_at_half(base, images):
    for r in (5, 20):  # at r=20: 64 → 44 → 24 → 12 → 6 patch tokens
        model = build(base, "dtem", r=r)
        n, want = 65, []
        for _ in range(4):
            m = min(r, (n - 1) // 2)
            want.append((n, n - m))
            n -= m
        assert record_counts(model, images) == want == model.token_schedule()
        assert model.predict_with_counts(images)[1].tolist() == [[list(c) for c in want]] * 3


def test_dtem_adds_a_decoupled_embedding_of_the_head_width(base):
    model = build(base, "dtem", r=2)
    for block, plain in zip(model.blocks, base.blocks, strict=True):
        assert block.attn.qkv.metric_layer.weight.shape == (16, 32)  # head width 32 / 2 heads
        torch.testing.assert_close(block.attn.qkv.weight, plain.attn.qkv.weight, rtol=0, atol=0)
    assert sorted(k for k in model.state_dict() if k.startswith("blocks.0.attn.qkv")) == [
        "blocks.0.attn.qkv.bias",
        "blocks.0.attn.qkv.metric_layer.bias",
        "blocks.0.attn.qkv.metric_layer.weight",
        "blocks.0.attn.qkv.weight",
    ]
    assert build(base, "dtem", r=2, feat_dim=8).blocks[1].attn.qkv.metric_layer.out_features == 8


def explicit_dtem_block(block: nn.Module, x: torch.Tensor, r: int) -> tuple[torch.Tensor, list[list[int]]]:
    """One DTEM block on one image's tokens x (T, C), class token first, written out token by token.

    Returns the tokens after the block (class token, unmerged A tokens, then B tokens) and, per token, the
    positions among x it stands for.
    """
    attn = block.attn
    h = block.norm1(x)
    q, k, v = heads(attn, h)
    x = x + attention_out(attn, ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1), v)
    metric = F.normalize(h @ attn.qkv.metric_layer.weight.T + attn.qkv.metric_layer.bias, dim=-1)
    a_set, b_set = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    partner = {a: max(b_set, key=lambda b: float(metric[a] @ metric[b])) for a in a_set[1:]}
    merged = sorted(partner, key=lambda a: -float(metric[a] @ metric[partner[a]]))[:r]
    groups = [[a] for a in a_set if a not in merged] + [[b] + [a for a in merged if partner[a] == b] for b in b_set]
    tokens = torch.stack([x[g].mean(dim=0) for g in groups])  # all sizes are 1 before the first merge
    return block.feed_forward(tokens.unsqueeze(0))[0], groups


def test_dtem_one_merge_step_is_tome_on_the_embedding(base, images):
    one_block = create_teacher(NAME, **{**TINY, "depth": 1})
    one_block.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("blocks.")}, strict=False)
    one_block.blocks[0].load_state_dict(base.blocks[0].state_dict())
    model = build(one_block, "dtem", r=7)
    with torch.no_grad():
        run, sources = model.trace(model.embed(images), track_sources=True)
        for i in range(len(images)):
            tokens, groups = explicit_dtem_block(model.blocks[0], model.embed(images[i : i + 1])[0], 7)
            torch.testing.assert_close(run.tokens[i], tokens, rtol=0, atol=2e-5)
            assert run.sizes[i].tolist() == [float(len(g)) for g in groups]
            assert [sources[i, j].nonzero().flatten().add(1).tolist() for j in range(len(groups) - 1)] == [
                sorted(g) for g in groups[1:]
            ]
    check_sources(sources, run.sizes)


def test_dtem_sources_and_sizes_after_every_merge(base, images):
    model = build(base, "dtem", r=6)
    logits, sources = model.predict_with_sources(images)
    run = model.predict(images)[1]
    assert sources.shape == (3, 65 - 24 - 1, N)
    check_sources(sources, run.sizes)
    torch.testing.assert_close(logits, model.predict(images)[0])


def test_dtem_trains_the_embedding_with_plain_cross_entropy(base, images):
    model = build(base, "dtem", r=6).train()
    logits = model(images)
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    grads = [block.attn.qkv.metric_layer.weight.grad for block in model.blocks]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads[:-1])
    # The head reads the class token, which never attends again after the last block's merge.
    assert torch.all(grads[-1] == 0)
    # Training keeps every token (soft merging): all 65 enter every block.
    assert record_counts(model.train(), images) == [(65, 65)] * 4


def test_dtem_trains_an_attention_pooling_vit_with_finite_gradients(images):
    # Soft merging leaves tokens of size 0, which the attention pool's log(size) bias sets to -inf; the
    # gradient of log at 0 made every embedding gradient NaN.
    torch.manual_seed(0)
    vit = create_teacher("vit_base_patch16_siglip_224", **{**TINY, "embed_dim": 32, "num_heads": 2}).train()
    model = get("dtem").build(vit, r=8).train()
    F.cross_entropy(model(images), torch.tensor([0, 1, 2])).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert any(block.attn.qkv.metric_layer.weight.grad.abs().sum() > 0 for block in model.blocks)


def test_log_sizes_is_minus_infinity_at_zero_with_a_zero_gradient():
    sizes = torch.tensor([0.0, 0.5, 3.0], requires_grad=True)
    logs = log_sizes(sizes)
    assert logs[0] == float("-inf") and torch.equal(logs[1:], sizes[1:].log())
    logs.softmax(dim=0)[1].backward()  # as attention uses it: the -inf key gets weight 0 and gradient 0
    assert sizes.grad[0] == 0 and torch.isfinite(sizes.grad).all()
    assert sizes.grad[1] > 0 > sizes.grad[2]


def test_dtem_embedding_input_is_detached_in_training(base):
    """As in DTEM, the embedding's gradient trains the embedding only, never the tokens it reads."""
    qkv = build(base, "dtem", r=6).blocks[0].attn.qkv
    for training, reaches in ((True, False), (False, True)):
        x = torch.randn(2, 5, 32, requires_grad=True)
        qkv.train(training).embed(x).sum().backward()
        assert (x.grad is not None) == reaches


def test_dtem_soft_top_k_hands_out_k_tokens_worth():
    from dynvit.reducers.dtem import soft_top_k

    g = torch.Generator().manual_seed(3)
    metric = F.normalize(torch.randn(2, 39, 16, generator=g), dim=-1)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # cosine similarities, as DTEM scores
    assign = soft_top_k(scores, k=5, k2=3, tau1=0.1, tau2=0.1)
    # Five draws of mass 1 each; a row that gathered more than 1 is scaled back to 1.
    assert torch.all(assign.sum(dim=(1, 2)) <= 5 + 1e-5) and assign.sum(dim=-1).max() <= 1 + 1e-6
    top3 = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(3, dim=-1).indices, True)
    assert torch.all(assign[~top3] == 0)  # only each A token's 3 best partners get any
    # Cold draws make it the hard choice: the 5 A tokens with the best partners, one token each (a drawn
    # row's scores drop by tau1 · log(eps) ≈ 1.6, more than any gap between these cosines).
    hard = soft_top_k(scores, k=5, k2=3, tau1=0.1, tau2=1e-4)
    best, partner = scores.max(dim=-1)
    want = torch.zeros_like(scores)
    for b, rows in enumerate(best.topk(5, dim=-1).indices):
        want[b, rows, partner[b, rows]] = 1
    torch.testing.assert_close(hard, want, rtol=0, atol=1e-4)


def dtem_release_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict as DTEM saves one (DDP-wrapped): qkv as ``qkv_layer``, fused copy of qkv and embedding."""
    sd = {}
    for key, value in model.state_dict().items():
        sd[key] = value
        if key.endswith(".attn.qkv.weight") or key.endswith(".attn.qkv.bias"):
            stem, kind = key.rsplit(".", 1)
            sd[f"{stem}.qkv_layer.{kind}"] = value
            sd[key] = torch.cat([value, model.state_dict()[f"{stem}.metric_layer.{kind}"]])
    return {f"module.{k}": v for k, v in sd.items()}


def test_dtem_checkpoint_layout_loads_strictly(base, images, tmp_path: Path):
    trained = build(base, "dtem", r=4)
    with torch.no_grad():
        for block in trained.blocks:
            block.attn.qkv.metric_layer.weight.normal_()
    path = tmp_path / "dtem.pth.tar"
    torch.save({"epoch": 30, "best_acc": 0.0, "state_dict": dtem_release_layout(trained)}, path)
    fresh = build(base, "dtem", r=4)
    report = load_checkpoint(fresh, path)
    assert report.missing == [] and report.unexpected == []
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(fresh(images), trained(images))
    # dynvit's own layout (plain qkv keys) loads as well.
    torch.save(trained.state_dict(), tmp_path / "own.pth")
    assert load_checkpoint(build(base, "dtem", r=4), tmp_path / "own.pth").missing == []


def test_dtem_checkpoint_without_embedding_names_the_fix(base, tmp_path: Path):
    torch.save(base.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(CheckpointMismatch, match=r"no DTEM embedding.*create_teacher\(name, checkpoint=path\)"):
        load_checkpoint(build(base, "dtem", r=4), tmp_path / "plain.pth")
    # The fix: the plain checkpoint into the plain ViT, then dtem on it.
    vit = create_teacher(NAME, checkpoint=tmp_path / "plain.pth", **TINY)
    assert get("dtem").build(vit, r=4).blocks[0].attn.qkv.metric_layer.weight.shape == (16, 32)


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(r=40), "r=40"),
        (dict(r=-1), "r must be >= 0"),
        (dict(r=2, feat_dim=0), "feat_dim must be a positive int"),
        (dict(r=2, k2=0), "k2 must be a positive int"),
        (dict(r=2, tau1=0.0), "tau1 must be a positive temperature"),
    ],
)
def test_dtem_rejects_bad_parameters(base, params, match):
    with pytest.raises(ValueError, match=match):
        build(base, "dtem", **params)


# --- MCTF ---------------------------------------------------------------------------------------------------


def mctf_rule(tokens: int, r: int | float) -> int:
    """MCTF's stated count: at most half the patch tokens, a fraction of them if r < 1, and 10 tokens stay."""
    patches = tokens - 1
    wanted = int(patches * r) if r < 1 else r
    return max(min(wanted, patches // 2, tokens - 10), 0)


@pytest.mark.parametrize(
    "params",
    [
        dict(r=8),
        dict(r=30),  # 65 → 35 → 18 (half) → 10 (the floor of 10 tokens)
        dict(r=0.35, activate_layer=(1, 3)),
        dict(r=8, one_step_ahead=0),
        dict(r=8, one_step_ahead=2, activate_layer=(0, 2)),
    ],
)
def test_mctf_token_counts_per_block(base, images, params):
    model = build(base, "mctf", **params)
    active = params.get("activate_layer", (1, 2, 3))
    n, want = 65, []
    for i in range(4):
        m = mctf_rule(n, params["r"]) if i in active else 0
        # Fused before attention (one_step_ahead 1, 2): the MLP sees fewer; fused after the block (0): the next block.
        want.append((n, n) if params.get("one_step_ahead", 1) == 0 else (n, n - m))
        n -= m
    assert record_counts(model, images) == want == model.token_schedule()
    assert model.predict_with_counts(images)[1].tolist() == [[list(c) for c in want]] * 3


def test_mctf_merge_count_keeps_ten_tokens_and_half_the_patches():
    assert merge_count(197, 16, 1) == 16
    assert merge_count(197, 0.35, 1) == 68  # int(196 · 0.35), MCTF-Fast's first stage
    assert merge_count(21, 16, 1) == 10  # half of 20 patch tokens
    assert merge_count(14, 16, 1) == 4  # down to 10 tokens
    assert merge_count(10, 16, 1) == merge_count(5, 16, 1) == merge_count(10, 0.35, 1) == 0


def explicit_mctf_block(block: nn.Module, x: torch.Tensor, r: int) -> tuple[torch.Tensor, list[list[int]]]:
    """One MCTF block (fusion before attention, MCTF's defaults) on one image's unfused tokens x (T, C).

    Returns the tokens after the block and, per token, the positions among x it stands for.
    """
    attn = block.attn
    T = len(x)
    q, k, v = heads(attn, block.norm1(x))
    probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)  # (H, T, T)
    received = probs.mean(dim=(0, 1))
    info = (1 / received) / (1 / received).max()
    unit = F.normalize(x, dim=-1)

    def score(i: int, j: int) -> float:  # similarity^(1/1) · informativeness^(1/20); no sizes yet
        return float((unit[i] @ unit[j] + 1) / 2 * (info[i] * info[j]) ** (1 / 20))

    a_set, b_set = list(range(0, T, 2)), list(range(1, T, 2))
    # A → B: the r // 2 A tokens (class token excluded) with the best partners.
    partner = {a: max(b_set, key=lambda b: score(a, b)) for a in a_set[1:]}
    moved = sorted(partner, key=lambda a: -score(a, partner[a]))[: r // 2]
    groups = {b: [b] + [a for a in moved if partner[a] == b] for b in b_set}
    a_left = [a for a in a_set if a not in moved]
    groups.update({a: [a] for a in a_left})
    # B → the A tokens left: the rest, by the same scores (the class token never receives).
    back = {b: max(a_left[1:], key=lambda a: score(a, b)) for b in b_set}
    b_order = sorted(b_set, key=lambda b: -score(back[b], b))
    for b in b_order[: r - r // 2]:
        groups[back[b]] += groups.pop(b)
    order = a_left + b_order[r - r // 2 :]  # MCTF's output order
    members = [groups[t] for t in order]
    # Fused tokens and attention: weights = attention received (sizes are all 1); keys add up.
    fused = torch.stack([(received[g, None] * x[g]).sum(0) / received[g].sum() for g in members])
    keys = torch.stack([probs[:, :, g].sum(-1) for g in members], dim=-1)  # (H, T, T')
    fused_probs = torch.stack([(received[g, None] * keys[:, g]).sum(1) / received[g].sum() for g in members], 1)
    _, _, v = heads(attn, block.norm1(fused))
    out = fused + attention_out(attn, fused_probs, v)
    return block.feed_forward(out.unsqueeze(0))[0], members


def test_mctf_one_fusion_step_written_out(base, images):
    model = build(base, "mctf", r=9, activate_layer=(0,))
    with torch.no_grad():
        x = model.embed(images)
        one_block = copy.deepcopy(model)
        one_block.blocks = one_block.blocks[:1]
        run, sources = one_block.trace(x, track_sources=True)
        for i in range(len(images)):
            tokens, members = explicit_mctf_block(model.blocks[0], x[i], 9)
            torch.testing.assert_close(run.tokens[i], tokens, rtol=0, atol=2e-5)
            assert run.sizes[i].tolist() == [float(len(g)) for g in members]
            assert [sources[i, j].nonzero().flatten().add(1).tolist() for j in range(len(members) - 1)] == [
                sorted(g) for g in members[1:]
            ]


@pytest.mark.parametrize("params", [dict(r=8), dict(r=8, one_step_ahead=0, pooling_type=2), dict(r=0.35)])
def test_mctf_sources_and_sizes(base, images, params):
    model = build(base, "mctf", **params)
    logits, sources = model.predict_with_sources(images)
    run = model.predict(images)[1]
    assert sources.shape == (3, run.tokens.shape[1] - 1, N)
    check_sources(sources, run.sizes)
    torch.testing.assert_close(logits, model.predict(images)[0])


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(r=1.0), "would fuse every token"),
        (dict(r=1.5), "a fraction in \\(0, 1\\)"),
        (dict(r=-2), "r must be an int count >= 0"),
        (dict(r=33), "use r <= 32"),
        (dict(r=8, activate_layer=(1, 4)), "activate_layer must hold block indices 0..3"),
        (dict(r=8, activate_layer=(1, 1)), "names a block twice"),
        (dict(r=8, pooling_type=4), "pooling_type must be one of"),
        (dict(r=8, one_step_ahead=3), "one_step_ahead must be one of"),
        (dict(r=8, tau_info=-1), "tau_info must be a temperature"),
    ],
)
def test_mctf_rejects_bad_parameters(base, params, match):
    with pytest.raises(ValueError, match=match):
        build(base, "mctf", **params)


# --- ATC ----------------------------------------------------------------------------------------------------

DEIT_SETUP = dict(reduction_loc=(1, 2, 3), reduction_ratio=0.5)


@pytest.mark.parametrize(
    "params, after",
    [
        (DEIT_SETUP, [64, 32, 16, 8]),  # int(64 · 0.5^(s+1)) clusters in blocks 1, 2, 3
        (dict(r=5), [60, 56, 52, 48]),  # r counts the class token: 4 fewer per block
        (dict(r=30), [35, 6, 1, 1]),  # T − r clusters of the patches, at least one
    ],
)
def test_atc_token_counts_per_block(base, images, params, after):
    model = build(base, "atc", **params)
    before = [64, *after[:-1]]
    want = [(b + 1, a + 1) for b, a in zip(before, after, strict=True)]
    assert record_counts(model, images) == want == model.token_schedule()
    assert model.predict_with_counts(images)[1].tolist() == [[list(c) for c in want]] * 3


def explicit_agglomeration(distances: torch.Tensor, k: int, linkage: str) -> set[frozenset[int]]:
    """Agglomerative clustering of n points with pairwise distances (n, n) down to k clusters, written out:
    join the closest two clusters, update distances by the linkage (Lance–Williams), repeat."""
    d = distances.double().clone().fill_diagonal_(float("inf"))
    clusters = {i: {i} for i in range(len(d))}
    while len(clusters) > k:
        i, j = divmod(int(d.argmin()), len(d))
        ni, nj = len(clusters[i]), len(clusters[j])
        if linkage == "average":
            row = (ni * d[i] + nj * d[j]) / (ni + nj)
        else:
            row = torch.maximum(d[i], d[j]) if linkage == "complete" else torch.minimum(d[i], d[j])
        d[i], d[:, i] = row, row
        d[i, i] = float("inf")
        d[j], d[:, j] = float("inf"), float("inf")  # j is gone
        clusters[i] |= clusters.pop(j)
    return {frozenset(c) for c in clusters.values()}


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_atc_one_clustering_step_written_out(base, images, linkage):
    model = build(base, "atc", reduction_loc=(0,), reduction_ratio=0.25, linkage=linkage)  # 16 clusters in block 0
    with torch.no_grad():
        x = model.embed(images)
        one_block = copy.deepcopy(model)
        one_block.blocks = one_block.blocks[:1]
        run, sources, (stage,) = one_block.trace(x, track_sources=True)
        labels = stage["assignment"]
        block = model.blocks[0]
        for i in range(len(images)):
            q, k, v = heads(block.attn, block.norm1(x[i]))
            mixed = x[i] + attention_out(block.attn, ((q @ k.transpose(-1, -2)) * block.attn.scale).softmax(-1), v)
            keys = F.normalize(k.mean(dim=0)[1:], dim=-1)  # keys averaged over heads, patch tokens only
            clusters = explicit_agglomeration(1 - keys @ keys.T, 16, linkage)
            assert {frozenset(torch.nonzero(labels[i] == c).flatten().tolist()) for c in range(16)} == clusters
            # Token 1 + c is cluster c's plain mean (sizes are 1 before the first clustering); the class token stays.
            means = [mixed[0]] + [mixed[1:][labels[i] == c].mean(dim=0) for c in range(16)]
            torch.testing.assert_close(
                run.tokens[i], block.feed_forward(torch.stack(means)[None])[0], rtol=0, atol=2e-5
            )
            assert run.sizes[i].tolist() == [1.0] + [float((labels[i] == c).sum()) for c in range(16)]
            assert torch.equal(sources[i], labels[i][None, :] == torch.arange(16)[:, None])


@pytest.mark.parametrize("params", [DEIT_SETUP, dict(DEIT_SETUP, prop_attn=False), dict(r=9, linkage="single")])
def test_atc_sources_sizes_and_assignments(base, images, params):
    model = build(base, "atc", **params)
    logits, sources = model.predict_with_sources(images)
    _, run = model.predict(images)
    check_sources(sources, run.sizes)
    torch.testing.assert_close(logits, model.predict(images)[0])
    # Following each patch through the stages' assignments lands on the token whose sources hold it.
    _, stages = model.predict_with_assignments(images)
    token = torch.arange(N).expand(3, -1)
    for stage in stages:
        token = torch.gather(stage["assignment"], 1, token)
    assert torch.equal(sources, token[:, None, :] == torch.arange(sources.shape[1])[None, :, None])


def test_atc_without_scikit_learn_names_the_fix(base, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)  # import fails as if it were not installed
    vit = copy.deepcopy(base)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        get("atc").build(vit)
    assert type(vit) is type(base)  # left as it was


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(linkage="ward"), "linkage must be one of"),
        (dict(r=4, reduction_ratio=0.5), "not both"),
        (dict(reduction_ratio=0.01), "leaves 0 of 64 patch tokens"),
        (dict(reduction_ratio=1.5), "reduction_ratio must be a keep ratio in \\(0, 1\\]"),
        (dict(r=-1), "r must be an int >= 0"),
        (dict(reduction_loc=(1, 4)), "must index blocks 0..3"),
    ],
)
def test_atc_rejects_bad_parameters(base, params, match):
    with pytest.raises(ValueError, match=match):
        build(base, "atc", **params)


# --- all three ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, params", [("dtem", dict(r=5)), ("mctf", dict(r=5)), ("atc", dict(r=5)), ("atc", {})])
@pytest.mark.parametrize(
    "name, kwargs",
    [("deit_tiny_distilled_patch16_224", {}), ("deit_small_patch16_224", dict(class_token=False, global_pool="avg"))],
)
def test_other_prefix_tokens_stay_out_of_merging(images, method, params, name, kwargs):
    """A distilled DeiT (two prefix tokens) and a ViT without class token: counts as scheduled, prefix
    tokens never merged (size 1), every patch in exactly one final token."""
    torch.manual_seed(0)
    vit = create_teacher(name, **TINY, **kwargs).eval()
    model = get(method).build(vit, **params).eval()
    p = model.num_prefix_tokens
    logits, sources = model.predict_with_sources(images)
    _, run = model.predict(images)
    assert logits.shape == (3, 10)
    assert record_counts(model, images) == model.token_schedule()
    assert run.counts[0].tolist() == [list(c) for c in model.token_schedule()]
    check_sources(sources, run.sizes, num_prefix=p)
    assert torch.all(run.sizes[:, :p] == 1)
