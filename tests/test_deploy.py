"""Deployment: quantized copies (bf16, int8 through torchao) and ONNX export checked in onnxruntime."""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from dynvit import create_student, create_teacher, export_onnx, quantize
from dynvit.data import ClutteredDigitsDataModule
from dynvit.deploy import ExportError, QuantizationError, compare_onnx, onnx_session, run_onnx
from dynvit.deploy.onnx import TIE_TOLERANCE, TOLERANCE, check_onnx
from dynvit.deploy.quantize import KEEP_FP32
from dynvit.files import staged
from dynvit.models.spatial_pruning import rank_locations
from dynvit.reducers import create_reduced
from tests.tiny_config import DIGITS

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10, in_chans=1)
LOC = (1, 2, 3)


# Tiny models gain nothing from a second intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def decisive(model: nn.Module) -> nn.Module:
    """Weights whose choices do not hinge on rounding, as a trained model's do not: a freshly initialised
    keep predictor scores every token within ~1e-6 of the others (any kernel change reorders the top-k),
    and a fresh head's logits are nearly equal. Random weights with spread-out scores and logits instead."""
    torch.manual_seed(0)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ("score_predictor" in name or name.split(".")[0] in ("head", "aux_head")):
            nn.init.normal_(module.weight, std=2.0 / module.in_features**0.5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # ConvNeXt's layer scales start at 1e-6: blocks would add nothing
                p.fill_(0.5)
    return model.eval()


def digits(n: int = 64) -> torch.Tensor:
    data = ClutteredDigitsDataModule(**{**DIGITS, "num_val": n, "batch_size": n, "train_samples_per_epoch": max(n, 32)})
    data.setup("validate")
    return next(iter(data.val_dataloader()))[0]


# Tiny hierarchical students on a 128-px canvas: stage 3 is 8×8 (64 locations), 4 blocks, predictors
# before blocks 1, 2, 3.
HIERARCHICAL = {
    "dynamiccnn": lambda: decisive(
        create_student(
            "convnext_digits", keep_ratio=0.7, num_classes=10, img_size=128, depths=(1, 1, 4, 1), dims=(8, 16, 32, 64)
        )
    ),
    "dynamicswin": lambda: decisive(
        create_student(
            "swin_digits", keep_ratio=0.7, num_classes=10, embed_dim=8, depths=(1, 1, 4, 1), num_heads=(1, 1, 1, 2)
        )
    ),
}


def canvas_digits(n: int = 64) -> torch.Tensor:
    """Validation digits on the hierarchical students' 128-px canvas (16-px digits)."""
    data = ClutteredDigitsDataModule(img_size=128, patch_size=16, digit_scale=2, num_val=n, batch_size=n)
    data.setup("validate")
    return next(iter(data.val_dataloader()))[0]


def vit_student() -> nn.Module:
    return decisive(create_student("vit_tiny_patch16_224", keep_ratio=0.7, pruning_loc=LOC, **TINY))


# --- quantize ---------------------------------------------------------------------------------------


def int8_layers(model: nn.Module) -> set[str]:
    """Names of the layers holding int8 weights: torchao's Int8Tensor in a Linear, or torch.ao's dynamic Linear."""
    return {
        name
        for name, m in model.named_modules()
        if (isinstance(m, nn.Linear) and type(m.weight).__name__ == "Int8Tensor")
        or type(m).__module__.startswith("torch.ao.nn.quantized.dynamic")
    }


@pytest.mark.parametrize(("precision", "int8_backend"), [("bf16", "auto"), ("int8", "torchao"), ("int8", "torch.ao")])
def test_a_quantized_student_predicts_what_the_float32_one_does(precision, int8_backend):
    """On a fixed batch of 64 digits, the quantized copy's top-1 class equals the float32 one's on at
    least 95 % of the images (61 of 64), and it keeps at least 95 % of the same tokens."""
    agreement = 0.95
    student = vit_student()
    x = digits()
    quantized = quantize(student, precision, int8_backend=int8_backend)
    with torch.inference_mode():
        logits, masks = student.predict_with_masks(x)
        q_logits, q_masks = quantized.predict_with_masks(x.to(torch.bfloat16 if precision == "bf16" else torch.float32))
    assert q_logits.shape == logits.shape
    assert (q_logits.float().argmax(-1) == logits.argmax(-1)).float().mean() >= agreement
    for q_mask, mask in zip(q_masks, masks, strict=True):
        assert ((q_mask & mask).sum() / mask.sum()).item() >= 0.95
    # A copy: the float32 student is untouched, and the copy prunes like it (same class, same keep ratio).
    assert all(type(p.data) is torch.Tensor and p.dtype == torch.float32 for p in student.parameters())
    assert type(quantized) is type(student) and quantized.keep_ratio == student.keep_ratio


@pytest.mark.parametrize("int8_backend", ["torchao", "torch.ao"])
def test_int8_quantizes_the_linear_layers_and_keeps_predictors_and_head_in_float32(int8_backend):
    student = vit_student()
    linears = {name for name, m in student.named_modules() if isinstance(m, nn.Linear)}
    quantized = quantize(student, "int8", int8_backend=int8_backend)
    kept = {name for name in linears if "score_predictor" in name or name == "head"}
    assert int8_layers(quantized) == linears - kept and len(kept) == 3 * 4 + 1
    assert all(type(quantized.get_submodule(name).weight.data) is torch.Tensor for name in kept)
    if int8_backend == "torchao":
        assert quantized.blocks[0].attn.qkv.weight.qdata.dtype == torch.int8
    else:  # fbgemm's packed weights, per output channel
        assert quantized.blocks[0].attn.qkv.weight().qscheme() == torch.per_channel_affine
    assert KEEP_FP32 == ("*score_predictor.*", "head", "head.*", "head_dist", "head_dist.*", "aux_head")
    everything = quantize(vit_student(), "int8", keep_fp32=(), int8_backend=int8_backend)
    assert "head" in int8_layers(everything)
    with torch.inference_mode():
        everything.keep_ratio = 0.5  # the keep ratio still moves
        assert everything(digits(4)).shape == (4, 10)


@pytest.mark.parametrize("int8_backend", ["torchao", "torch.ao"])
def test_int8_keeps_both_heads_of_a_distilled_deit_in_float32(int8_backend):
    deit = create_teacher("deit_tiny_distilled_patch16_224", **{**TINY, "depth": 2}).eval()
    quantized = quantize(deit, "int8", int8_backend=int8_backend)
    # timm names a distilled DeiT's heads ('head', 'head_dist') in its pretrained_cfg's classifier.
    assert deit.pretrained_cfg["classifier"] == ("head", "head_dist")
    assert not {"head", "head_dist"} & int8_layers(quantized) and "blocks.0.attn.qkv" in int8_layers(quantized)
    with torch.inference_mode():
        assert quantized(digits(2)).shape == (2, 10)


def test_int8_auto_picks_fbgemm_on_x86_cpus_and_torchao_elsewhere():
    from dynvit.deploy.hardware import CpuInfo
    from dynvit.deploy.quantize import int8_backend_for

    x86 = CpuInfo("x", "x86_64", "AVX2", frozenset({"avx2"}))
    arm = CpuInfo("y", "aarch64", "DEFAULT", frozenset())
    assert int8_backend_for("cpu", x86) == "torch.ao" and int8_backend_for("cpu", arm) == "torchao"
    assert int8_backend_for("cuda", x86) == "torchao"
    with pytest.raises(ValueError, match=r"unknown int8 backend 'fbgemm'.*'torch.ao'"):
        quantize(vit_student(), "int8", int8_backend="fbgemm")
    with pytest.raises(ValueError, match=r"'torch.ao' runs on the CPU only; this model is on meta: use 'torchao'"):
        quantize(vit_student().to("meta"), "int8", int8_backend="torch.ao")


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("family", list(HIERARCHICAL))
def test_a_quantized_hierarchical_student_predicts_and_keeps_what_the_float32_one_does(family, precision):
    """On 64 digits the quantized copy's top-1 class equals the float32 one's on at least 90 % of the
    images (random weights: near-tied logits flip), and each pruning stage sends at least 95 % of the
    same stage-3 locations to the slow path."""
    student = HIERARCHICAL[family]()
    x = canvas_digits()
    quantized = quantize(student, precision)
    with torch.inference_mode():
        logits, masks = student.predict_with_masks(x)
        q_logits, q_masks = quantized.predict_with_masks(x.to(torch.bfloat16 if precision == "bf16" else torch.float32))
    assert (q_logits.float().argmax(-1) == logits.argmax(-1)).float().mean() >= 0.9
    assert (q_logits.float() - logits).norm() / logits.norm() < 0.1
    assert [m.sum(1).tolist() for m in q_masks] == [m.sum(1).tolist() for m in masks]  # the counts are ρ's
    for q_mask, mask in zip(q_masks, masks, strict=True):
        assert ((q_mask & mask).sum() / mask.sum()).item() >= 0.95


@pytest.mark.parametrize("int8_backend", ["torchao", "torch.ao"])
@pytest.mark.parametrize("family", list(HIERARCHICAL))
def test_int8_keeps_a_hierarchical_students_predictors_and_head_in_float32_and_quantizes_its_paths(
    family, int8_backend
):
    student = HIERARCHICAL[family]()
    linears = {name for name, m in student.named_modules() if isinstance(m, nn.Linear)}
    int8 = int8_layers(quantize(student, "int8", int8_backend=int8_backend))
    fp32 = linears - int8
    # The predictors sit in the pruned stage (stages.2 / layers.2), the classifier is head.fc.
    assert int8 <= linears
    assert fp32 == {name for name in linears if ".score_predictor." in name or name.startswith("head.")}
    assert len([n for n in fp32 if "score_predictor" in n]) == 3 * 4 and "head.fc" in fp32
    # The fast paths (LayerNorm + Linear C→C on dropped locations) are int8, like the MLPs.
    fast = [n for n in linears if ".fast_path." in n or ".fastmlp." in n]
    assert len(fast) == 3 and set(fast) <= int8


@pytest.mark.parametrize(
    "build",
    [
        lambda: create_teacher("vit_tiny_patch16_224", **TINY),
        lambda: create_student(
            "lvvit_digits", keep_ratio=0.7, num_classes=10, depth=4, embed_dim=32, num_heads=2, pruning_loc=LOC
        ),
        lambda: create_student(
            "t2t_vit_7",
            keep_ratio=0.7,
            num_classes=10,
            img_size=64,
            depth=4,
            embed_dim=32,
            num_heads=2,
            pruning_loc=LOC,
        ),
        lambda: create_reduced(
            "vit_tiny_patch16_224", "evit", params={"keep_rate": 0.7, "pruning_loc": (1, 2)}, **TINY
        ),
        lambda: create_reduced("vit_tiny_patch16_224", "tome", params={"r": 4}, **TINY),
    ],
    ids=["teacher", "lvvit-student", "t2t-student", "evit", "tome"],
)
def test_every_kind_of_model_quantizes(build):
    model = decisive(build())
    x = torch.randn(3, *_input_shape(model))
    with torch.inference_mode():
        reference = model(x)
        for precision in ("bf16", "int8"):
            q = quantize(model, precision)
            out = q(x.to(torch.bfloat16) if precision == "bf16" else x).float()
            assert out.shape == reference.shape
            assert (out - reference).norm() / reference.norm() < 0.1, precision


def _input_shape(model: nn.Module) -> tuple[int, ...]:
    from dynvit.models.dynamic_vit import input_size

    return input_size(model)


def test_quantize_refuses_what_it_cannot_do():
    student = vit_student()
    with pytest.raises(ValueError, match=r"unknown precision 'int4'.*did you mean 'int8'"):
        quantize(student, "int4")
    with pytest.raises(QuantizationError, match=r"eval mode.*call model.eval\(\)"):
        quantize(copy.deepcopy(student).train(), "int8")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize(quantize(student, "int8"), "bf16")
    # A bf16 copy quantized again would take bf16 inputs into int8 kernels made for float32 and fail when called.
    for backend in ("torchao", "torch.ao"):
        with pytest.raises(QuantizationError, match="int8 quantizes float32 models; this one is bf16: quantize the"):
            quantize(quantize(student, "bf16"), "int8", int8_backend=backend)

    class WithMHA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x)[0]

    with pytest.raises(QuantizationError, match=r"int8 cannot quantize 'attn' \(MultiheadAttention\)"):
        quantize(WithMHA().eval(), "int8")
    assert quantize(WithMHA().eval(), "bf16").attn.in_proj_weight.dtype == torch.bfloat16
    with pytest.raises(QuantizationError, match="no nn.Linear layer"):
        quantize(nn.Conv2d(1, 1, 3).eval(), "int8")


# --- ONNX export ------------------------------------------------------------------------------------

EXPORTABLE = {
    "vit-student": vit_student,
    "lvvit-student": lambda: decisive(
        create_student(
            "lvvit_digits",
            keep_ratio=0.7,
            num_classes=10,
            img_size=32,
            depth=3,
            embed_dim=32,
            num_heads=2,
            pruning_loc=(1, 2),
        )
    ),
    "t2t-student": lambda: decisive(
        create_student(
            "t2t_vit_7",
            keep_ratio=0.7,
            num_classes=10,
            img_size=64,
            depth=3,
            embed_dim=32,
            num_heads=2,
            pruning_loc=(1, 2),
        )
    ),
    "teacher": lambda: decisive(create_teacher("vit_tiny_patch16_224", **{**TINY, "depth": 2})),
    # Split inference: ranking (two sorts), row gathers of each path's locations, scatter back.
    **HIERARCHICAL,
    "topk-reducer": lambda: decisive(
        create_reduced(
            "vit_tiny_patch16_224", "topk", params={"keep_rate": 0.7, "pruning_loc": (1,)}, **{**TINY, "depth": 2}
        )
    ),
}


@pytest.mark.parametrize("name", list(EXPORTABLE))
def test_export_round_trips_through_onnxruntime_with_a_dynamic_batch(name, tmp_path):
    model = EXPORTABLE[name]()
    shape = _input_shape(model)
    images = {(1, 32, 32): digits, (1, 128, 128): canvas_digits}.get(shape, lambda n: torch.randn(n, *shape))(2)
    path = export_onnx(model, tmp_path / f"{name}.onnx", images=images)  # traced at batch 2
    session = onnx_session(path, threads=1)
    (batch,) = session.get_inputs()[0].shape[:1]
    assert isinstance(batch, str)  # a symbolic batch dimension
    three = {(1, 32, 32): digits, (1, 128, 128): canvas_digits}.get(shape, lambda n: torch.randn(n, *shape))(3)
    with torch.inference_mode():
        eager = model(three)
    ort = run_onnx(session, three)
    assert ort.shape == eager.shape == (3, 10)
    assert ((ort - eager).abs().max() / eager.abs().max()).item() <= 1e-4
    assert compare_onnx(model, path, torch.randn(5, *shape)) <= 1e-4
    assert model.training is False  # exported as it was


@pytest.mark.parametrize(("reduce_range", "largest"), [(False, 127), (True, 64)])
def test_onnxruntime_int8_weights_take_8_or_7_bits(tmp_path, reduce_range, largest):
    """7-bit weights are onnxruntime's advice for x86 CPUs without VNNI, whose ``vpmaddubsw`` sums u8 × s8
    pairs into saturating int16; symmetric int8 weights span ±127, onnxruntime's reduced range ±64."""
    import onnx
    from onnx import numpy_helper

    from dynvit.deploy import quantize_onnx

    model = create_teacher("deit_small_patch16_224", **TINY).eval()
    exported = export_onnx(model, tmp_path / "teacher.onnx", images=digits(2))
    path = quantize_onnx(exported, reduce_range=reduce_range)
    assert path == tmp_path / "teacher.int8.onnx"
    initializers = onnx.load(path).graph.initializer
    weights = [numpy_helper.to_array(t) for t in initializers if t.data_type == onnx.TensorProto.INT8]
    assert len(weights) >= 4 * TINY["depth"]
    assert max(int(abs(w.astype("int32")).max()) for w in weights) == largest
    images = digits(4)
    with torch.inference_mode():
        error = (run_onnx(onnx_session(path, threads=1), images) - model(images)).norm() / model(images).norm()
    assert error.item() < 0.1


@pytest.mark.parametrize(
    ("features", "dot_product"),
    [({"avx2"}, False), ({"avx2", "avx512_f"}, False), ({"avx2", "avx_vnni"}, True), ({"avx512_vnni"}, True)],
)
def test_int8_dot_product_is_vnni_or_amx_whatever_onednns_cap(features, dot_product):
    from dynvit.deploy.hardware import CpuInfo

    cpu = CpuInfo("cpu", "x86_64", "AVX2", frozenset(features), onednn_max_isa="AVX2")
    assert cpu.int8_dot_product is dot_product and cpu.record()["int8_dot_product"] is dot_product


def test_onnx_sessions_do_not_spin_unless_asked(tmp_path):
    """Spinning intra-op threads keep the cores busy after a run, slowing whatever is timed next."""
    from onnx import TensorProto, helper, save

    x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in ("x", "y"))
    path = tmp_path / "identity.onnx"
    save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])), path)
    spinning = "session.intra_op.allow_spinning"
    assert onnx_session(path).get_session_options().get_session_config_entry(spinning) == "0"
    assert onnx_session(path, spin=True).get_session_options().get_session_config_entry(spinning) == "1"


def test_exported_ranking_breaks_ties_as_eager_does(tmp_path):
    """Stage-3 locations are ranked by two sorts, the second relying on the first's order among equal keys.
    ONNX has no stable sort; the exported TopK must still give eager PyTorch's permutation, ties included."""

    class Rank(nn.Module):
        def forward(self, scores: torch.Tensor) -> torch.Tensor:
            return rank_locations(scores)

    g = torch.Generator().manual_seed(0)
    # Keep/drop log-probabilities with exact ties in both keys: a saturated predictor's log p(keep) = 0.0
    # for many locations, which only the odds tell apart, and some locations equal in both.
    keep = torch.randint(-3, 1, (3, 64), generator=g).float()
    drop = torch.where(keep == 0, -torch.randint(18, 21, (3, 64), generator=g).float(), torch.zeros(3, 64))
    scores = torch.stack([keep, drop], -1)
    path = tmp_path / "rank.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Rank(), (scores,), str(path), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
    session = onnx_session(path, threads=1)
    (exported,) = session.run(None, {session.get_inputs()[0].name: scores.numpy()})
    eager = rank_locations(scores)
    assert torch.equal(torch.from_numpy(exported), eager)
    # The ties are real: equal keys whose order only the sorts' tie rule decides.
    assert (keep == 0).sum() > 30 and len(set(zip(keep[0].tolist(), drop[0].tolist(), strict=True))) < 64


def test_export_refuses_training_mode_quantized_models_and_unexportable_ops(tmp_path):
    student = vit_student()
    with pytest.raises(QuantizationError, match=r"eval mode.*call model.eval\(\)"):
        export_onnx(copy.deepcopy(student).train(), tmp_path / "train.onnx")
    with pytest.raises(QuantizationError, match="exports float32 models; this one is int8"):
        export_onnx(quantize(student, "int8"), tmp_path / "int8.onnx")
    # ATS keeps a number of tokens that depends on the image: no fixed-shape graph exists.
    ats = create_reduced(
        "vit_tiny_patch16_224", "ats", params={"max_tokens": 20, "pruning_loc": (1,)}, **{**TINY, "depth": 2}
    )
    with pytest.raises(ExportError, match="ATSViT cannot be exported to ONNX"):
        export_onnx(ats.eval(), tmp_path / "ats.onnx")
    assert not (tmp_path / "ats.onnx").exists() and not (tmp_path / "train.onnx").exists()


# --- the export check: ties at a top-k cut ------------------------------------------------------------


def test_keep_scores_that_tie_exactly_keep_the_first_tokens_in_eager_and_onnxruntime(tmp_path):
    """A keep predictor whose last layer outputs its bias alone scores every token alike (a fresh one
    scores them within ~1e-6, often exactly alike). Both runtimes break the tie by index: the first tokens."""
    student = vit_student()
    with torch.no_grad():
        for predictor in student.score_predictor:
            predictor.out_conv[4].weight.zero_()
    x = digits(8)
    _, masks = student.predict_with_masks(x)
    for mask, count in zip(masks, student.stage_keep_counts, strict=True):
        assert all(m.nonzero().flatten().tolist() == list(range(count)) for m in mask)
    path = export_onnx(student, tmp_path / "tied.onnx", images=x)
    with torch.inference_mode():
        eager = student(x)
    assert ((run_onnx(onnx_session(path, threads=1), x) - eager).abs().max() / eager.abs().max()).item() <= 1e-5


@pytest.fixture(scope="module")
def near_tie(tmp_path_factory) -> tuple[nn.Module, Path, torch.Tensor]:
    """An exported student whose keep scores differ by ~1e-7 between tokens, as a fresh predictor's do."""
    student = vit_student()
    with torch.no_grad():
        for predictor in student.score_predictor:
            predictor.out_conv[4].weight.mul_(1e-7)
    x = digits(8)
    return student, export_onnx(student, tmp_path_factory.mktemp("near_tie") / "student.onnx", images=x), x


def test_the_check_calls_other_tokens_kept_at_a_near_tie_a_tie(near_tie):
    student, path, x = near_tie
    # The same network with its near-tied keep scores in reverse order: eager PyTorch now keeps other tokens
    # than the exported graph at the first cut, with keys that differ by less than the tie tolerance.
    mirrored = copy.deepcopy(student)
    with torch.no_grad():
        for predictor in mirrored.score_predictor:
            predictor.out_conv[4].weight.neg_()
    with torch.inference_mode():
        eager = mirrored(x)
    ort = run_onnx(onnx_session(path), x)
    differing = ((ort - eager).abs().amax(1) / eager.abs().max() > TOLERANCE).nonzero().flatten().tolist()
    assert differing  # the choice matters to the logits
    found = check_onnx(mirrored, path, x)
    assert [t.image for t in found.ties] == differing
    assert all(t.selection == 0 and t.selections == 3 and t.gap <= TIE_TOLERANCE for t in found.ties)
    assert found.difference <= TOLERANCE
    assert f"tie at the top-k cut in image {differing[0]} (top-k 1 of 3, gap " in str(found)
    assert str(found).startswith("checked in onnxruntime against eager PyTorch on 8 images: logits agree to ")


def test_the_check_refuses_other_logits_from_the_same_tokens(near_tie):
    student, path, x = near_tie
    shifted = copy.deepcopy(student)
    with torch.no_grad():
        shifted.head.bias[3] += 1.0
    with pytest.raises(
        ExportError, match=r"on 8 of 8 check images.*image 0: logits differ by .*both kept the same tokens"
    ):
        check_onnx(shifted, path, x)


def test_the_check_names_a_graph_onnxruntime_refuses(near_tie, tmp_path):
    """A graph that exports but that onnxruntime cannot load is an ExportError, not onnxruntime's own exception."""
    import onnx

    student, exported, x = near_tie
    graph = onnx.load(str(exported))
    graph.graph.node[-1].op_type = "NoSuchOp"
    onnx.save(graph, str(tmp_path / "broken.onnx"))
    with pytest.raises(ExportError, match=r"onnxruntime cannot run the graph exported from DynamicViT: .*NoSuchOp"):
        check_onnx(student, tmp_path / "broken.onnx", x)


def test_the_check_refuses_a_graph_that_keeps_other_tokens_than_its_scores_say(tmp_path):
    """A graph whose first TopK keeps the smallest keys: the keys agree, the choice does not."""
    import onnx

    student = vit_student()
    x = digits(8)
    path = export_onnx(student, tmp_path / "student.onnx", images=x)
    graph = onnx.load(str(path))
    first = next(node for node in graph.graph.node if node.op_type == "TopK")
    next(a for a in first.attribute if a.name == "largest").i = 0
    onnx.save(graph, str(path))
    with pytest.raises(ExportError, match=r"image 0: .*top-k 1 kept other tokens, whose keys differ by"):
        check_onnx(student, path, x)


def test_a_failed_export_leaves_the_file_at_its_path_as_it_was(tmp_path):
    ats = create_reduced(
        "vit_tiny_patch16_224", "ats", params={"max_tokens": 20, "pruning_loc": (1,)}, **{**TINY, "depth": 2}
    )
    earlier = tmp_path / "model.onnx"
    earlier.write_bytes(b"an earlier export")
    with pytest.raises(ExportError, match="cannot be exported"):
        export_onnx(ats.eval(), earlier)
    assert earlier.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left
    with staged(earlier) as staging:
        staging.write_bytes(b"a new export")
    assert earlier.read_bytes() == b"a new export" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_an_int8_attention_runs_outside_inference_mode():
    """torch.ao's int8 Linear has a ``weight()`` method, not a parameter: the attention's kernel choice asks
    its parameters whether a gradient is needed, so a call with gradients on runs as under inference mode."""
    quantized = quantize(vit_student(), "int8", int8_backend="torch.ao")
    attention = quantized.blocks[0].attn
    tokens = torch.randn(2, 65, attention.qkv.in_features)
    with torch.inference_mode():
        expected = attention(tokens)
    assert torch.is_grad_enabled() and torch.equal(attention(tokens), expected)
