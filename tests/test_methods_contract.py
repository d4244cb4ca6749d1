"""The contract every registered method meets, run for each entry of ``dynvit.methods.registered()``: a method
is tested by being registered.

Each method is built from its registry entry on a tiny ViT and run through: train and eval forward;
token counts (per block; for a cascade that exits early, DVT, per block of every exit it ran) and the reports its entry declares (kept-token masks, merge sources); ``count_flops`` and
``measure_throughput``; ``predict_step`` as ``cli.py predict`` calls it; GFLOPs matching through the
registry; one ``cli.py benchmark`` call with every training-free method; ONNX export, or the refusal
its entry gives; and the bad inputs every method must refuse clearly.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dynvit import count_flops, create_teacher, measure_throughput, methods
from dynvit.deploy import ExportError, export_onnx
from dynvit.lightning import ClassifierModule
from dynvit.models.contract import REPORT_PROTOCOLS, EarlyExiting, TokenReducingModel
from dynvit.reducers.cost import TokenCost
from dynvit.reducers.matching import match_gflops, mean_cost, valid_candidates
from tests.tiny_config import benchmark_rows, tiny_config, write_config

NAME = "deit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=5)
N, P, DEPTH = 16, 1, 4
REGISTERED = list(methods.registered())
README = Path(__file__).resolve().parents[1] / "README.md"


# Tiny models gain nothing from a second intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    torch.manual_seed(0)
    vit = create_teacher(NAME, **TINY).eval()
    with torch.no_grad():  # sharper attention, so scores and similarities differ between tokens
        for block in vit.blocks:
            block.attn.qkv.weight.mul_(4)
    return vit


def images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, TINY["img_size"], TINY["img_size"], generator=torch.Generator().manual_seed(1))


@functools.cache
def fitting_params(name: str, vit: nn.Module) -> tuple[tuple[str, Any], ...]:
    """:func:`tiny_params`, found once per method and ViT (each try builds the method on a copy of ``vit``)."""
    method = methods.get(name)
    fitting = []
    for value in method.knob.candidates(vit, steps=10):
        params = {**method.default_params(vit), method.knob.name: value}
        try:
            method.build(copy.deepcopy(vit), **params)
        except ValueError:
            continue
        fitting.append(params)
    return tuple(fitting[len(fitting) // 2].items())


def tiny_params(method: methods.Method, vit: nn.Module) -> dict:
    """The method's defaults with its knob halfway along the range this tiny ViT accepts (defaults are sized for
    real models: ToMe's r = 13 is more than 16 patches allow, DPC-KNN's 5 neighbours more than a late stage keeps)."""
    return dict(fitting_params(method.name, vit))


def built(teacher: nn.Module, name: str, **params) -> nn.Module:
    """The method's model on a copy of the teacher, at :func:`tiny_params` updated by ``params``."""
    method = methods.get(name)
    model = method.build(copy.deepcopy(teacher), **{**tiny_params(method, teacher), **params})
    if method.learned:
        # Spread the fresh modules' scores, as training does; mildly, since DPC-KNN exponentiates its raw scores
        # as its reference does (no max subtracted), which overflows for scores above ~88.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model.eval()


def logits_of(output) -> torch.Tensor:
    """Logits from a train-mode output: a learned student returns its objective's inputs with ``logits``."""
    return getattr(output, "logits", output)


def exit_counts(model: EarlyExiting, exit_index: torch.Tensor) -> torch.Tensor:
    """A cascade's token counts (B, exits · depth, 2) for images leaving at ``exit_index``: every block of exit k
    holds exit k's tokens in attention and MLP for each exit the image ran, and none in the exits after it left."""
    depth = DEPTH
    rows = []
    for leaving in exit_index.tolist():
        rows.append([[n, n] for k, n in enumerate(model.tokens_per_exit) for _ in range(depth) if k <= leaving])
        rows[-1] += [[0, 0]] * (model.num_exits * depth - len(rows[-1]))
    return torch.tensor(rows)


def check_exit_counts(model: nn.Module, x: torch.Tensor, counts: torch.Tensor) -> None:
    """A cascade's counts say which exits each image ran, as its early exit decided; the finest exit sees every
    token, the coarser ones fewer; and a threshold every image meets stops them all at exit 1."""
    assert counts.dtype == torch.int64
    assert model.tokens_per_exit[-1] == P + N and model.tokens_per_exit == sorted(set(model.tokens_per_exit))
    exit_index = model.predict_early_exit(x, model.thresholds).exit_index
    assert torch.equal(counts, exit_counts(model, exit_index))
    method = methods.get(model.method)
    everyone = method.apply(model, **{method.knob.name: method.knob.candidates(model)[-1]})
    low = 1.0 / TINY["num_classes"]  # no top softmax probability is below 1 / classes
    assert method.knob.candidates(model)[-1] <= low
    assert torch.equal(everyone.predict_with_counts(x)[1], exit_counts(model, torch.zeros(3, dtype=torch.long)))


@pytest.mark.parametrize("name", REGISTERED)
def test_forward_counts_and_reports(teacher, name):
    method = methods.get(name)
    model = built(teacher, name)
    x = images()
    assert isinstance(model, TokenReducingModel) and model.method == name
    assert methods.of(model) is method
    for report in method.reports:  # every declared report is offered
        assert isinstance(model, REPORT_PROTOCOLS[report]), report

    cascade = "exits" in method.reports  # the reports loop above checked it is an EarlyExiting model
    model.train()
    # A cascade answers at every exit in training, and each exit's backbone learns.
    outs = model(x) if cascade else (logits_of(model(x)),)
    for out in outs:
        assert out.shape == (3, TINY["num_classes"]) and torch.isfinite(out).all()
    sum(nn.functional.cross_entropy(out, torch.arange(3)) for out in outs).backward()
    for backbone in model.exits if cascade else (model,):
        assert backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        logits = model(x)
    got, counts = model.predict_with_counts(x)
    torch.testing.assert_close(got, logits)
    if cascade:
        check_exit_counts(model, x, counts)
        assert model.token_schedule() is None and method.cost == "images"
        return
    assert counts.shape == (3, DEPTH, 2) and counts.dtype == torch.int64
    assert (counts[:, 0, 0] == P + N).all()  # the first block sees every token
    flat = counts.flatten(1)
    assert (flat[:, 1:] <= flat[:, :-1]).all()  # a reducer never adds tokens back
    assert (counts[:, -1, 1] > P).all() and (counts[:, -1, 1] < P + N).all()
    schedule = model.token_schedule()
    if schedule is not None:
        assert counts.tolist() == [[list(c) for c in schedule]] * 3
    else:  # only methods costed on images may adapt their counts
        assert method.cost == "images"

    if "masks" in method.reports:
        _, masks = model.predict_with_masks(x)
        assert masks and all(m.shape == (3, N) and m.dtype == torch.bool for m in masks)
        # A patch that stopped being a token of its own never becomes one again, and some patch always is one.
        assert all(not (later & ~earlier).any() for earlier, later in zip(masks, masks[1:], strict=False))
        assert masks[-1].any(dim=1).all()
    if "sources" in method.reports:
        logits_s, sources = model.predict_with_sources(x)
        torch.testing.assert_close(logits_s, logits)
        assert sources.shape == (3, counts[0, -1, 1] - P, N)
        # A patch stands in one token at most (DiffRate and ToFu also prune), and every token stands for some.
        assert (sources.sum(dim=1) <= 1).all() and sources.any(dim=2).all()
        if "masks" in method.reports:
            # Each token keeps the place of one of the patches it stands for (ToMe: its last stage is the last block).
            _, masks = model.predict_with_masks(x)
            assert (masks[-1].unsqueeze(1) & sources).sum(dim=2).eq(1).all()


@pytest.mark.parametrize("name", REGISTERED)
def test_flops_throughput_and_predict(teacher, name):
    model = built(teacher, name)
    gflops = count_flops(model)
    assert gflops > 0
    if methods.get(name).cost == "schedule" and not methods.get(name).learned:
        assert gflops < count_flops(teacher)
    assert measure_throughput(model, batch_size=2, pairs=1) > 0

    arch = {k: v for k, v in TINY.items() if k not in ("num_classes", "img_size")}
    module = ClassifierModule(NAME, num_classes=5, img_size=32, model_kwargs=arch)
    module.net = model
    x = images(2)
    prediction = module.predict_step((x, torch.zeros(2, dtype=torch.long)), 0)
    torch.testing.assert_close(prediction["probs"].sum(dim=1), torch.ones(2))
    if "masks" in methods.get(name).reports:  # cli.py predict writes these per image and stage
        assert prediction["masks"].shape[::2] == (2, N) and prediction["masks"].dtype == torch.bool


# Methods whose eval forward cannot be one torch.compile graph, and why: the deploy paths compile the rest.
GRAPH_BREAKS = {
    "atc": "scikit-learn clusters each image",
    "ats": "the number of tokens depends on the image",
    "dvt": "early exit decides per batch which exits run",
    "random": "its own torch.Generator",
}


@pytest.mark.parametrize("name", REGISTERED)
def test_eval_forward_is_one_compiled_graph(teacher, name):
    if name in GRAPH_BREAKS:
        pytest.skip(GRAPH_BREAKS[name])
    import torch._dynamo as dynamo

    dynamo.reset()
    with torch.inference_mode():
        explained = dynamo.explain(built(teacher, name))(images(2))
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, f"{name} breaks torch.compile's graph: {reasons}"


@pytest.mark.parametrize("name", REGISTERED)
def test_cost_matching_through_the_registry(teacher, name):
    method = methods.get(name)
    model = built(teacher, name)
    knob = method.knob
    stages = (1, 3)
    params = method.stage_params(stages, DEPTH) if not method.learned else {}
    x = [images(4)]
    if method.cost == "keep_ratio":
        # Not searched: at ρ the method keeps exactly DynamicViT's tokens in the same blocks.
        at = method.apply(model, **{knob.name: 0.5}, **params)
        student = built(teacher, "dynamicvit", keep_ratio=0.5, pruning_loc=stages)
        assert at.token_schedule() == student.token_schedule()
        with pytest.raises(ValueError, match="not matched"):
            match_gflops(method, model, 1.0)
        return
    cost = TokenCost.from_model(teacher)

    def gflops_at(value: float) -> float:
        method.apply(model, **{knob.name: value}, **params)
        return count_flops(model) if method.cost == "schedule" else mean_cost(model, x, cost)[0]

    candidates = valid_candidates(method, model, steps=10, **params)
    high, low = gflops_at(candidates[0]), gflops_at(candidates[-1])
    assert low < high
    target = low + 0.4 * (high - low)
    match = match_gflops(method, model, target, images=x, steps=10, **params)
    assert match.value in candidates and match.gflops == pytest.approx(gflops_at(match.value), rel=1e-9)
    # GFLOPs fall along the candidates, so the match is the nearest when neither neighbour is nearer.
    i = candidates.index(match.value)
    for j in (i - 1, i + 1):
        if 0 <= j < len(candidates):
            assert abs(gflops_at(candidates[j]) - target) >= abs(match.gflops - target)


@pytest.mark.parametrize("name", REGISTERED)
def test_onnx_export_or_the_registry_refusal(name, tmp_path):
    method = methods.get(name)
    torch.manual_seed(0)
    shallow = create_teacher(NAME, **{**TINY, "depth": 3}).eval()  # exporting costs time per block
    model = built(shallow, name)
    path = tmp_path / f"{name}.onnx"
    if method.onnx is None:
        assert export_onnx(model, path, images=images(2)) == path and path.stat().st_size > 0
    else:
        with pytest.raises(ExportError, match=re.escape(method.onnx)):
            export_onnx(model, path)
        assert not path.exists()


@pytest.mark.parametrize("name", REGISTERED)
def test_bad_input_is_refused_clearly(teacher, name):
    method = methods.get(name)
    # The most reducing setting either keeps a patch token or is refused with a way out.
    vit = copy.deepcopy(teacher)
    extreme = method.knob.candidates(vit, steps=100)[-1]
    try:
        model = method.build(vit, **{**method.default_params(vit), method.knob.name: extreme})
    except ValueError as e:
        assert re.search(r"raise|use|at least", str(e)), str(e)
    else:
        mlp = model.predict_with_counts(images(1))[1][:, :, 1]
        if isinstance(model, EarlyExiting):  # the last block each image ran (later exits hold 0) is the one to check
            mlp = mlp.gather(1, (mlp > 0).long().cumsum(dim=1).argmax(dim=1, keepdim=True))
        assert (mlp[:, -1] > P).all()
    pooled = create_teacher(NAME, class_token=False, global_pool="avg", **TINY)
    if method.needs_class_token:
        with pytest.raises(TypeError, match="no class token.*which need none"):
            method.build(pooled, **tiny_params(method, pooled))
    else:
        method.build(pooled, **tiny_params(method, pooled))


@pytest.mark.parametrize("value", [float("nan"), "0.5", True])  # None is some knobs' default (ATS, ATC, DVT)
@pytest.mark.parametrize("name", REGISTERED)
def test_a_knob_that_is_no_number_is_refused_by_name(teacher, name, value):
    method = methods.get(name)
    vit = copy.deepcopy(teacher)
    with pytest.raises(ValueError, match=re.escape(method.knob.name)):
        method.build(vit, **{**method.default_params(vit), method.knob.name: value})


def test_an_unknown_method_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown token-reduction method 'tomee'.*did you mean 'tome'") as error:
        methods.get("tomee")
    assert all(name in str(error.value) for name in REGISTERED)


@pytest.fixture(scope="module")
def benchmarked(tmp_path_factory) -> list[dict]:
    """One ``cli.py benchmark --methods all`` call on the tiny digits: the config's student (dynamicvit), every
    other learned method built from the teacher with its new modules at init, every training-free one."""
    root = tmp_path_factory.mktemp("contract")
    config = tiny_config(root / "run")
    config["data"]["init_args"].update(num_val=8)
    config["wandb"] = {"enabled": False}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        rows = benchmark_rows(
            write_config(root / "tiny.yaml", config),
            root / "bench",
            "--ratios=[0.5]",
            "--methods=all",
            "--calibration_images=8",
        )
    return rows


@pytest.mark.parametrize("name", REGISTERED)
def test_cli_benchmark_has_a_row_for_every_method(benchmarked, name):
    method = methods.get(name)
    student = name == "dynamicvit"  # the config's trained student; other learned methods start at init
    label = method.at_init_label if method.learned and not student else method.label
    (row,) = [r for r in benchmarked if r["method"] == label]
    teacher = benchmarked[0]
    assert len(benchmarked) == 1 + len(REGISTERED)
    assert row["keep_ratio"] == 0.5 and 0 < row["gflops"] < teacher["gflops"] * 1.1
    assert row["top1"] is not None and row["images"] == teacher["images"] == 8
    assert row["speedup"] is not None and row["images_per_s"] > 0
    assert (row["param"] is None) == student
    assert (row["recall_s1"] is not None) == ("masks" in method.reports)
    assert (row["purity"] is not None) == bool({"sources", "assignments"} & method.reports)
    shares = [row[k] for k in row if re.fullmatch(r"exit\d+", k) and row[k] is not None]
    assert bool(shares) == ("exits" in method.reports)  # a cascade's row says where its images left
    if shares:
        assert len(shares) == 3 and sum(shares) == pytest.approx(1.0) and all(0 <= s <= 1 for s in shares)


def test_readme_lists_exactly_the_registered_methods():
    """README's table of methods is the registry's own (``dynvit.methods.markdown_table()``): one row per
    registered method, in registration order; a new method shows up here as a difference to paste."""
    table = README.read_text().split("<!-- methods table: checked against dynvit.methods.registered() -->\n", 1)[1]
    table = table.split("\n\n", 1)[0]
    assert re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M) == REGISTERED
    assert table == methods.markdown_table()
