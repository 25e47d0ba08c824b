"""Balancing the weight decay (AlphaDecay), both targets at once, and ``normalize="mean"``,
against the rules re-derived here in float64 (the reference alphas of tests/helpers/reference.py:
numpy SVD, median Hill alpha; AlphaDecay's map as np.interp of alpha onto [wd_s1, wd_s2] x the base
decay)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as lrs

import tempbalance
from tempbalance import TempBalance
from tempbalance.errors import ConfigError
from tests.helpers.models import SmallNet, perturb, reference_model, train_step
from tests.helpers.reference import rule_owners
from tests.helpers.reference import reference_alphas as rule_alphas

LR, WD = 0.1, 5e-4


def interp_factors(alphas: dict[str, float], low: float, high: float) -> dict[str, float]:
    """AlphaDecay's map: np.interp of each alpha onto [low, high] between the smallest and the largest alpha."""
    a = np.array(list(alphas.values()))
    return dict(zip(alphas, np.interp(a, [a.min(), a.max()], [low, high]).tolist()))


def per_param(model, owners: dict[str, str], factors: dict[str, float], base: float) -> dict[int, float]:
    modules = dict(model.named_modules())
    out = {id(p): base for p in model.parameters()}
    for name, owner in owners.items():
        for p in modules[name].parameters(recurse=False):
            out[id(p)] = base * factors[owner]
    return out


def option_by_param(optimizer, key: str) -> dict[int, float]:
    return {id(p): float(g[key]) for g in optimizer.param_groups for p in g["params"]}


def assert_close(got: dict[int, float], want: dict[int, float], rel: float = 1e-9) -> None:
    assert got.keys() == want.keys()
    worst = max(abs(got[k] / want[k] - 1) if want[k] else abs(got[k]) for k in want)
    assert worst < rel


@pytest.mark.parametrize("arch", ["resnet18", "transformer"])
def test_alphadecay_weight_decays_equal_the_interp_rule(arch):
    model = reference_model(arch)
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR, momentum=0.9, weight_decay=WD)
    scheduler = TempBalance(model, optimizer, balance="weight_decay")
    alphas = rule_alphas(model)
    owners = rule_owners(model, alphas, "order")  # a norm layer follows its owner's weight decay
    assert_close(option_by_param(optimizer, "weight_decay"), per_param(model, owners, interp_factors(alphas, 0.5, 1.5), WD))
    assert {float(g["lr"]) for g in optimizer.param_groups} == {LR}  # the rate is left alone
    assert set(scheduler.factors.values()) == {1.0}
    wd_factors = scheduler.weight_decay_factors
    assert min(wd_factors.values()) == 0.5 and max(wd_factors.values()) == 1.5
    row = scheduler.history_rows()[0]
    assert row["factor"] == 1.0 and row["lr"] == LR
    assert row["weight_decay"] == pytest.approx(WD * row["weight_decay_factor"], rel=1e-15)


def test_both_targets_with_their_own_ranges():
    model = reference_model("resnet18")
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR, momentum=0.9, weight_decay=WD)
    TempBalance(model, optimizer, balance=("weight_decay", "lr"), s1=0.6, s2=1.4, wd_s1=0.2, wd_s2=2.0)
    alphas = rule_alphas(model)
    owners = rule_owners(model, alphas, "order")
    assert_close(option_by_param(optimizer, "lr"), per_param(model, owners, interp_factors(alphas, 0.6, 1.4), LR))
    assert_close(option_by_param(optimizer, "weight_decay"), per_param(model, owners, interp_factors(alphas, 0.2, 2.0), WD))


def test_weight_decay_balancing_leaves_the_schedule_of_the_rate_exact():
    torch.manual_seed(2)
    plain = SmallNet()
    plain_opt = torch.optim.SGD(tempbalance.param_groups(plain), lr=LR, momentum=0.9, weight_decay=WD)
    plain_cosine = lrs.CosineAnnealingLR(plain_opt, T_max=6)
    torch.manual_seed(2)
    model = SmallNet()
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR, momentum=0.9, weight_decay=WD)
    scheduler = TempBalance(model, optimizer, lrs.CosineAnnealingLR(optimizer, T_max=6), balance="weight_decay")
    for step in range(5):
        train_step(plain, plain_opt, step)
        train_step(model, optimizer, step)
        plain_cosine.step()
        scheduler.step()
        assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in plain_opt.param_groups]
        assert scheduler.get_last_lr() == plain_cosine.get_last_lr()
    decays = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decays["rest"] == WD and len(set(decays.values())) == 4  # three balanced layers, each its own


def test_unit_weight_decay_ratios_reproduce_plain_training_exactly():
    torch.manual_seed(3)
    plain = SmallNet()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=LR, momentum=0.9, weight_decay=WD)
    torch.manual_seed(3)
    model = SmallNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=WD)
    scheduler = TempBalance(model, optimizer, balance="weight_decay", wd_s1=1.0, wd_s2=1.0)
    for step in range(4):
        train_step(plain, plain_opt, step)
        train_step(model, optimizer, step)
        scheduler.step()
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_untuned_weight_decay_is_each_groups_own_and_follows_the_user(caplog):
    model = SmallNet()
    groups = tempbalance.param_groups(model, weight_decay=WD, no_decay_norm_bias=True)
    optimizer = torch.optim.SGD(groups, lr=LR)
    scheduler = TempBalance(model, optimizer, balance="weight_decay")
    no_decay = [g for g in optimizer.param_groups if g["name"].endswith("no_decay")]
    assert no_decay and all(g["weight_decay"] == 0.0 for g in no_decay)  # 0 x factor stays 0
    for group in optimizer.param_groups:
        group["weight_decay"] = 2e-3 if not group["name"].endswith("no_decay") else 0.0
    with caplog.at_level(logging.WARNING, logger="tempbalance"):
        scheduler.step()
    assert any("weight decay of group" in r.getMessage() and "changed outside" in r.getMessage() for r in caplog.records)
    for group in optimizer.param_groups:
        if "tb_layer" in group and not group["name"].endswith("no_decay"):
            assert group["tb_untuned_weight_decay"] == 2e-3
            assert group["weight_decay"] == pytest.approx(2e-3 * scheduler.weight_decay_factors[group["tb_layer"]], rel=1e-15)


def test_resume_restores_both_targets_exactly():
    def setup(seed):
        torch.manual_seed(seed)
        model = SmallNet()
        optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR, momentum=0.9, weight_decay=WD)
        return model, optimizer, TempBalance(model, optimizer, lrs.CosineAnnealingLR(optimizer, T_max=8),
                                             balance=("lr", "weight_decay"))

    def options(optimizer):
        return [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]

    model, optimizer, scheduler = setup(0)
    uninterrupted = []
    for step in range(6):
        train_step(model, optimizer, step)
        scheduler.step()
        uninterrupted.append(options(optimizer))
    model, optimizer, scheduler = setup(0)
    for step in range(3):
        train_step(model, optimizer, step)
        scheduler.step()
    saved = {"model": model.state_dict(), "opt": optimizer.state_dict(), "tb": scheduler.state_dict()}
    assert set(saved["tb"]["weight_decay_factors"]) == {"c1", "c2", "c3"}
    model, optimizer, scheduler = setup(9)
    model.load_state_dict(saved["model"])
    scheduler.load_state_dict(saved["tb"])
    optimizer.load_state_dict(saved["opt"])
    resumed = []
    for step in range(3, 6):
        train_step(model, optimizer, step)
        scheduler.step()
        resumed.append(options(optimizer))
    assert resumed == uninterrupted[3:]


@pytest.mark.parametrize("assign", ["linear", "step", "sigmoid"])
@pytest.mark.parametrize("balance", ["lr", "weight_decay"])
def test_normalize_mean_divides_the_map_by_its_mean(assign, balance):
    model = reference_model("resnet18")
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR, momentum=0.9, weight_decay=WD)
    key = {"lr": "assign", "weight_decay": "wd_assign"}[balance]
    scheduler = TempBalance(model, optimizer, balance=balance, normalize="mean", **{key: assign})
    alphas = np.array(list(rule_alphas(model).values()))
    if assign == "linear":
        raw = 0.5 + (alphas - alphas.min()) / (alphas.max() - alphas.min())
    elif assign == "step":  # by rank, s1 + (s2 - s1) * rank / n as the reference
        raw = 0.5 + np.argsort(np.argsort(alphas)) / alphas.size
    else:  # Model Balancing: 10 ** (sigmoid(10 (a - mean)) - 0.5)
        raw = 10.0 ** (1.0 / (1.0 + np.exp(-10.0 * (alphas - alphas.mean()))) - 0.5)
    expected = raw / raw.mean()
    got = np.array(list((scheduler.factors if balance == "lr" else scheduler.weight_decay_factors).values()))
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert got.mean() == pytest.approx(1.0, rel=1e-12)
    plain = TempBalance(model, torch.optim.SGD(tempbalance.param_groups(model), lr=LR), **{key: assign}, balance=balance)
    plain_factors = np.array(list((plain.factors if balance == "lr" else plain.weight_decay_factors).values()))
    assert abs(plain_factors.mean() - 1.0) > 1e-3  # without normalize, the mean moves


def test_normalize_skips_layers_that_keep_factor_one():
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
    torch.manual_seed(0)
    with torch.no_grad():
        model[3].weight.fill_(float("nan"))
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR)
    factors = TempBalance(model, optimizer, normalize="mean").factors
    assert factors["3"] == 1.0
    others = np.array([factors[k] for k in ("1", "2", "4")])
    assert others.mean() == pytest.approx(1.0, rel=1e-12) and others.max() > others.min()


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"balance": "momentum"}, "balance='momentum'"),
        ({"balance": ("lr", "lr")}, "at most once"),
        ({"balance": []}, "must be 'lr', 'weight_decay'"),
        ({"balance": "weight_decay", "wd_s1": 0.0}, "wd_s1=0.0 must be > 0"),
        ({"balance": "weight_decay", "wd_s1": 2.0}, "wd_s1=2.0 must be <= wd_s2=1.5"),
        ({"wd_assign": "cubic"}, "assign='cubic' is not a known assignment function"),
        ({"normalize": "median"}, "normalize='median' is not one of ('none', 'mean')"),
    ],
)
def test_target_option_validation(options, fragment):
    model = SmallNet()
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR)
    with pytest.raises(ConfigError) as err:
        TempBalance(model, optimizer, **options)
    assert fragment in str(err.value)


def test_weight_decay_factors_change_with_the_weights():
    torch.manual_seed(4)
    model = SmallNet()
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR, weight_decay=WD)
    scheduler = TempBalance(model, optimizer, balance="weight_decay")
    seen = set()
    for step in range(4):
        perturb(model, step)
        scheduler.step()
        seen.add(tuple(round(f, 9) for f in scheduler.weight_decay_factors.values()))
        assert_close(option_by_param(optimizer, "weight_decay"),
                     per_param(model, rule_owners(model, rule_alphas(model), "order"),
                               interp_factors(rule_alphas(model), 0.5, 1.5), WD))
    assert len(seen) == 4
