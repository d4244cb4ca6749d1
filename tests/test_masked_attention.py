"""Masked attention: the recomputing autograd Function against the plain formula, its memory, and
the pruned eval forward under torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch.autograd.graph import saved_tensors_hooks

from dynvit import create_student, measure_throughput
from dynvit.models.masked_attention import (
    MaskedAttention,
    make_block_maskable,
    masked_softmax,
    set_keep_gradient,
    set_recompute,
)
from dynvit.models.masked_attention_function import masked_attention

B, H, N, D = 2, 3, 13, 8
SCALE = D**-0.5
PRUNING_LOC = (1, 2, 3)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The reference formula through autograd: what the Function must reproduce."""
    return masked_softmax((q * SCALE) @ k.transpose(-2, -1), keep) @ v.to(torch.promote_types(v.dtype, torch.float32))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_keep(kind: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A keep mask (B, N) and the leaf tensor its gradient is taken against."""
    if kind == "gumbel":
        # As in training: hard 0/1 forward, gradient to the predictor's scores (straight-through).
        logits = torch.randn(B, N, 2, dtype=dtype, requires_grad=True)
        keep = F.gumbel_softmax(logits, hard=True)[..., 0]
        return keep, logits
    values = {"random": (torch.rand(B, N) > 0.5).float(), "dropped": torch.zeros(B, N), "kept": torch.ones(B, N)}
    leaf = values[kind].to(dtype).requires_grad_()
    return leaf, leaf


def qkv(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.randn(B, H, N, D, dtype=dtype, requires_grad=True) for _ in range(3)]


def grads(out: torch.Tensor, leaves: list[torch.Tensor], seed: int = 1) -> tuple[torch.Tensor, ...]:
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, leaves, upstream, retain_graph=True)


@pytest.mark.parametrize("kind", ["random", "kept", "dropped", "gumbel"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_function_matches_plain_formula_float32(kind: str, chunk_size: int | None) -> None:
    q, k, v = qkv()
    keep, leaf = make_keep(kind)
    out = masked_attention(q, k, v, keep, SCALE, chunk_size=chunk_size)
    ref = plain_attention(q, k, v, keep)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-3
    got, want = grads(out, [q, k, v, leaf]), grads(ref, [q, k, v, leaf])
    # With every token dropped each query sees only itself, and dq, dk are eps-sized: both float32
    # paths give rounding noise there (~1e-3 relative to float64), so float64 checks them below.
    checked = ("v", "keep") if kind == "dropped" else ("q", "k", "v", "keep")
    for name, a, b in zip(("q", "k", "v", "keep"), got, want, strict=True):
        if name in checked:
            assert rel_err(a, b) < 1e-3, name


@pytest.mark.parametrize("kind", ["random", "kept", "dropped", "gumbel"])
def test_function_matches_plain_formula_float64(kind: str) -> None:
    q, k, v = qkv(torch.float64)
    keep, leaf = make_keep(kind, torch.float64)
    out = masked_attention(q, k, v, keep, SCALE, chunk_size=5)
    ref = plain_attention(q, k, v, keep)
    assert rel_err(out, ref) < 1e-12
    for a, b in zip(grads(out, [q, k, v, leaf]), grads(ref, [q, k, v, leaf]), strict=True):
        assert rel_err(a, b) < 1e-9


def test_gradient_through_row_max_with_eps() -> None:
    # Every token dropped and one key scoring far above all others: each query's row max sits on a
    # key it may not see, the normaliser shrinks towards eps, and p depends on the max through eps.
    # Leaving out the max's gradient term makes dq wrong by ~100% here.
    q, k, v = (torch.randn(1, 1, 6, 4, dtype=torch.float64) for _ in range(3))
    k = k * 0.1
    k[..., 0, :] = 3 * q.mean(dim=2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    keep = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)
    out = masked_attention(q, k, v, keep, 4.0)
    ref = masked_softmax(4.0 * q @ k.transpose(-2, -1), keep) @ v
    for a, b in zip(grads(out, [q, k, v, keep]), grads(ref, [q, k, v, keep]), strict=True):
        assert rel_err(a, b) < 1e-9


def test_gradcheck_float64() -> None:
    q, k, v = (torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    # Soft values away from 0: finite differences of the mask are ill-conditioned at keep = 0.
    keep = torch.tensor([[1.0, 0.3, 0.7, 1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: masked_attention(*a, 0.6, chunk_size=2), (q, k, v, keep), fast_mode=True)


def test_autocast_bfloat16_computes_in_float32() -> None:
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in qkv())
    keep, _ = make_keep("random")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = masked_attention(q, k, v, keep, SCALE)
    assert out.dtype == torch.bfloat16
    # Reference: the same bf16 inputs through the float32 formula; only the output rounding differs.
    ref = plain_attention(q.float(), k.float(), v.float(), keep)
    assert rel_err(out, ref) < 1e-2
    dq, dk, dv, dkeep = grads(out.float(), [q, k, v, keep])
    assert (dq.dtype, dk.dtype, dv.dtype, dkeep.dtype) == (torch.bfloat16,) * 3 + (torch.float32,)


def test_bad_inputs_raise() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"keep must be \(B, N\)"):
        masked_attention(q, k, v, torch.ones(B, N + 1), SCALE)
    with pytest.raises(ValueError, match="matching B, H, N"):
        masked_attention(q, k[:, :, :-1], v, torch.ones(B, N), SCALE)
    with pytest.raises(ValueError, match="chunk_size"):
        masked_attention(q, k, v, torch.ones(B, N), SCALE, chunk_size=0)


def peaked_attention() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """float64 q, k, v where dropped key 3 scores far above every kept key of query 0, a keep mask
    and an upstream gradient."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 7, 4, generator=g, dtype=torch.float64).unbind(0)
    k[:, :, 3] = 3.0 * q[:, :, 0]
    keep = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    return [q, k, v], keep, torch.randn(1, 2, 7, 4, generator=g, dtype=torch.float64)


def test_secant_keep_gradient_is_the_change_keeping_a_dropped_token_makes() -> None:
    (q, k, v), keep, upstream = peaked_attention()

    def loss(mask: torch.Tensor, mode: str = "tangent") -> torch.Tensor:
        return (masked_attention(q, k, v, mask, 1.0, eps=0.0, keep_gradient=mode) * upstream).sum()

    def keep_grad(mode: str) -> torch.Tensor:
        leaf = keep.clone().requires_grad_()
        return torch.autograd.grad(loss(leaf, mode), leaf)[0][0]

    tangent, secant = keep_grad("tangent"), keep_grad("secant")
    for j in range(keep.shape[1]):
        if keep[0, j] == 1:
            assert secant[j] == pytest.approx(tangent[j].item(), rel=1e-12)
        else:
            flipped = keep.clone()
            flipped[0, j] = 1.0
            # Linear in the output, so the secant is exact: L(keep j) - L(drop j).
            assert secant[j] == pytest.approx((loss(flipped) - loss(keep)).item(), rel=1e-9)
    # The tangent at the dominant dropped key is orders of magnitude off the real change.
    assert tangent[3].abs() > 1e3 * secant[3].abs()


def test_secant_changes_only_the_keep_gradient() -> None:
    q, k, v = qkv()
    keep, leaf = make_keep("gumbel")
    by_mode = {
        mode: grads(masked_attention(q, k, v, keep, SCALE, keep_gradient=mode), [q, k, v, leaf])
        for mode in ("tangent", "secant")
    }
    for a, b in zip(by_mode["tangent"][:3], by_mode["secant"][:3], strict=True):
        assert torch.equal(a, b)
    assert not torch.allclose(by_mode["tangent"][3], by_mode["secant"][3])


def test_keep_gradient_choice_is_checked(tiny_kwargs: dict) -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="keep_gradient must be one of"):
        masked_attention(q, k, v, torch.ones(B, N), SCALE, keep_gradient="chord")
    student = create_student("vit_tiny_patch16_224", pruning_loc=PRUNING_LOC, **tiny_kwargs).train()
    with pytest.raises(ValueError, match="keep_gradient must be one of"):
        set_keep_gradient(student, "chord")
    assert set_keep_gradient(student, "secant") == tiny_kwargs["depth"]
    set_recompute(student, False)
    # The plain autograd formula only knows the tangent: say so instead of silently using it.
    with pytest.raises(ValueError, match="recomputing masked attention only"):
        student(torch.randn(2, 3, 32, 32))


def saved_shapes(fn) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd saves for backward while ``fn`` runs."""
    shapes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


@pytest.mark.parametrize(
    ("recompute", "attn_drop", "expect_square"), [(True, 0.0, False), (False, 0.0, True), (True, 0.1, True)]
)
def test_block_saves_no_square_tensor(recompute: bool, attn_drop: float, expect_square: bool) -> None:
    block = Block(dim=32, num_heads=2, attn_drop=attn_drop)
    make_block_maskable(block)
    block.attn.recompute = recompute
    x = torch.randn(B, N, 32, requires_grad=True)
    keep = make_keep("gumbel")[0]
    shapes = saved_shapes(lambda: block(x, keep=keep))
    # Attention dropout needs the weights themselves, so it falls back to the plain formula.
    assert any(s[-2:] == (N, N) for s in shapes) == expect_square, shapes


def test_student_step_same_with_and_without_recompute(tiny_kwargs: dict) -> None:
    student = create_student("vit_tiny_patch16_224", pruning_loc=PRUNING_LOC, **tiny_kwargs).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    results = []
    for recompute in (True, False):
        assert set_recompute(student, recompute) == tiny_kwargs["depth"]
        student.zero_grad()
        torch.manual_seed(3)  # the same Gumbel draws for both paths
        out = student(x)
        loss = F.cross_entropy(out.logits, y) + sum((d.mean() - 0.5) ** 2 for d in out.decisions)
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
        )
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and any(n.startswith("score_predictor") for n in grads_a)
    for name in grads_a:
        assert rel_err(grads_a[name], grads_b[name]) < 1e-3, name
    assert all(isinstance(b.attn, MaskedAttention) for b in student.blocks)


def test_pruned_eval_forward_compiles_as_one_graph(tiny_kwargs: dict) -> None:
    # fullgraph=True fails on any graph break: a .item(), a data-dependent shape or Python branching
    # on tensor values, i.e. on anything that would make the GPU wait for the host. The "eager"
    # backend captures the graph as inductor would but skips code generation, which takes minutes
    # on 2 CPU cores; the inductor run is checked in benchmarks/masked_attention.py.
    student = create_student("vit_tiny_patch16_224", pruning_loc=PRUNING_LOC, **tiny_kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(student, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        assert torch.allclose(compiled(x), student(x), atol=1e-5)


def test_measure_throughput_compile_and_channels_last(tiny_kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    student = create_student("vit_tiny_patch16_224", pruning_loc=PRUNING_LOC, **tiny_kwargs).train()
    compile_kwargs, calls = [], []

    def fake_compile(model, **kwargs):
        # Stands in for torch.compile (minutes on this CPU): records how it was asked and each call.
        compile_kwargs.append(kwargs)

        def run(x: torch.Tensor) -> torch.Tensor:
            calls.append(x.is_contiguous(memory_format=torch.channels_last))
            return model(x)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    ips = measure_throughput(student, batch_size=2, pairs=2, compile=True, channels_last=True)
    # Compiled once; every call (warm-up, which compiles, and the timed blocks) runs the compiled model.
    assert ips > 0 and compile_kwargs == [{"dynamic": False}] and len(calls) >= 4 and all(calls)
    # Mode and memory format are put back: the patch-embedding conv is contiguous again.
    assert student.training and student.patch_embed.proj.weight.is_contiguous()
