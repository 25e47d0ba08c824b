"""The balancing plan: which layers are balanced (first / last, eigenvalue threshold, frozen, types,
tied weights), which norm layer follows which (by order or by name, custom norm types), and its repr."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from tempbalance.groups import norm_features, plan_balance, register_norm_type


def test_order_mode_uses_structure_not_names():
    model = nn.Sequential(
        OrderedDict(
            stem=nn.Conv2d(3, 32, 3),
            a=nn.Conv2d(32, 64, 3),
            b=nn.BatchNorm2d(64),
            c=nn.Conv2d(64, 32, 3),
            d=nn.BatchNorm2d(64),  # feature mismatch with c: keeps the global rate
            e=nn.Conv2d(32, 32, 3),
            head=nn.Linear(32, 10),
        )
    )
    plan = plan_balance(model)
    assert plan.names == ["a", "c", "e"]
    assert plan.norm_owner == {"b": "a"}
    assert plan.layers[0].norms == ["b"]
    assert plan_balance(model, norm_follows="name").norm_owner == {}
    assert plan_balance(model, norm_follows=None).norm_owner == {}


def test_layernorm_follows_its_linear():
    model = nn.Sequential(
        nn.Linear(16, 64), nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 128), nn.LayerNorm(64), nn.Linear(128, 4)
    )
    plan = plan_balance(model)
    assert plan.names == ["1", "3"]
    assert plan.norm_owner == {"2": "1"}  # "4" has 64 features after a 128-output Linear


def test_eigs_thresh_first_last_and_frozen():
    model = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 8), nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 2))
    plan = plan_balance(model)
    # "2" (64 x 8) and "3" (8 x 64) have 8 eigenvalues < 50
    assert plan.names == ["1", "4"]
    assert plan.skipped["0"] == "first layer" and plan.skipped["5"] == "last layer"
    assert "8 eigenvalues < eigs_thresh=50" in plan.skipped["2"]
    assert plan_balance(model, eigs_thresh=0, remove_first=False, remove_last=False).names == [str(i) for i in range(6)]
    model[4].weight.requires_grad_(False)
    plan = plan_balance(model)
    assert plan.names == ["1"] and "frozen" in plan.skipped["4"]


def test_conv_eigenvalue_count_matches_the_reference():
    # per-position conv matrices: kh * kw * min(out, in) eigenvalues (here 9 * 5 = 45 < 50)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 5, 3), nn.Conv2d(5, 6, 3), nn.Conv2d(6, 3, 3))
    plan = plan_balance(model)
    assert plan.names == [] and "45 eigenvalues" in plan.skipped["1"] and "45 eigenvalues" in plan.skipped["2"]
    assert plan_balance(model, eigs_thresh=45).names == ["1", "2"]


def test_types_restrict_the_candidates():
    model = nn.Sequential(nn.Conv1d(1, 64, 5), nn.Conv1d(64, 64, 3), nn.Conv1d(64, 64, 3), nn.Linear(64, 64), nn.Linear(64, 10))
    assert plan_balance(model).names == ["1", "2", "3"]
    # the reference only looks at Conv2d / Linear
    assert plan_balance(model, types=(nn.Conv2d, nn.Linear)).names == []


def test_custom_norm_type():
    class ChannelNorm(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(c))

    assert norm_features(ChannelNorm(4)) is None
    register_norm_type(ChannelNorm, lambda m: m.scale.numel())
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), ChannelNorm(64), nn.Linear(64, 64))
    plan = plan_balance(model)
    assert plan.norm_owner == {"2": "1"} and plan.layers[0].params[-1] is model[2].scale


def test_tied_embedding_and_head_count_as_first_and_last():
    class LM(nn.Module):
        def __init__(self, vocab=100, d=64):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.fc1 = nn.Linear(d, d)
            self.ln = nn.LayerNorm(d)
            self.fc2 = nn.Linear(d, d)
            self.head = nn.Linear(d, vocab, bias=False)
            self.head.weight = self.emb.weight

    plan = plan_balance(LM())
    # the head shares the embedding's weight: first and last layer are the same weight
    assert plan.names == ["fc1", "fc2"] and plan.skipped == {"emb": "first and last layer (tied weight)"}
    assert plan.norm_owner == {"ln": "fc1"}
    untied = LM()
    untied.head.weight = nn.Parameter(torch.randn(100, 64))
    assert plan_balance(untied).names == ["fc1", "fc2"]
    assert plan_balance(untied).skipped == {"emb": "first layer", "head": "last layer"}


def test_the_repr_of_a_plan_is_a_summary_not_every_weight():
    import torchvision

    plan = plan_balance(torchvision.models.resnet18())
    text = repr(plan)
    assert text.startswith("BalancePlan(19 balanced layers [layer1.0.conv1") and "tensor" not in text
    assert len(text) < 200
    assert repr(plan.layers[0]) == (
        "BalancedLayer('layer1.0.conv1', Conv2d (64, 64, 3, 3), 576 eigenvalues, 3 parameters, norms=['layer1.0.bn1'])"
    )
