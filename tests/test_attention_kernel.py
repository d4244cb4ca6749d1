"""The per-shape attention kernel (dynvit.models.attention_kernel): every choice computes the fused attention."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention

from dynvit import create_student, create_teacher
from dynvit.models import attention_kernel
from dynvit.models.attention_kernel import (
    attend,
    chosen_kernels,
    clear_chosen_kernels,
    kernel_for,
    math_attention,
    set_attention_kernel,
    use_attention_kernel,
)
from dynvit.reducers import apply_reducer

from .conftest import TINY, TINY_LOC


@pytest.fixture(autouse=True)
def _fresh_choices():
    clear_chosen_kernels()
    yield
    clear_chosen_kernels()


def qkv(*shape: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(*shape, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("tokens", [22, 45, 65])
@pytest.mark.parametrize("biased", [False, True])
def test_math_attention_equals_sdpa(tokens: int, biased: bool):
    q, k, v = qkv(2, 4, tokens, 32)
    # ToMe's bias: log(size) per key, broadcast over heads and queries.
    bias = torch.rand(2, 1, 1, tokens).add(0.5).log() if biased else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    explicit = (q @ k.transpose(-2, -1) / 32**0.5 + (0 if bias is None else bias)).softmax(-1) @ v
    assert torch.allclose(expected, explicit, atol=1e-5)
    assert torch.allclose(math_attention(q, k, v, 32**-0.5, bias), expected, atol=1e-5)
    for kernel in ("sdpa", "math", "auto"):
        with use_attention_kernel(kernel):
            assert torch.allclose(attend(q, k, v, 32**-0.5, bias), expected, atol=1e-5)


def test_math_attention_softmax_in_float32_for_bfloat16():
    q, k, v = qkv(1, 2, 40, 32, dtype=torch.bfloat16)
    out = math_attention(q, k, v, 32**-0.5)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, atol=2e-2)


def slowed(function, seconds: float):
    def slow(*args):
        time.sleep(seconds)
        return function(*args)

    return slow


@pytest.mark.parametrize("slow", ["sdpa", "math"])
def test_auto_measures_once_per_shape_and_keeps_the_faster(monkeypatch, slow: str):
    # A 20 ms handicap on one kernel of a ~10 µs attention: the other one must win.
    kernels = dict(attention_kernel._KERNEL_FUNCTIONS)
    kernels[slow] = slowed(kernels[slow], 0.02)
    monkeypatch.setattr(attention_kernel, "_KERNEL_FUNCTIONS", kernels)
    measured = []
    original = attention_kernel._measure

    def counting(*args):
        measured.append(tuple(args[0].shape))
        return original(*args)

    monkeypatch.setattr(attention_kernel, "_measure", counting)
    fast = "math" if slow == "sdpa" else "sdpa"
    with use_attention_kernel("auto"), torch.no_grad():
        for tokens in (22, 45, 22, 45, 22):
            q, k, v = qkv(1, 2, tokens, 16)
            assert kernel_for(q, k, v, 0.25) == fast
    assert measured == [(1, 2, 22, 16), (1, 2, 45, 16)]
    assert sorted(chosen_kernels().values()) == [fast, fast]


def test_sdpa_wherever_the_choice_cannot_be_made(monkeypatch):
    q, k, v = qkv(1, 2, 30, 16)
    with use_attention_kernel("math"):
        assert kernel_for(q, k, v, 0.25) == "math"
        # Gradients, jit tracing and scores too large to materialise keep the fused kernel.
        assert kernel_for(q.requires_grad_(), k, v, 0.25) == "sdpa"
        monkeypatch.setattr(attention_kernel, "MAX_MATH_BYTES", 30 * 30 * 2 * 4 - 1)
        assert kernel_for(q.detach(), k, v, 0.25) == "sdpa"
    q, k, v = qkv(1, 2, 30, 16)
    with use_attention_kernel("math"):
        traced = torch.jit.trace(lambda q, k, v: attend(q, k, v, 0.25), (q, k, v))
    assert "scaled_dot_product_attention" in str(traced.graph)
    assert chosen_kernels() == {}


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="one of \\['auto', 'sdpa', 'math'\\]"):
        set_attention_kernel("flash")


def test_pruned_and_reduced_models_compute_the_fused_outputs_on_every_kernel():
    """A DynamicViT student, ToMe (proportional attention: a key bias) and EViT on the tiny ViT: the same
    logits whichever kernel runs their attention, and the same kept tokens."""
    torch.manual_seed(0)
    teacher = create_teacher("deit_small_patch16_224", **TINY).eval()
    student = create_student("deit_small_patch16_224", keep_ratio=0.7, pruning_loc=TINY_LOC, **TINY)
    student.load_state_dict(teacher.state_dict(), strict=False)
    for predictor in student.score_predictor:
        torch.nn.init.normal_(predictor.out_conv[-2].weight, std=1.0)  # spread-out keep scores: no near ties
    models = {
        "student": student.eval(),
        "tome": apply_reducer(copy.deepcopy(teacher), "tome", r=8).eval(),
        "evit": apply_reducer(copy.deepcopy(teacher), "evit", keep_rate=0.7, pruning_loc=TINY_LOC).eval(),
    }
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for name, model in models.items():
            with use_attention_kernel("sdpa"):
                fused, fused_masks = model.predict_with_masks(x)
            for kernel in ("math", "auto"):
                with use_attention_kernel(kernel):
                    logits, masks = model.predict_with_masks(x)
                assert torch.allclose(logits, fused, atol=1e-5), (name, kernel)
                assert all(torch.equal(a, b) for a, b in zip(masks, fused_masks, strict=True)), (name, kernel)


class FakeClock:
    """``time.perf_counter`` that advances by the duration the kernel just called declared."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def kernel(self, seconds: float):
        def run(q, k, v, scale, bias):
            self.now += seconds
            return q

        return run


@pytest.mark.parametrize(
    ("sdpa_s", "math_s", "chosen"),
    [
        (200e-6, 150e-6, "math"),  # 25 % and 50 µs faster
        (20e-6, 15e-6, "sdpa"),  # 25 % faster but 5 µs: inside a forward that is noise or a loss
        (200e-6, 195e-6, "sdpa"),  # 5 µs and only 2.5 %
    ],
)
def test_math_must_win_by_a_margin_and_an_absolute_saving(monkeypatch, sdpa_s: float, math_s: float, chosen: str):
    clock = FakeClock()
    monkeypatch.setattr(attention_kernel.time, "perf_counter", clock)
    kernels = {"sdpa": clock.kernel(sdpa_s), "math": clock.kernel(math_s)}
    monkeypatch.setattr(attention_kernel, "_KERNEL_FUNCTIONS", kernels)
    q, k, v = qkv(1, 2, 30, 16)
    assert attention_kernel._measure(q, k, v, 0.25, None) == chosen


@pytest.mark.parametrize("kernel", ["sdpa", "math"])
def test_kernel_attention_is_timms_attention_where_sdpa_is_planned(monkeypatch, kernel: str):
    """With SDPA planned for its shape a converted attention runs timm's own forward (bit for bit); with the
    math planned, the explicit formula (equal to rounding). The plan is read from the shape of x before
    any query exists, and auto measures an unknown shape on its first call, then reuses the choice."""
    torch.manual_seed(0)
    student = create_student("deit_small_patch16_224", keep_ratio=0.7, pruning_loc=TINY_LOC, **TINY).eval()
    attention = student.blocks[0].attn
    timm_attention = copy.deepcopy(attention)
    timm_attention.__class__ = Attention
    x = torch.randn(2, 17, attention.qkv.in_features)
    with torch.no_grad():
        expected = timm_attention(x)
        with use_attention_kernel(kernel):
            out = attention(x)
    if kernel == "sdpa":
        assert torch.equal(out, expected)
    else:
        assert torch.allclose(out, expected, atol=1e-5) and not torch.equal(out, expected)
    # auto: one measurement for the shape (made to pick this kernel), then the cached plan.
    fast = kernel
    monkeypatch.setattr(attention_kernel, "_measure", lambda *args: fast)
    shape = torch.Size((2, attention.num_heads, 17, attention.head_dim))
    with use_attention_kernel("auto"), torch.no_grad():
        assert attention_kernel.planned_kernel(shape, shape, x.dtype, x.device, needs_grad=False) is None
        out = attention(x)
        assert attention_kernel.planned_kernel(shape, shape, x.dtype, x.device, needs_grad=False) == fast
        assert torch.allclose(out, expected, atol=1e-5)
    assert list(chosen_kernels().values()) == [fast]
