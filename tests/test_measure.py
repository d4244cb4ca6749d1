"""FLOPs against docs/reference.md, parameter counts, and what measure_throughput leaves behind."""

from __future__ import annotations

import pytest
import torch

from dynvit import count_flops, count_params, create_student, create_teacher, measure_throughput
from tests.conftest import TINY, TINY_LOC

NAME = "deit_tiny_patch16_224"

# fvcore GFLOPs of the reference model definitions at 224 (docs/reference.md, "FLOPs").
DEIT_S_STUDENT_GFLOPS = {0.9: 4.050, 0.8: 3.471, 0.7: 2.988, 0.5: 2.234}
DEIT_S_GFLOPS = 4.608
DEIT_B_STUDENT_07_GFLOPS = 11.489


def student(keep_ratio: float = 0.7, **kwargs):
    return create_student(NAME, keep_ratio=keep_ratio, pruning_loc=TINY_LOC, **{**TINY, **kwargs})


def test_flops_match_the_reference_deit() -> None:
    # weight_init="skip": the count does not depend on the values, and skipping init saves seconds.
    model = create_student("deit_small_patch16_224", weight_init="skip")
    for keep_ratio, expected in DEIT_S_STUDENT_GFLOPS.items():
        model.keep_ratio = keep_ratio
        assert count_flops(model) == pytest.approx(expected, rel=0.01), keep_ratio
    assert count_flops(create_teacher("deit_small_patch16_224", weight_init="skip")) == pytest.approx(
        DEIT_S_GFLOPS, rel=0.01
    )
    deit_b = create_student("deit_base_patch16_224", keep_ratio=0.7, weight_init="skip")
    assert count_flops(deit_b) == pytest.approx(DEIT_B_STUDENT_07_GFLOPS, rel=0.01)


def test_flops_fall_with_the_keep_ratio() -> None:
    model = student(1.0)
    flops = []
    for keep_ratio in (1.0, 0.9, 0.7, 0.5, 0.3):
        model.keep_ratio = keep_ratio
        flops.append(count_flops(model))
    assert all(a > b for a, b in zip(flops, flops[1:], strict=False)), flops
    # At ρ = 1 nothing is dropped: the student costs the teacher plus its predictors.
    assert flops[0] > count_flops(create_teacher(NAME, **TINY))


@pytest.mark.parametrize("factory", [lambda: create_teacher(NAME, **TINY), lambda: student(0.7)])
def test_fused_and_unfused_attention_count_the_same(factory) -> None:
    model = factory()
    assert all(blk.attn.fused_attn for blk in model.blocks)
    fused = count_flops(model)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    assert count_flops(model) == pytest.approx(fused, rel=1e-9)


def test_count_flops_restores_train_mode() -> None:
    model = student(0.7).train()
    train_count = count_flops(model)
    assert model.training
    # Counted in eval mode (pruned) whatever mode the model was in.
    assert train_count == count_flops(model.eval()) == count_flops(model, img_size=TINY["img_size"])


def test_a_model_that_does_not_say_its_input_size_is_refused_by_name() -> None:
    # A plain module neither has a patch embedding nor timm's config: what to do instead, not AttributeError.
    for measure in (count_flops, measure_throughput):
        with pytest.raises(TypeError, match=r"cannot tell what images a Sequential takes.*build it with timm"):
            measure(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 3)))


def test_count_params_adds_exactly_the_predictors() -> None:
    C = TINY["embed_dim"]
    # LayerNorm, C→C, C→C/2, C/2→C/4, C/4→2, with biases, per stage.
    per_predictor = 2 * C + (C * C + C) + (C * C // 2 + C // 2) + (C // 2 * C // 4 + C // 4) + (C // 4 * 2 + 2)
    extra = count_params(student()) - count_params(create_teacher(NAME, **TINY))
    assert extra * 1e6 == pytest.approx(len(TINY_LOC) * per_predictor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measure_throughput_returns_images_per_second_and_restores_the_model(dtype: torch.dtype) -> None:
    model = student(0.7).train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    speed = measure_throughput(model, batch_size=2, pairs=2, dtype=dtype)
    assert isinstance(speed, float) and speed > 0
    assert model.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs", [dict(pairs=0), dict(batch_size=0)])
def test_measure_throughput_rejects_empty_measurements(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"(batch_size|pairs) must be >= 1, got 0"):
        measure_throughput(student(), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measure_throughput_on_cuda_moves_the_model_back() -> None:
    model = student(0.7).train()
    assert measure_throughput(model, batch_size=2, pairs=2, device="cuda") > 0
    assert model.training and all(p.device.type == "cpu" for p in model.parameters())


def test_counting_flops_leaves_the_callers_random_stream_where_it_was() -> None:
    from dynvit.reducers.cost import TokenCost

    model = create_teacher(NAME, **TINY)
    for measure in (count_flops, TokenCost.from_model):
        torch.manual_seed(0)
        expected = torch.rand(3)
        torch.manual_seed(0)
        measure(model)
        assert torch.equal(torch.rand(3), expected), measure


def test_a_model_on_the_meta_device_is_refused_by_name_and_left_as_it_was() -> None:
    from dynvit.reducers.cost import TokenCost

    with torch.device("meta"):
        model = create_teacher(NAME, **TINY).train()
    for measure in (count_flops, measure_throughput, TokenCost.from_model):
        with pytest.raises(ValueError, match=r"meta device.*to_empty"):
            measure(model)
        assert model.training


@pytest.mark.parametrize("kwargs", [dict(dtype=torch.int8), dict(device="nodevice")])
def test_measure_throughput_refuses_what_it_would_not_time_as_asked(kwargs: dict) -> None:
    # int8 was timed as float32 without a word; a device torch cannot use failed inside torch.
    with pytest.raises(ValueError, match=r"dtype must be torch.float32|not a device torch knows"):
        measure_throughput(create_teacher(NAME, **TINY), batch_size=1, pairs=1, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_speed_settings_on_a_missing_gpu_say_so_before_any_model_moves() -> None:
    from dynvit.measure import SpeedSettings

    with pytest.raises(ValueError, match=r"no GPU that torch can use.*use cpu"):
        SpeedSettings(device="cuda")
