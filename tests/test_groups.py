"""Optimizer param groups for balancing: one group per balanced layer with its norm layers, the
rest apart, no-decay groups, wrapped models, and the checks of the options given."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tempbalance
from tempbalance.errors import ConfigError
from tempbalance.groups import LayerSelection, plan_balance
from tests.helpers.models import MLP


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


def test_wrappers_are_unwrapped():
    model = TinyResNet()
    wrapped = nn.DataParallel(model)
    assert plan_balance(wrapped).names == plan_balance(model).names
    all_params_once(tempbalance.param_groups(wrapped), model)


# ---------------------------------------------------------------- per-group options


@pytest.mark.slow
@pytest.mark.parametrize("key, value", [("weight_decay", -5e-4), ("weight_decay", float("nan")), ("lr", float("inf")), ("momentum", -0.9)])
def test_param_groups_rejects_bad_group_options(key, value):
    """torch checks these only in an optimizer's defaults, so a per-group value must be checked here."""
    with pytest.raises(ConfigError, match=f"{key}="):
        tempbalance.param_groups(MLP(), **{key: value})
    assert len(tempbalance.param_groups(MLP(), **{key: 0.0})) == 4  # h1, h2, h3, rest
