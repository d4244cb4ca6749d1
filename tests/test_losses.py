import math

import pytest
import torch

from dynvit import create_student
from dynvit.lightning.optim import param_groups, warmup_cosine
from dynvit.models import StudentOutput
from dynvit.objectives.dynamicvit import (
    DynamicViTLoss,
    classification_loss,
    keep_ratio_loss,
    logit_distillation_loss,
    token_distillation_loss,
)
from tests.conftest import TINY, TINY_LOC


def test_keep_ratio_loss_is_mean_squared_gap_per_stage():
    decisions = [torch.ones(4, 10), torch.zeros(4, 10)]
    decisions[1][:, :5] = 1  # half kept at stage 2
    loss = keep_ratio_loss(decisions, [0.7, 0.49])
    assert loss.item() == pytest.approx(((1 - 0.7) ** 2 + (0.5 - 0.49) ** 2) / 2)


def test_classification_loss_takes_hard_and_soft_targets():
    logits = torch.randn(3, 5)
    y = torch.tensor([0, 2, 4])
    soft = torch.nn.functional.one_hot(y, 5).float()
    assert classification_loss(logits, y).item() == pytest.approx(classification_loss(logits, soft).item(), rel=1e-6)
    assert classification_loss(logits, y, label_smoothing=0.1) != classification_loss(logits, y)


def test_logit_distillation_is_zero_for_identical_logits_and_positive_otherwise():
    a = torch.randn(4, 7)
    assert logit_distillation_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert logit_distillation_loss(a, torch.randn(4, 7)).item() > 0


def test_token_distillation_only_compares_kept_tokens():
    s, t = torch.zeros(2, 4, 3), torch.zeros(2, 4, 3)
    t[0, 1] = 10.0  # differs only at a dropped token
    t[1, 2] = 2.0  # differs at a kept token
    mask = torch.tensor([[1.0, 0, 1, 1], [1, 1, 1, 0]])
    # 6 kept tokens x 3 channels, one of them off by 2 in every channel.
    assert token_distillation_loss(s, t, mask).item() == pytest.approx(3 * 4 / (6 * 3))
    none_kept = token_distillation_loss(s.requires_grad_(), t, torch.zeros(2, 4))
    assert none_kept.item() == 0.0 and torch.isfinite(none_kept)


def test_dynamicvit_loss_is_the_weighted_sum_of_its_terms():
    B, N, C, K = 4, 8, 6, 5
    out = StudentOutput(torch.randn(B, K), torch.randn(B, N, C), torch.ones(B, N), [torch.rand(B, N)])
    loss = DynamicViTLoss(ratio_weight=2.0, distill_weight=0.5, token_weight=0.25)
    terms = loss(out, torch.randint(0, K, (B,)), [0.7], torch.randn(B, K), torch.randn(B, N, C))
    expected = terms.cls + 2.0 * terms.ratio + 0.5 * terms.distill + 0.25 * terms.token
    assert terms.total.item() == pytest.approx(expected.item())
    off = DynamicViTLoss(token_weight=0.0)(out, torch.zeros(B, dtype=torch.long), [0.7], torch.randn(B, K), out.tokens)
    assert off.token.item() == 0.0


def test_param_groups_split_lr_and_weight_decay():
    student = create_student("deit_tiny_patch16_224", pruning_loc=TINY_LOC, **TINY)
    groups = param_groups(student, lr=1e-3, weight_decay=0.05, lr_scales={"score_predictor.": 1.0, "": 0.01})
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(student.named_parameters())
    assert by_param[id(named["score_predictor.0.out_conv.0.weight"])]["lr"] == pytest.approx(1e-3)
    assert by_param[id(named["blocks.0.attn.qkv.weight"])]["lr"] == pytest.approx(1e-5)
    assert by_param[id(named["blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.05
    for no_decay in (
        "pos_embed",
        "cls_token",
        "norm.weight",
        "blocks.0.attn.qkv.bias",
        "score_predictor.0.in_conv.0.weight",
    ):
        assert by_param[id(named[no_decay])]["weight_decay"] == 0.0, no_decay
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))
