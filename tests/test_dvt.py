"""DVT on tiny cascades: reuse shapes and formulas, gradients, early exit, thresholds, loading, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import dynvit
from dynvit.models.dvt import DVT, exit_indices, exit_shares, find_thresholds, resample_matrix
from dynvit.models.t2t_vit import TokensToToken

# 32-px images: 16-px patches (2×2), 11-px patches padded by 1 (3×3), 8-px patches (4×4).
PATCHES = ((16, 0), (11, 1), (8, 0))
TINY = dict(img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=5, reuse_hidden=16, reuse_dim=8)
TINY_VIT = dict(img_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=5)
B = 6


# Tiny models gain nothing from a second intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dvt(**kwargs) -> DVT:
    torch.manual_seed(0)
    dvt = dynvit.create_dvt("vit_tiny_patch16_224", patches=PATCHES, **{**TINY, **kwargs})
    with torch.no_grad():  # every weight moved off its init, so zero biases and unit norms hide nothing
        for p in dvt.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return dvt


def images(n: int = B, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_grids_tokens_and_train_forward() -> None:
    dvt = tiny_dvt()
    assert dvt.grids == [2, 3, 4]
    assert dvt.tokens_per_exit == [5, 10, 17]
    dvt.train()
    out = dvt(images())
    assert isinstance(out, tuple) and [o.shape for o in out] == [(B, 5)] * 3
    dvt.eval()
    with torch.no_grad():
        assert torch.allclose(dvt(images()), dvt.forward_exits(images())[-1])


def test_digits_cascade_exits_pad_the_image_before_their_conv_stem() -> None:
    # experiments/digits_dvt.yaml: vit_digits_exit on 4x4, 6x6 and 8x8 grids of the 64-px canvas.
    config = yaml.safe_load((Path(__file__).parents[1] / "experiments" / "digits_dvt.yaml").read_text())
    args = config["model"]["init_args"]
    torch.manual_seed(0)
    dvt = dynvit.create_dvt(args["model_name"], img_size=64, patches=[tuple(p) for p in args["patches"]])
    assert dvt.grids == [4, 6, 8] and dvt.tokens_per_exit == [17, 37, 65]
    x = torch.randn(2, 1, 64, 64)
    middle = dvt.exits[1].patch_embed.proj.eval()
    assert middle.padding == (4, 4) and middle.patchify.kernel_size == (3, 3)
    with torch.no_grad():  # padding 4 px is padding the image, then the stride-4 stem, then a 3x3 patchify conv
        expected = middle.patchify(middle.stem(F.pad(x, (4, 4, 4, 4))))
        torch.testing.assert_close(middle(x), expected)
    assert expected.shape[-2:] == (6, 6)
    dvt.train()
    assert [o.shape for o in dvt(x)] == [(2, 10)] * 3
    with pytest.raises(ValueError, match="multiple of the stem's stride 4"):
        dynvit.create_dvt(args["model_name"], img_size=64, patches=[(16, 0), (11, 1), (8, 0)])


def test_released_grids_from_the_patch_embeddings_and_soft_splits() -> None:
    # DeiT-S: patch 32, patch 23 padded by 3, patch 16; T2T-ViT: soft splits 14/8/3 and 11/6/5 first.
    grids = [(224 + 2 * p) // k for k, p in dynvit.models.dvt.CASCADES["deit_small_patch16_224"]["patches"]]
    assert grids == [7, 10, 14]
    splits = dynvit.models.dvt.CASCADES["t2t_vit_14"]["soft_splits"]
    assert [TokensToToken(224, embed_dim=8, soft_splits=s).grid_size for s in splits] == [(7, 7), (10, 10), (14, 14)]


def test_resample_matrix_is_nearest_upsampling_then_adaptive_pooling() -> None:
    x = torch.randn(2, 3, 7, 7)
    expected = F.adaptive_avg_pool2d(F.interpolate(x, size=(14, 14), mode="nearest"), (10, 10))
    got = (resample_matrix(7, 14, 10) @ x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(2, 3, 10, 10)
    assert torch.allclose(got, expected, atol=1e-6)


def test_reuse_shapes_and_relation_resampling() -> None:
    dvt = tiny_dvt().eval()
    x = images()
    with torch.no_grad():
        _, state = dvt.run_exit(0, x, None)
        assert state.tokens.shape == (B, 5, 32)
        assert state.logits.shape == (B, 2 * 2, 5, 5)  # depth × heads channels of pre-softmax logits
        conv = dvt.less_token.relation_reuse_conv(state.logits)
        bias = dvt._resample_relations(1, conv)

        # Explicitly: patch keys resampled 2×2 → 4×4 → 3×3 for every query, then patch queries for every key;
        # the class row and column stay as they are.
        def grid(t: torch.Tensor) -> torch.Tensor:  # (..., 4) → (..., 9)
            lead = t.shape[:-1]
            img = t.reshape(-1, 1, 2, 2)
            out = F.adaptive_avg_pool2d(F.interpolate(img, size=(4, 4), mode="nearest"), (3, 3))
            return out.reshape(*lead, 9)

        keys = torch.cat([conv[..., :1], grid(conv[..., 1:])], dim=-1)
        expected = torch.cat([keys[..., :1, :], grid(keys[..., 1:, :].transpose(-1, -2)).transpose(-1, -2)], dim=-2)
        assert bias.shape == (B, 4, 10, 10)
        assert torch.allclose(bias, expected, atol=1e-6)
        reused = dvt.less_token.blocks[0].feature_resuse_mlp(state.tokens[:, 1:])
        assert reused.shape == (B, 4, 8)
        features = dvt._resample_features(1, reused)
        assert features.shape == (B, 10, 8)
        assert torch.equal(features[:, 0], torch.zeros(B, 8))  # the class token gets zeros
        assert torch.allclose(features[:, 1:], grid(reused.transpose(1, 2)).transpose(1, 2), atol=1e-6)
        # The widened MLP takes width + 8 channels and gives width back.
        block = dvt.less_token.blocks[0]
        assert block.norm2.normalized_shape == (40,) and block.mlp.fc1.in_features == 40
        assert block.mlp.fc2.out_features == 32


def test_reuse_changes_the_later_exits() -> None:
    dvt = tiny_dvt().eval()
    x = images()
    with torch.no_grad():
        full = dvt.forward_exits(x)
        dvt.relation_reuse = False  # the same weights without the logit bias
        plain = dvt.forward_exits(x)
    assert torch.equal(full[0], plain[0])
    assert not torch.allclose(full[1], plain[1], atol=1e-4)
    assert not torch.allclose(full[2], plain[2], atol=1e-4)


def test_gradients_reach_every_exit_and_the_reuse_modules() -> None:
    dvt = tiny_dvt().train()
    y = torch.randint(0, 5, (B,))
    out = dvt(images())
    sum(F.cross_entropy(o, y) for o in out).backward()
    names = [
        "less_less_token.patch_embed.proj.weight",
        "less_less_token.head.weight",
        "less_token.head.weight",
        "normal_token.head.weight",
        "less_token.relation_reuse_conv.0.weight",
        "normal_token.relation_reuse_conv.2.weight",
        "less_token.blocks.0.feature_resuse_mlp.1.fc1.weight",
        "less_token.blocks.1.feature_resuse_mlp.1.fc2.weight",
        "normal_token.blocks.0.feature_resuse_mlp.0.weight",
    ]
    params = dict(dvt.named_parameters())
    for name in names:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    # As in the official model: only the class token reaches the head, and it gets zeros for reused
    # features, so the last exit's last block's feature MLP learns nothing.
    assert params["normal_token.blocks.1.feature_resuse_mlp.0.weight"].grad.abs().sum() == 0
    # The last exit's loss alone reaches exit 1's blocks through the reuse paths.
    dvt.zero_grad()
    F.cross_entropy(dvt(images())[2], y).backward()
    assert params["less_less_token.blocks.1.attn.qkv.weight"].grad.abs().sum() > 0
    assert (
        params["less_less_token.head.weight"].grad is None
        or params["less_less_token.head.weight"].grad.abs().sum() == 0
    )


def test_early_exit_equals_all_exits_and_per_image_selection() -> None:
    dvt = tiny_dvt().eval()
    x = images(12)
    with torch.no_grad():
        exits = dvt.forward_exits(x)
    conf = torch.stack(exits).softmax(-1).amax(-1)
    # Thresholds between neighbouring confidences: about a third leaves at exit 1, half of the rest at exit 2.
    thresholds = []
    remaining = torch.ones(12, dtype=torch.bool)
    for k, share in ((0, 1 / 3), (1, 1 / 2)):
        c = conf[k][remaining].sort().values
        i = int((1 - share) * len(c))
        thresholds.append(float((c[i - 1] + c[i]) / 2))
        remaining &= conf[k] < thresholds[k]
    expected_exit = torch.full((12,), 2)
    expected_exit[(conf[1] >= thresholds[1])] = 1
    expected_exit[(conf[0] >= thresholds[0])] = 0
    assert set(expected_exit.tolist()) == {0, 1, 2}
    batches = {}

    def record(k: int):
        def hook(module, inputs, output) -> None:
            batches[k] = inputs[0].shape[0]

        return hook

    hooks = [m.patch_embed.register_forward_hook(record(k)) for k, m in enumerate(dvt.exits)]
    result = dvt.predict_early_exit(x, thresholds)
    for hook in hooks:
        hook.remove()
    assert torch.equal(result.exit_index, expected_exit)
    selected = torch.stack(exits)[expected_exit, torch.arange(12)]
    assert torch.allclose(result.logits, selected, atol=1e-5)
    # Really exits: each exit runs only on the images still there.
    assert batches == {0: 12, 1: int((expected_exit >= 1).sum()), 2: int((expected_exit == 2).sum())}
    # Stored thresholds make eval forward exit early.
    dvt.thresholds = torch.tensor(thresholds)
    with torch.no_grad():
        assert torch.allclose(dvt(x), selected, atol=1e-5)


def official_thresholds(conf: torch.Tensor, shares: list[float]) -> torch.Tensor:
    """The official search written as a loop over samples: among samples no earlier exit took, ranked by
    confidence, the threshold is the confidence of the floor(N·share)-th."""
    n_exit, n = conf.shape
    order = conf.argsort(dim=1, descending=True)
    taken = torch.zeros(n)
    thresholds = torch.full((n_exit - 1,), math.inf)
    for k in range(n_exit - 1):
        wanted, count = math.floor(n * shares[k]), 0
        for i in order[k].tolist():
            if taken[i] == 0:
                count += 1
                if count == wanted:
                    thresholds[k] = conf[k, i]
                    break
        taken += (conf[k] >= thresholds[k]).float()
    return thresholds


def test_find_thresholds_follows_the_official_search() -> None:
    conf = torch.rand(3, 50, generator=torch.Generator().manual_seed(3))
    for q in (0.0, 0.05, 0.5, 1.0, 2.0, 20.0):
        shares = exit_shares(q)
        assert math.isclose(sum(shares), 1.0)
        assert torch.equal(find_thresholds(conf, shares), official_thresholds(conf, shares))
    shares = exit_shares(0.5)
    assert shares[0] / shares[1] == pytest.approx(2.0) and shares[1] / shares[2] == pytest.approx(2.0)
    chosen = exit_indices(conf, find_thresholds(conf, exit_shares(1.0)))
    assert torch.bincount(chosen, minlength=3).tolist()[0] == math.floor(50 / 3)


def test_thresholds_meet_their_budget_on_held_out_images() -> None:
    dvt = tiny_dvt().eval()
    costs = dvt.exit_gflops()
    assert costs[0] < costs[1] < costs[2]
    budget = (costs[0] + costs[2]) / 2
    chosen_on = [(images(64, seed=s),) for s in (10, 11, 12, 13)]
    held_out = [images(64, seed=s) for s in (20, 21, 22, 23)]
    choice = dvt.choose_thresholds(chosen_on, gflops=budget)
    assert choice.gflops <= budget
    assert torch.equal(dvt.thresholds, choice.thresholds)
    assert sum(choice.exit_shares) == pytest.approx(1.0) and min(choice.exit_shares) > 0
    spent = dvt.expected_gflops(choice.thresholds, held_out)
    assert abs(spent - budget) / budget < 0.1
    # The really exiting forward spends what the thresholds say.
    exits = torch.cat([dvt.predict_early_exit(x, choice.thresholds).exit_index for x in held_out])
    assert torch.tensor(costs)[exits].mean().item() == pytest.approx(spent)


def test_released_layout_loads_strictly(tmp_path) -> None:
    dvt = tiny_dvt()
    keys = set(dvt.state_dict())
    assert {k.split(".")[0] for k in keys} == {"less_less_token", "less_token", "normal_token"}
    block = {k.removeprefix("less_token.blocks.0.") for k in keys if k.startswith("less_token.blocks.0.")}
    assert block == {
        f"{m}.{p}"
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        + ("feature_resuse_mlp.0", "feature_resuse_mlp.1.fc1", "feature_resuse_mlp.1.fc2")
        for p in ("weight", "bias")
    }
    assert not any("feature_resuse_mlp" in k or "relation_reuse_conv" in k for k in keys if k.startswith("less_less"))
    path = tmp_path / "dvt.pth.tar"
    sd = dvt.state_dict()
    torch.save(
        {
            "model_state_dict": sd,
            "flops": [0.1, 0.2, 0.3],
            "anytime_classification": [1.0, 2.0, 3.0],
            "dynamic_threshold": torch.zeros(59, 3),
            "budgeted_batch_classification": [[], []],
        },
        path,
    )
    loaded = dynvit.create_dvt("vit_tiny_patch16_224", checkpoint=str(path), patches=PATCHES, **TINY).eval()
    with torch.no_grad():
        for a, b in zip(loaded.forward_exits(images()), dvt.eval().forward_exits(images()), strict=True):
            assert torch.equal(a, b)
    del sd["less_token.relation_reuse_conv.0.weight"]
    torch.save({"model_state_dict": sd}, path)
    with pytest.raises(ValueError, match="relation_reuse_conv"):
        dynvit.create_dvt("vit_tiny_patch16_224", checkpoint=str(path), patches=PATCHES, **TINY)


def test_bad_input() -> None:
    dvt = tiny_dvt().eval()
    with pytest.raises(ValueError, match="2 thresholds"):
        dvt.predict_early_exit(images(), [0.5])
    with pytest.raises(ValueError, match="2 thresholds"):
        dvt.predict_early_exit(images(), [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        dvt.predict_early_exit(torch.randn(2, 3, 40, 40), [0.5, 0.5])
    with pytest.raises(ValueError, match="img_size"):
        dvt(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="below exit 1's cost"):
        dvt.choose_thresholds([images()], gflops=dvt.exit_gflops()[0] / 2)
    with pytest.raises(ValueError, match="finer grids"):  # 20 px: grids 1, 2, 2
        dynvit.create_dvt("vit_tiny_patch16_224", patches=PATCHES, **{**TINY, "img_size": 20})
    with pytest.raises(ValueError, match="does not fit img_size"):
        dynvit.create_dvt("vit_tiny_patch16_224", patches=PATCHES, **{**TINY, "img_size": 8})
    with pytest.raises(ValueError, match="patches="):
        dynvit.create_dvt("vit_tiny_patch16_224", **TINY)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("deit_tiny_distilled_patch16_224", {}, "has 2 .distillation or register tokens"),
        ("vit_tiny_patch16_224", {"reg_tokens": 4}, "has 5 .distillation or register tokens"),
        ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, "no class token"),
        ("vit_tiny_patch16_224", {"img_size": (32, 48)}, r"square images, this ViT takes \(32, 48\)"),
        # LV-ViT's stem ends in a `proj` convolution too; it used to pass, then fail on set_input_size.
        ("lvvit_t", {"patch_size": 8, "stem_chans": 8}, "ConvStemEmbed .a convolutional stem.*create_dvt"),
    ],
)
def test_the_registry_refuses_vits_it_cannot_cascade(name, kwargs, message) -> None:
    # Refused when built: a distilled or register ViT used to build, then fail in its first forward.
    vit = dynvit.create_teacher(name, **{**TINY_VIT, **kwargs})
    with pytest.raises(TypeError, match=message):
        dynvit.methods.get("dvt").build(vit)


def test_onnx_exits_chain_in_onnxruntime(tmp_path) -> None:
    from dynvit.deploy.onnx import onnx_session

    dvt = tiny_dvt().eval()
    paths = dvt.export_onnx(tmp_path, images(4))
    assert [p.name for p in paths] == ["exit1.onnx", "exit2.onnx", "exit3.onnx"]
    x = images(3, seed=5)  # another batch size than the traced one: the batch is dynamic
    with torch.no_grad():
        eager = dvt.forward_exits(x)
    logits, tokens, attention = onnx_session(paths[0]).run(None, {"images": x.numpy()})
    got = [logits]
    # The exit rule outside the graphs: only two images go on to exit 2, one to exit 3.
    keep = [0, 2]
    feeds = {"images": x[keep].numpy(), "tokens": tokens[keep], "attention_logits": attention[keep]}
    logits, tokens, attention = onnx_session(paths[1]).run(None, feeds)
    got.append(logits)
    feeds = {"images": x[[2]].numpy(), "tokens": tokens[[1]], "attention_logits": attention[[1]]}
    got.append(onnx_session(paths[2]).run(None, feeds)[0])
    for ours, reference in zip(got, (eager[0], eager[1][keep], eager[2][[2]]), strict=True):
        assert torch.allclose(torch.from_numpy(ours), reference, atol=1e-4)


def test_exit_gallery_puts_each_image_in_its_exit_row(tmp_path) -> None:
    from PIL import Image

    from dynvit.models.dvt import save_exit_gallery

    x = torch.zeros(5, 1, 8, 8)
    x[:, :, :4] = 1.0  # top half bright, so every scaled image is recognisable
    exits = torch.tensor([2, 0, 2, 2, 1])
    path = save_exit_gallery(x, exits, tmp_path / "exits.png", per_exit=3)
    picture = torch.tensor(np.array(Image.open(path).convert("L")), dtype=torch.float32) / 255
    assert picture.shape == (2 + 3 * 10, 2 + 3 * 10)  # 3 rows × 3 cells of 8 px, 2 px padding
    filled = [[picture[2 + 10 * r + 6, 2 + 10 * c + 3].item() < 0.5 for c in range(3)] for r in range(3)]
    # An image's bottom half is dark; blank cells are white.
    assert filled == [[True, False, False], [True, False, False], [True, True, True]]
    with pytest.raises(ValueError, match="one exit per image"):
        save_exit_gallery(x, exits[:3], tmp_path / "bad.png")


def test_released_deit_s_cascade_has_the_official_layout() -> None:
    # Measured on the official code (DVT_Deit_small, 1000 classes): 608 tensors, 70,442,232 numbers.
    dvt = dynvit.create_dvt("deit_small_patch16_224")
    sd = dvt.state_dict()
    assert dvt.tokens_per_exit == [50, 101, 197]
    assert len(sd) == 608 and sum(v.numel() for v in sd.values()) == 70_442_232
    shapes = {
        "less_less_token.patch_embed.proj.weight": (384, 3, 32, 32),
        "less_token.patch_embed.proj.weight": (384, 3, 23, 23),
        "less_token.pos_embed": (1, 101, 384),
        "less_token.blocks.0.mlp.fc1.weight": (1536, 432),
        "less_token.relation_reuse_conv.0.weight": (216, 72, 1, 1),
        "normal_token.blocks.11.feature_resuse_mlp.1.fc2.weight": (48, 128),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert dvt.less_token.patch_embed.proj.padding == (3, 3)
