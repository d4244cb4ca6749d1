"""TokenReduction's learned soft mergers: PatchMerger, Sinkhorn and SiT, on tiny ViTs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dynvit import load_checkpoint
from dynvit.methods import get
from dynvit.reducers.clustering import ClusteringViT
from dynvit.reducers.patchmerger import PatchMergerViT
from dynvit.reducers.sinkhorn import SinkhornViT
from dynvit.reducers.sit import SiTViT

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=10)
N = 16  # patch tokens of the tiny ViT
LOC = (1, 2, 3)
RATE = 0.7  # int(16 · 0.7^s): 11, 7, 5
METHODS = {"patchmerger": PatchMergerViT, "sinkhorn": SinkhornViT, "sit": SiTViT}


def tiny_vit(**kwargs) -> VisionTransformer:
    return VisionTransformer(**{**TINY, **kwargs}).eval()


def build(method: str, **params) -> ClusteringViT:
    torch.manual_seed(1)
    return METHODS[method].from_vit(tiny_vit(), **{"keep_rate": RATE, "reduction_loc": LOC, **params}).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def softmax(s: torch.Tensor, dim: int) -> torch.Tensor:
    e = (s - s.amax(dim=dim, keepdim=True)).exp()
    return e / e.sum(dim=dim, keepdim=True)


def explicit_merge(method: str, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One stage written out from the reference's description: merged tokens (B, K, C), weights (B, K, N)."""
    if method == "patchmerger":
        normed = layer_norm(x, layer.norm)
        weights = softmax(torch.einsum("kc,bnc->bkn", layer.queries, normed), dim=2)
        return torch.einsum("bkn,bnc->bkc", weights, normed), weights
    if method == "sit":
        mlp = layer.weight
        hidden = F.gelu(layer_norm(x, mlp[0]) @ mlp[1].weight.T + mlp[1].bias)
        scores = (hidden @ mlp[3].weight.T + mlp[3].bias) * layer.scale.reshape(())
        weights = softmax(scores, dim=1).transpose(1, 2)
        return torch.einsum("bkn,bnc->bkc", weights, x), weights
    # Sinkhorn in the probability domain, in float64: row and column mass 1/(K + N), u from the rows first.
    unit_x = x.double() / x.double().norm(dim=-1, keepdim=True)
    centres = layer.v.double() / layer.v.double().norm(dim=-1, keepdim=True)
    kernel = torch.einsum("kc,bnc->bkn", centres, unit_x).div(layer.eps).exp()
    k, n = kernel.shape[1:]
    mass = 1.0 / (k + n)
    u, v = torch.ones_like(kernel[:, :, 0]), torch.ones_like(kernel[:, 0, :])
    for _ in range(layer.iters):
        u = mass / torch.einsum("bkn,bn->bk", kernel, v)
        v = mass / torch.einsum("bkn,bk->bn", kernel, u)
    weights = u[:, :, None] * kernel * v[:, None, :] * (k + n)
    return torch.einsum("bkn,bnc->bkc", weights, unit_x).float(), weights.float()


def explicit_forward(method: str, model: ClusteringViT, images: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Logits and per-stage weights of the reference's loop: merge the patch tokens before each LOC block."""
    x, weights = model.embed(images), []
    for i, block in enumerate(model.blocks):
        if i in LOC:
            merged, w = explicit_merge(method, model.cluster_layers[LOC.index(i)], x[:, 1:])
            x = torch.cat([x[:, :1], merged], dim=1)
            weights.append(w)
        x = block(x)
    return model.head(model.norm(x)[:, 0]), weights


@pytest.mark.parametrize("method", METHODS)
def test_logits_and_weights_follow_the_explicit_computation(method, images):
    model = build(method)
    if method == "sit":  # away from its init (scale 1, tiny scores), so a wrong scale or axis shows
        with torch.no_grad():
            for layer in model.cluster_layers:
                layer.scale.fill_(30.0)
    logits, assignments = model.predict_with_assignments(images)
    with torch.no_grad():
        expected_logits, expected_weights = explicit_forward(method, model, images)
    assert torch.allclose(logits, expected_logits, atol=1e-4 * expected_logits.abs().max().item())
    for got, expected in zip(assignments, expected_weights, strict=True):
        assert set(got) == {"weights"}
        assert torch.allclose(got["weights"], expected, atol=2e-5)


@pytest.mark.parametrize("method", METHODS)
def test_counts_and_weight_shapes_per_stage(method, images):
    model = build(method)
    keeps = [int(N * RATE ** (s + 1)) for s in range(3)]
    assert keeps == [11, 7, 5]
    _, counts = model.predict_with_counts(images)
    expected = [1 + N] + [1 + k for k in keeps]  # the class token stays in front
    assert counts.shape == (3, 4, 2)
    assert counts[:, :, 0].tolist() == [expected] * 3 and counts[:, :, 1].tolist() == [expected] * 3
    _, assignments = model.predict_with_assignments(images)
    assert [tuple(a["weights"].shape) for a in assignments] == [(3, 11, 16), (3, 7, 11), (3, 5, 7)]
    for a in assignments:
        w = a["weights"]
        assert bool((w >= 0).all())
        if method == "sinkhorn":  # the scaled plan's columns each carry one token after the last round
            assert torch.allclose(w.sum(dim=1), torch.ones_like(w[:, 0]), atol=1e-5)
        else:  # each output token is a convex combination of the inputs
            assert torch.allclose(w.sum(dim=2), torch.ones_like(w[:, :, 0]), atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_every_learned_parameter(method, images):
    model = build(method).train()
    model(images).logsumexp(dim=-1).sum().backward()
    learned = {k: p for k, p in model.named_parameters() if k.startswith("cluster_layers.")}
    assert learned
    for name, p in learned.items():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_sinkhorn_forward_writes_no_parameter_and_backward_leaves_unit_centres(images):
    model = build("sinkhorn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.allclose(model.cluster_layers[0].v.norm(dim=-1), torch.ones(11))
    logits, assignments = model.predict_with_assignments(images)
    model.train()
    model(images)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    # The gradient reaching v is the gradient with respect to the unit centres (the reference's
    # normalisation runs under no_grad), and v is unit afterwards, with the same function.
    layer = model.cluster_layers[0]
    tokens = model.embed(images)
    for block in model.blocks[:1]:
        tokens = block(tokens)
    unit = F.normalize(layer.v.detach(), dim=-1).requires_grad_()
    reference, _ = explicit_merge("sinkhorn", layer, tokens.detach()[:, 1:])
    probe = torch.randn_like(reference)  # a plain sum would be constant: every column of the plan sums to 1
    explicit = torch.einsum("bkn,bnc->bkc", *_sinkhorn_with(layer, unit, tokens.detach()[:, 1:]))
    (explicit * probe).sum().backward()
    merged, _ = layer(tokens.detach()[:, 1:])
    assert torch.allclose(merged, reference, atol=1e-5)
    (merged * probe).sum().backward()
    assert unit.grad.abs().max() > 1e-3
    assert torch.allclose(layer.v.grad, unit.grad, atol=1e-5 * unit.grad.abs().max().item())
    assert torch.allclose(layer.v.norm(dim=-1), torch.ones(11), atol=1e-6)
    again, _ = model.eval().predict_with_assignments(images)
    assert torch.allclose(again, logits, atol=1e-6)


def _sinkhorn_with(layer: nn.Module, centres: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinkhorn weights (B, K, N) and unit tokens (B, N, C) for given unit centres, differentiable in them."""
    unit_x = F.normalize(x, dim=-1)
    z = torch.einsum("kc,bnc->bkn", centres, unit_x) / layer.eps
    k, n = z.shape[1:]
    log_mass = -math.log(k + n)
    u, v = torch.zeros_like(z[:, :, 0]), torch.zeros_like(z[:, 0, :])
    for _ in range(layer.iters):
        u = log_mass - torch.logsumexp(z + v[:, None, :], dim=2)
        v = log_mass - torch.logsumexp(z + u[:, :, None], dim=1)
    return (z + u[:, :, None] + v[:, None, :] - log_mass).exp(), unit_x


# The reference's sub-module names under cluster_layers.{s} (TokenReduction models/*.py).
REFERENCE_KEYS = {
    "patchmerger": ["norm.weight", "norm.bias", "queries"],
    "sinkhorn": ["v"],
    "sit": [
        "weight.0.weight",
        "weight.0.bias",
        "weight.1.weight",
        "weight.1.bias",
        "weight.3.weight",
        "weight.3.bias",
        "scale",
    ],
}


@pytest.mark.parametrize("method", METHODS)
def test_reference_layout_loads_strictly_and_plain_vit_checkpoint_starts_at_init(method, tmp_path, images):
    torch.manual_seed(3)
    backbone = tiny_vit().state_dict()
    keeps = [11, 7, 5]
    shapes = {
        "norm.weight": lambda k: (64,),
        "norm.bias": lambda k: (64,),
        "queries": lambda k: (k, 64),
        "v": lambda k: (k, 64),
        "weight.0.weight": lambda k: (64,),
        "weight.0.bias": lambda k: (64,),
        "weight.1.weight": lambda k: (32, 64),
        "weight.1.bias": lambda k: (32,),
        "weight.3.weight": lambda k: (k, 32),
        "weight.3.bias": lambda k: (k,),
        "scale": lambda k: (1, 1, 1),
    }
    reference = dict(backbone)
    for s, k in enumerate(keeps):
        for key in REFERENCE_KEYS[method]:
            reference[f"cluster_layers.{s}.{key}"] = torch.randn(shapes[key](k))
    torch.save({"model": reference}, tmp_path / "reference.pth")
    model = build(method)
    report = load_checkpoint(model, tmp_path / "reference.pth", strict=True)
    assert report.missing == [] and report.unexpected == []
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())

    torch.save(backbone, tmp_path / "plain.pth")
    fresh = build(method)
    init = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("cluster_layers.")}
    report = load_checkpoint(fresh, tmp_path / "plain.pth", strict=True)
    assert sorted(report.missing) == sorted(init)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in init.items())


def test_new_modules_start_at_the_reference_init():
    torch.manual_seed(0)
    vit = VisionTransformer(**{**TINY, "embed_dim": 384, "num_heads": 6})
    merger = PatchMergerViT.from_vit(vit, keep_rate=0.9, reduction_loc=(1,)).cluster_layers[0]
    assert merger.norm.eps == 1e-5 and torch.equal(merger.norm.weight, torch.ones(384))
    assert abs(merger.queries.std().item() - 1.0) < 0.05  # standard normal, untouched by the ViT init
    centres = SinkhornViT.from_vit(vit, keep_rate=0.9, reduction_loc=(1,)).cluster_layers[0].v
    assert abs(centres.std().item() - 1.0) < 0.05
    slim = SiTViT.from_vit(vit, keep_rate=0.9, reduction_loc=(1,)).cluster_layers[0]
    norm, first, _, last = slim.weight
    assert norm.eps == 1e-5 and first.out_features == 192 and last.out_features == int(16 * 0.9)
    # timm truncates at ±2 absolute, so in effect a normal with std 0.02, not PyTorch's default uniform.
    assert abs(first.weight.std().item() - 0.02) < 0.002 and abs(last.weight.std().item() - 0.02) < 0.002
    assert torch.equal(first.bias, torch.zeros(192)) and torch.equal(slim.scale, torch.ones(1, 1, 1))


def test_patchmerger_runs_unfused_attention_unless_asked():
    assert not any(block.attn.fused_attn for block in build("patchmerger").blocks)
    fused = build("patchmerger", fused_attention=True)
    assert all(block.attn.fused_attn for block in fused.blocks) and fused.fused_attention


@pytest.mark.parametrize("method", METHODS)
def test_a_vit_without_class_token_merges_all_its_tokens(method, images):
    torch.manual_seed(1)
    vit = tiny_vit(class_token=False, global_pool="avg")
    model = METHODS[method].from_vit(vit, keep_rate=RATE, reduction_loc=LOC)
    _, counts = model.predict_with_counts(images)
    assert counts[0, :, 0].tolist() == [16, 11, 7, 5]


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("patchmerger", dict(keep_rate=0.1), "raise keep_rate"),
        ("sit", dict(keep_rate=0.0), "keep_rate"),
        ("sinkhorn", dict(sinkhorn_eps=0.0), "sinkhorn_eps must be a positive number"),
        ("sinkhorn", dict(cluster_iters=0), "cluster_iters must be an integer of at least 1"),
        ("patchmerger", dict(fused_attention="yes"), "fused_attention must be True or False"),
    ],
)
def test_bad_parameters_are_refused(method, params, message):
    with pytest.raises(ValueError, match=message):
        build(method, **params)


@pytest.mark.parametrize("method", METHODS)
def test_registered_with_defaults_that_build(method, images):
    record = get(method)
    assert record.learned and record.build == METHODS[method].from_vit
    assert {"counts", "assignments"} <= record.reports
    vit = VisionTransformer(**{**TINY, "depth": 12})
    params = record.default_params(vit)
    assert params["keep_rate"] == 0.7 and params["reduction_loc"] == (3, 6, 9)
    model = record.build(vit, **params)
    _, counts = model.predict_with_counts(images)
    assert counts[0, :, 0].tolist() == [17] * 3 + [12] * 3 + [8] * 3 + [6] * 3  # int(16 · 0.7^s) + 1
