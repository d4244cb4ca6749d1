"""TokenReduction's clustering methods: K-Medoids, DPC-KNN, and the stage loop they share."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dynvit.methods import get
from dynvit.models.checkpoint import load_weights
from dynvit.reducers.clustering import (
    StageContext,
    block_with_attention,
    cluster_counts,
    cluster_purity,
    patch_assignment,
)
from dynvit.reducers.dpcknn import DPCKNNViT
from dynvit.reducers.kmedoids import KMedoidsViT

# 36 patch tokens, so the first stage's torch.cdist takes its matrix-product path (more than 25 tokens).
TINY = dict(img_size=48, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=10)
LOC = (1, 2, 3)
RATE = 0.6  # int(36 · 0.6^s): 21, 12, 7


def tiny_vit(**kwargs) -> VisionTransformer:
    return VisionTransformer(**{**TINY, **kwargs}).eval()


def first_stage_context(model: nn.Module, tokens: torch.Tensor) -> StageContext:
    """What the first stage of ``model`` sees, with no attention and a generator seeded with 0."""
    return StageContext(1, model.keep_counts[0], tokens[:, :0], None, torch.Generator().manual_seed(0))


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 48, 48)


def attention_probs(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A block's attention probabilities (B, H, M, M), written out from its weights."""
    B, M, C = x.shape
    H = block.attn.num_heads
    qkv = block.attn.qkv(block.norm1(x)).reshape(B, M, 3, H, C // H).permute(2, 0, 3, 1, 4)
    return ((qkv[0] @ qkv[1].transpose(-2, -1)) / (C // H) ** 0.5).softmax(dim=-1)


def nearest(d: torch.Tensor, medoids: list[int]) -> list[int]:
    """Each token's nearest medoid (first on ties) by the distances d (N, N)."""
    return [min(range(len(medoids)), key=lambda c, i=i: d[i, medoids[c]].item()) for i in range(d.shape[0])]


def explicit_k_medoids(tokens: torch.Tensor, weight: torch.Tensor, k: int, iters: int) -> tuple[list, list]:
    """K-Medoids as TokenReduction describes it, one image at a time with Python loops."""
    dist = torch.cdist(tokens, tokens)  # batched, as the model calls it: the same cdist path
    centres, assignment = [], []
    for b in range(tokens.shape[0]):
        d, w, n = dist[b], weight[b], tokens.shape[1]
        medoids = sorted(range(n), key=lambda i: -w[i].item())[:k]
        cost = [(d[i] * w[i]).sum().item() for i in range(n)]

        for _ in range(iters):
            assign = nearest(d, medoids)
            members = [[i for i in range(n) if assign[i] == c] for c in range(k)]
            medoids = [min(m, key=lambda i: cost[i]) if m else 0 for m in members]
        centres.append(medoids)
        assignment.append(nearest(d, medoids))
    return centres, assignment


def test_kmedoids_clusters_and_logits_follow_the_explicit_algorithm(images):
    torch.manual_seed(1)
    vit = tiny_vit()
    model = KMedoidsViT.from_vit(vit, keep_rate=RATE, reduction_loc=LOC, cluster_iters=2)
    logits, assignments = model.predict_with_assignments(images)

    x = model.embed(images)
    expected, attn = [], None
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            if i in LOC:
                stage = LOC.index(i)
                weight = attn.sum(dim=(1, 2))[:, 1:]  # received: over heads and queries, patch columns
                centres, assign = explicit_k_medoids(x[:, 1:], weight, int(36 * RATE ** (stage + 1)), 2)
                expected.append((centres, assign))
                picked = torch.stack([x[b, 1:][torch.tensor(c)] for b, c in enumerate(centres)])
                x = torch.cat([x[:, :1], picked], dim=1)
            attn = attention_probs(block, x)
            x = block(x)
        reference_logits = model.forward_head(model.norm(x))

    assert [a["centres"].shape[1] for a in assignments] == [21, 12, 7]
    for (centres, assign), got in zip(expected, assignments, strict=True):
        assert got["centres"].tolist() == centres
        assert got["assignment"].tolist() == assign
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=1e-5)


def explicit_dpc_knn(tokens: torch.Tensor, noise: torch.Tensor, k: int, neighbours: int) -> tuple[list, list]:
    """DPC-KNN as TokenReduction computes it, one image and one token at a time."""
    C, n = tokens.shape[2], tokens.shape[1]
    dist = torch.cdist(tokens, tokens) / C**0.5
    centres, assignment = [], []
    for b in range(tokens.shape[0]):
        d = dist[b]
        rho = torch.stack(
            [(-(d[i].sort().values[:neighbours] ** 2).mean()).exp() + noise[b, i] * 1e-6 for i in range(n)]
        )
        delta = [min([d[i, j] for j in range(n) if rho[j] > rho[i]], default=d.max()) for i in range(n)]
        score = [(delta[i] * rho[i]).item() for i in range(n)]
        peaks = sorted(range(n), key=lambda i: -score[i])[:k]
        assign = [min(range(k), key=lambda c: d[peaks[c], i].item()) for i in range(n)]
        for c, i in enumerate(peaks):
            assign[i] = c
        centres.append(peaks)
        assignment.append(assign)
    return centres, assignment


def test_dpcknn_clusters_and_merges_follow_the_explicit_algorithm(images):
    torch.manual_seed(1)
    model = DPCKNNViT.from_vit(tiny_vit(), keep_rate=RATE, reduction_loc=LOC, seed=5)
    logits, assignments = model.predict_with_assignments(images)

    noise = torch.Generator().manual_seed(5)  # one generator per forward, one draw per stage
    x = model.embed(images)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            if i in LOC:
                stage = LOC.index(i)
                k = int(36 * RATE ** (stage + 1))
                tokens = x[:, 1:]
                centres, assign = explicit_dpc_knn(tokens, torch.rand(tokens.shape[:2], generator=noise), k, 5)
                assert assignments[stage]["centres"].tolist() == centres
                assert assignments[stage]["assignment"].tolist() == assign
                score = model.cluster_layers[stage].score
                merged = []
                for b in range(x.shape[0]):
                    members = [[j for j, c in enumerate(assign[b]) if c == kk] for kk in range(k)]
                    w = [score(tokens[b, m]).exp() for m in members]
                    merged.append(
                        torch.stack(
                            [(wk * tokens[b, m]).sum(0) / (wk.sum() + 1e-6) for wk, m in zip(w, members, strict=True)]
                        )
                    )
                x = torch.cat([x[:, :1], torch.stack(merged)], dim=1)
            x = block(x)
        reference_logits = model.forward_head(model.norm(x))
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cls", [KMedoidsViT, DPCKNNViT])
def test_token_counts_are_int_n_rate_power_per_stage(cls, images):
    model = cls.from_vit(tiny_vit(), keep_rate=RATE, reduction_loc=(1, 3))
    kept = [36, int(36 * RATE), int(36 * RATE), int(36 * RATE**2)]  # before blocks 0..3
    expected = torch.tensor([[n + 1, n + 1] for n in kept])
    _, counts = model.predict_with_counts(images)
    assert torch.equal(counts, expected.expand(3, -1, -1))
    assert model.token_schedule() == [tuple(c) for c in expected.tolist()]
    _, assignments = model.predict_with_assignments(images)
    assert [tuple(a["assignment"].shape) for a in assignments] == [(3, 36), (3, int(36 * RATE))]


def test_deit_small_counts_are_the_papers():
    assert cluster_counts(196, 0.7, 3) == [137, 96, 67]
    assert cluster_counts(196, 0.25, 3) == [49, 12, 3]


def test_dpcknn_trains_its_score_layers(images):
    model = DPCKNNViT.from_vit(tiny_vit(), keep_rate=RATE, reduction_loc=LOC).train()
    model(images).logsumexp(dim=1).sum().backward()
    for layer in model.cluster_layers:
        assert layer.score.weight.grad is not None and layer.score.weight.grad.abs().sum() > 0


def test_kmedoids_passes_gradients_to_the_backbone_below(images):
    model = KMedoidsViT.from_vit(tiny_vit(), keep_rate=RATE, reduction_loc=LOC).train()
    model(images).sum().backward()
    assert model.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert len(model.cluster_layers) == 0 and not any("cluster_layers" in k for k in model.state_dict())


def test_dpcknn_state_dict_uses_the_reference_names_and_loads_strictly():
    torch.manual_seed(0)
    trained = DPCKNNViT.from_vit(tiny_vit(), keep_rate=RATE, reduction_loc=LOC)
    names = {k for k in trained.state_dict() if k.startswith("cluster_layers")}
    assert names == {f"cluster_layers.{s}.score.{p}" for s in range(3) for p in ("weight", "bias")}
    fresh = DPCKNNViT.from_vit(tiny_vit(), keep_rate=RATE, reduction_loc=LOC)
    assert not fresh.cluster_layers.training  # new layers join an eval model in eval mode
    load_weights(fresh, trained.state_dict(), strict=True)
    assert torch.equal(fresh.cluster_layers[2].score.weight, trained.cluster_layers[2].score.weight)
    # A plain ViT checkpoint loads too; the score layers keep their init (truncated normal, zero bias).
    plain = tiny_vit().state_dict()
    load_weights(fresh, plain, strict=True)
    assert torch.equal(fresh.blocks[0].attn.qkv.weight, plain["blocks.0.attn.qkv.weight"])
    assert fresh.cluster_layers[0].score.bias.item() == 0.0
    assert 0.01 < fresh.cluster_layers[0].score.weight.std().item() < 0.03


def test_equal_weight_dpcknn_adds_nothing_and_averages_clusters(images):
    model = DPCKNNViT.from_vit(tiny_vit(), keep_rate=RATE, reduction_loc=(1,), equal_weight=True, seed=0)
    assert len(model.cluster_layers) == 0
    tokens = model.blocks[0](model.embed(images))[:, 1:]
    merged, assignment = model.reduce(0, tokens, first_stage_context(model, tokens))
    one = assignment["assignment"][0]
    for c in range(merged.shape[1]):
        torch.testing.assert_close(merged[0, c], tokens[0, one == c].sum(0) / ((one == c).sum() + 1e-6))


def test_equal_weight_kmedoids_seeds_by_farthest_points_and_allows_location_zero(images):
    model = KMedoidsViT.from_vit(tiny_vit(), keep_rate=0.25, reduction_loc=(0,), equal_weight=True, cluster_iters=0)
    tokens = model.embed(images)[:, 1:]
    first = int(torch.randint(36, (1,), generator=torch.Generator().manual_seed(0)))
    _, got = model.reduce(0, tokens, first_stage_context(model, tokens))
    dist = torch.cdist(tokens, tokens)
    for b in range(3):
        chosen = [first]
        while len(chosen) < 9:
            far = [
                0.0 if i in chosen else max(torch.cdist(tokens, tokens[:, chosen])[b, i].tolist()) for i in range(36)
            ]
            chosen.append(max(range(36), key=lambda i: far[i]))
        assert got["centres"][b].tolist() == chosen
        assert got["assignment"][b].tolist() == dist[b][:, chosen].argmin(dim=1).tolist()


def test_converting_between_methods_keeps_no_stale_setting(images):
    vit = tiny_vit()
    KMedoidsViT.from_vit(vit, keep_rate=RATE, reduction_loc=(0,), equal_weight=True)
    with pytest.raises(ValueError, match="block 0 has none"):
        KMedoidsViT.from_vit(vit, keep_rate=RATE, reduction_loc=(0,))
    model = DPCKNNViT.from_vit(KMedoidsViT.from_vit(vit, reduction_loc=LOC), keep_rate=RATE, reduction_loc=(0,))
    assert model.predict_with_counts(images)[1][0, 0, 0] == 22  # 21 patch tokens from block 0 on


def test_kmedoids_masks_mark_the_medoids(images):
    model = KMedoidsViT.from_vit(tiny_vit(), keep_rate=RATE, reduction_loc=(1, 3))
    _, masks = model.predict_with_masks(images)
    _, assignments = model.predict_with_assignments(images)
    first = torch.zeros(3, 36, dtype=torch.bool).scatter_(1, assignments[0]["centres"], True)
    assert torch.equal(masks[0], first)
    assert not (masks[1] & ~masks[0]).any()  # a later medoid is an earlier one


def test_block_with_attention_is_the_block():
    block = tiny_vit().blocks[0]
    x = torch.randn(2, 37, 64)
    out, probs = block_with_attention(block, x)
    torch.testing.assert_close(out, block(x))
    torch.testing.assert_close(probs, attention_probs(block, x))


@pytest.mark.parametrize(("cls", "params"), [(KMedoidsViT, {}), (DPCKNNViT, {"k_neighbors": 3})])
def test_keep_rate_that_leaves_no_token_is_refused_with_the_lowest_rate_that_works(cls, params):
    with pytest.raises(ValueError, match=r"keeps int\(36 \* 0.1\^3\) = 0 .*at least 0.303"):
        cls.from_vit(tiny_vit(), keep_rate=0.1, reduction_loc=LOC, **params)
    model = cls.from_vit(tiny_vit(), keep_rate=0.303, reduction_loc=LOC, **params)
    assert model.keep_counts == [10, 3, 1]  # int(36 · 0.303³) = 1


@pytest.mark.parametrize(
    ("cls", "params", "match"),
    [
        (KMedoidsViT, dict(reduction_loc=(0, 2)), "block 0 has none: start reduction_loc at block 1"),
        (KMedoidsViT, dict(reduction_loc=(2, 1)), "strictly increasing"),
        (KMedoidsViT, dict(reduction_loc=(1, 4)), "must index blocks 0..3"),
        (KMedoidsViT, dict(cluster_iters=-1), "cluster_iters must be a non-negative int"),
        (DPCKNNViT, dict(keep_rate=0.2, reduction_loc=(1, 2), k_neighbors=8), "use k_neighbors <= 7"),
        (DPCKNNViT, dict(keep_rate=1.5), r"keep_rate must be a number in \(0, 1\]"),
    ],
)
def test_bad_parameters_are_refused_and_leave_the_vit_usable(cls, params, match, images):
    vit = tiny_vit()
    with pytest.raises(ValueError, match=match):
        cls.from_vit(vit, **params)
    assert type(vit) is VisionTransformer
    assert vit(images).shape == (3, 10)


@pytest.mark.parametrize("cls", [KMedoidsViT, DPCKNNViT])
def test_a_vit_without_class_token_clusters_all_its_tokens(cls, images):
    vit = tiny_vit(class_token=False, global_pool="avg")
    model = cls.from_vit(vit, keep_rate=RATE, reduction_loc=LOC)
    logits, counts = model.predict_with_counts(images)
    assert logits.shape == (3, 10)
    assert counts[0, :, 0].tolist() == [36, 21, 12, 7]  # no prefix token to add


def test_patch_assignment_follows_stages_back_to_patches():
    stage0 = {"centres": torch.tensor([[0, 1, 3]]), "assignment": torch.tensor([[0, 1, 1, 2]])}
    stage1 = {"weights": torch.tensor([[[0.1, 0.9, 0.2], [0.9, 0.1, 0.8]]])}  # inputs 0, 2 → output 1; 1 → 0
    assert patch_assignment([stage0, stage1], 0).tolist() == [[0, 1, 1, 2]]
    assert patch_assignment([stage0, stage1], 1).tolist() == [[1, 0, 0, 1]]
    with pytest.raises(ValueError, match="stage must be in 0..1"):
        patch_assignment([stage0, stage1], 2)


def test_cluster_purity_counts_digit_patches_in_digit_majority_clusters():
    token = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 2, 0, 1, 2]])
    digit = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    purity = cluster_purity(token, digit, 3)
    # Image 0: cluster 0 has 2 digit patches of 3 (a majority), cluster 1 has 1 of 2 (not strictly more).
    assert purity[0].item() == pytest.approx(2 / 3)
    assert purity[1].isnan()


@pytest.mark.parametrize(("name", "cls", "learned"), [("kmedoids", KMedoidsViT, False), ("dpcknn", DPCKNNViT, True)])
def test_registry_builds_each_method_with_its_defaults(name, cls, learned, images):
    method = get(name)
    vit = tiny_vit()
    model = method.build(vit, **method.default_params(vit))
    assert isinstance(model, cls) and method.learned is learned and "assignments" in method.reports
    assert model.keep_rate == 0.7 and model.reduction_loc == (1, 2, 3)
