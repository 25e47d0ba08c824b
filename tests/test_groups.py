"""Layer selection for balancing, norm-to-layer ownership, and optimizer param groups."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import tempbalance
from tempbalance.errors import ConfigError
from tempbalance.groups import LayerSelection, norm_features, plan_balance, register_norm_type


class Block(nn.Module):
    """A CIFAR-ResNet basic block with a projection shortcut (reference naming)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = Block(64, 128)  # shortcut: 1x1 conv 64 -> 128, 64 eigenvalues
        self.linear = nn.Linear(128, 10)

    def forward(self, x):
        out = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.linear(out.mean((2, 3)))


def all_params_once(groups, model):
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)), "a parameter is in two groups"
    assert set(seen) == {id(p) for p in model.parameters()}


def has(params, p):
    return any(q is p for q in params)


def group(groups, name):
    (g,) = [g for g in groups if g["name"] == name]
    return g


def test_resnet_block_default_order_mode():
    model = TinyResNet()
    groups = tempbalance.param_groups(model, weight_decay=5e-4, momentum=0.9)
    all_params_once(groups, model)
    names = [g["name"] for g in groups]
    # conv1 (first) and linear (last) stay at the global rate; every other conv is balanced
    assert names == ["layer1.conv1", "layer1.conv2", "layer1.shortcut.0", "rest"]
    assert all(g["weight_decay"] == 5e-4 and g["momentum"] == 0.9 for g in groups)
    blk = model.layer1
    assert group(groups, "layer1.conv1")["params"] == [blk.conv1.weight, blk.bn1.weight, blk.bn1.bias]
    assert group(groups, "layer1.conv2")["params"] == [blk.conv2.weight, blk.bn2.weight, blk.bn2.bias]
    # order mode: the shortcut BatchNorm follows the shortcut conv
    assert group(groups, "layer1.shortcut.0")["params"] == [blk.shortcut[0].weight, blk.shortcut[1].weight, blk.shortcut[1].bias]
    rest = group(groups, "rest")["params"]
    assert has(rest, model.conv1.weight) and has(rest, model.bn1.weight) and has(rest, model.linear.weight)
    assert all(g["tb_layer"] == g["name"] for g in groups if g["name"] != "rest")
    assert "tb_layer" not in group(groups, "rest")


def test_name_mode_reproduces_the_reference_matching():
    model = TinyResNet()
    plan = plan_balance(model, norm_follows="name")
    assert plan.norm_owner == {"bn1": "conv1", "layer1.bn1": "layer1.conv1", "layer1.bn2": "layer1.conv2"}
    groups = tempbalance.param_groups(model, norm_follows="name")
    all_params_once(groups, model)
    # the shortcut BN ("layer1.shortcut.1") has no "bn" -> "conv" partner: global rate
    assert group(groups, "layer1.shortcut.0")["params"] == [model.layer1.shortcut[0].weight]
    assert has(group(groups, "rest")["params"], model.layer1.shortcut[1].weight)


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


def test_no_decay_norm_bias_groups():
    model = TinyResNet()
    model.layer1.conv1.bias = nn.Parameter(torch.zeros(128))
    groups = tempbalance.param_groups(model, no_decay_norm_bias=True, weight_decay=1e-4, lr=0.05)
    all_params_once(groups, model)
    nd = group(groups, "layer1.conv1.no_decay")
    assert nd["tb_layer"] == "layer1.conv1" and nd["weight_decay"] == 0.0 and nd["lr"] == 0.05
    blk = model.layer1
    assert nd["params"] == [blk.conv1.bias, blk.bn1.weight, blk.bn1.bias]
    assert group(groups, "layer1.conv1")["params"] == [blk.conv1.weight]
    assert group(groups, "layer1.conv1")["weight_decay"] == 1e-4
    rest_nd = group(groups, "rest.no_decay")
    assert has(rest_nd["params"], model.bn1.weight) and has(rest_nd["params"], model.linear.bias)
    assert has(group(groups, "rest")["params"], model.linear.weight)


def test_resnet18_from_the_model_zoo():
    models = pytest.importorskip("tempbalance.train.models")
    model = models.create_model("resnet18", num_classes=10)
    plan = plan_balance(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert plan.names == convs[1:]  # the stem conv and the Linear head are excluded
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(plan.norm_owner) == sorted(bns)  # every BN directly follows a conv of its width
    name_plan = plan_balance(model, norm_follows="name")
    shortcut_bns = [n for n in bns if "shortcut" in n]
    assert shortcut_bns and not set(shortcut_bns) & set(name_plan.norm_owner)
    groups = tempbalance.param_groups(model)
    all_params_once(groups, model)


def test_selection_validation_messages():
    with pytest.raises(ConfigError, match=r"eigs_thresh=-1 must be an integer >= 0"):
        LayerSelection(eigs_thresh=-1)
    with pytest.raises(ConfigError, match=r"norm_follows='names' is not one of \('order', 'name', 'none'\)"):
        LayerSelection(norm_follows="names")
    with pytest.raises(ConfigError, match="remove_first=1 must be True or False"):
        LayerSelection(remove_first=1)
    with pytest.raises(ConfigError, match="types=.* nn.Module subclasses"):
        LayerSelection(types=(int,))
    with pytest.raises(ConfigError, match="conv_mode='pool'"):
        LayerSelection(conv_mode="pool")
    with pytest.raises(ConfigError, match="sets 'params' itself"):
        tempbalance.param_groups(TinyResNet(), params=[])


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


def test_wrappers_are_unwrapped():
    model = TinyResNet()
    wrapped = nn.DataParallel(model)
    assert plan_balance(wrapped).names == plan_balance(model).names
    all_params_once(tempbalance.param_groups(wrapped), model)


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
