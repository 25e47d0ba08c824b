"""The rates TempBalance sets on reference models (the project's CIFAR ResNet18 and VGG16 at small
width, a small Transformer), pinned against the published rule re-derived here in float64.

The re-derivation knows nothing of the library: it walks ``named_modules()``, keeps Conv2d and
Linear layers in module order, drops the first and the last and those with fewer than 50
eigenvalues, takes the eigenvalues as squared singular values (numpy float64 SVD; a conv as its
kh*kw out x in matrices scaled by sqrt(0.5)), fits the median Hill alpha of the reference and maps
alpha linearly onto [s1, s2]. A norm layer follows its layer by module order (feature counts equal)
or by the reference's "bn" -> "conv" name rule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tempbalance
from tempbalance import TempBalance
from tests.helpers.models import reference_model
from tests.helpers.reference import rule_owners
from tests.helpers.reference import reference_alphas as rule_alphas


def rule_factors(alphas: dict[str, float], s1: float, s2: float) -> dict[str, float]:
    a = np.array(list(alphas.values()))
    return dict(zip(alphas, (s1 + (s2 - s1) * (a - a.min()) / (a.max() - a.min())).tolist()))


def rule_rates(model: nn.Module, lr: float, norm_follows: str, s1: float = 0.5, s2: float = 1.5) -> dict[int, float]:
    alphas = rule_alphas(model)
    factors = rule_factors(alphas, s1, s2)
    modules = dict(model.named_modules())
    rates = {id(p): lr for p in model.parameters()}
    for name, owner in rule_owners(model, alphas, norm_follows).items():
        for p in modules[name].parameters(recurse=False):
            rates[id(p)] = lr * factors[owner]
    return rates


@pytest.mark.parametrize(
    "arch, norm_follows, s1, s2",
    [
        ("resnet18", "order", 0.5, 1.5),
        ("resnet18", "name", 0.5, 1.5),
        ("vgg16", "order", 0.6, 1.4),
        ("transformer", "order", 0.5, 1.5),
    ],
)
def test_reference_model_rates_equal_the_float64_rule(arch, norm_follows, s1, s2):
    model = reference_model(arch)
    lr = 0.1
    optimizer = torch.optim.SGD(tempbalance.param_groups(model, norm_follows=norm_follows), lr=lr, momentum=0.9)
    scheduler = TempBalance(model, optimizer, norm_follows=norm_follows, s1=s1, s2=s2)
    expected = rule_rates(model, lr, norm_follows, s1, s2)
    assert scheduler.layers == list(rule_alphas(model))
    worst = max(abs(float(g["lr"]) / expected[id(p)] - 1) for g in optimizer.param_groups for p in g["params"])
    assert worst < 1e-12
    got = sorted({float(g["lr"]) for g in optimizer.param_groups})
    assert got[0] == pytest.approx(lr * s1, rel=1e-12) and got[-1] == pytest.approx(lr * s2, rel=1e-12)


def test_the_two_norm_rules_differ_on_the_resnet_shortcut():
    """Under "name" the shortcut BatchNorm keeps the global rate; under "order" it follows its conv."""
    model = reference_model("resnet18")
    alphas = rule_alphas(model)
    by_order = rule_owners(model, alphas, "order")
    by_name = rule_owners(model, alphas, "name")
    shortcut_norms = sorted(n for n in by_order if n.endswith("shortcut.1"))
    assert shortcut_norms and not any(n in by_name for n in shortcut_norms)
    for rule, owners in (("order", by_order), ("name", by_name)):
        plan = tempbalance.plan_balance(model, norm_follows=rule)
        assert {norm: owner for layer in plan.layers for norm in layer.norms for owner in [layer.name]} == {
            n: o for n, o in owners.items() if n != o
        }
