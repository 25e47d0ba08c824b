"""Tests of the method registry: every method builds and takes a step; each one's optimizer,
schedule and regulariser carry the paper's settings; no config <-> methods import
cycle."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tempbalance.errors import ConfigError
from tempbalance.regularize import SpectralNormRegularizer
from tempbalance.train import METHODS, TrainConfig, build_method
from tempbalance.train.methods import balanced_rates, balanced_weight_decays, global_lr
from tests.helpers.paths import PACKAGE

PAPER_METHODS = {"cal", "snr", "tb", "tb+snr", "sgdr", "lars", "lamb", "lookahead", "sgdp", "tb+sgdp"}
FOLLOW_UP_METHODS = {"alphadecay", "tb+alphadecay"}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def config(method: str, **overrides) -> TrainConfig:
    values = dict(dataset="digits", method=method, epochs=10, lr=0.1, weight_decay=5e-4, snr_coef=0.01)
    values.update(overrides)
    return TrainConfig(**values)


def test_registry_has_every_paper_method():
    assert set(METHODS) == PAPER_METHODS | FOLLOW_UP_METHODS


@pytest.mark.parametrize("method", sorted(PAPER_METHODS | FOLLOW_UP_METHODS))
def test_every_method_takes_a_step(method):
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    parts = build_method(model, config(method))
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), y)
        parts.optimizer.zero_grad()
        loss.backward()
        if parts.regularizer is not None:
            parts.regularizer.apply()
        parts.optimizer.step()
    parts.scheduler.step()
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert "11.weight" in changed and "3.weight" in changed
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert global_lr(parts.optimizer) > 0
    assert (parts.regularizer is not None) == method.endswith("snr")
    assert (parts.balancer is not None) == (method.startswith("tb") or method == "alphadecay")
    state = parts.scheduler.state_dict()
    fresh = build_method(tiny_model(), config(method))
    fresh.scheduler.load_state_dict(state)
    fresh.optimizer.load_state_dict(parts.optimizer.state_dict())
    assert global_lr(fresh.optimizer) == pytest.approx(global_lr(parts.optimizer))


def _step_epochs(parts, epochs: int) -> list[float]:
    rates = []
    for _ in range(epochs):
        rates.append(global_lr(parts.optimizer))
        parts.optimizer.step()
        parts.scheduler.step()
    return rates


def test_cal_is_sgd_momentum_with_cosine_over_all_epochs():
    parts = build_method(tiny_model(), config("cal", epochs=10))
    group = parts.optimizer.param_groups[0]
    assert isinstance(parts.optimizer, torch.optim.SGD)
    assert (group["momentum"], group["weight_decay"]) == (0.9, 5e-4)
    expected = [0.05 * (1 + math.cos(math.pi * t / 10)) for t in range(10)]
    assert _step_epochs(parts, 10) == pytest.approx(expected)


def test_sgdr_restarts_every_t0_epochs():
    parts = build_method(tiny_model(), config("sgdr", epochs=12, sgdr_t0=4))
    expected = [0.05 * (1 + math.cos(math.pi * (t % 4) / 4)) for t in range(12)]
    assert _step_epochs(parts, 12) == pytest.approx(expected)
    paper = build_method(tiny_model(), config("sgdr"))
    assert (paper.scheduler.T_0, paper.scheduler.T_mult) == (100, 1)


def test_baseline_optimizers_have_the_paper_settings():
    timm_optim = pytest.importorskip("timm.optim")
    lars = build_method(tiny_model(), config("lars", lr=28.0)).optimizer
    assert isinstance(lars, timm_optim.Lars)
    assert lars.param_groups[0]["trust_coeff"] == 1e-3 and lars.param_groups[0]["momentum"] == 0
    assert lars.param_groups[0]["lr"] == 28.0
    look = build_method(tiny_model(), config("lookahead")).optimizer
    assert isinstance(look, timm_optim.Lookahead)
    assert (look.defaults["lookahead_k"], look.defaults["lookahead_alpha"]) == (10, 0.8)
    assert isinstance(look._base_optimizer, torch.optim.SGD) and look.param_groups[0]["momentum"] == 0.9
    assert isinstance(build_method(tiny_model(), config("lamb")).optimizer, timm_optim.Lamb)
    sgdp = build_method(tiny_model(), config("sgdp")).optimizer
    assert isinstance(sgdp, timm_optim.SGDP) and sgdp.param_groups[0]["momentum"] == 0.9


def test_snr_methods_regularise_despite_weight_decay():
    parts = build_method(tiny_model(), config("snr", weight_decay=5e-4, snr_coef=0.02))
    assert isinstance(parts.regularizer, SpectralNormRegularizer) and parts.regularizer.coef == 0.02
    assert parts.optimizer.param_groups[0]["weight_decay"] == 5e-4
    model = tiny_model()
    parts = build_method(model, config("snr", snr_coef=0.02))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    parts.regularizer.apply()
    assert torch.count_nonzero(model[0].weight.grad) > 0


@pytest.mark.parametrize("method", ["tb", "tb+sgdp", "tb+snr"])
def test_balanced_methods_spread_rates_between_s1_and_s2(method):
    model = tiny_model()
    parts = build_method(model, config(method, lr=0.2, s1=0.6, s2=1.4))
    rates = balanced_rates(parts.optimizer)
    assert sorted(rates) == ["3", "6"]  # the first conv and the last linear are not balanced
    assert sorted(rates.values()) == pytest.approx([0.6 * 0.2, 1.4 * 0.2])
    assert global_lr(parts.optimizer) == pytest.approx(0.2)
    # the linear map follows alpha: the layer with the larger alpha gets the larger rate
    alphas = {entry.layer: entry.alpha for entry in parts.balancer.history[-1].layers}
    assert max(rates, key=rates.get) == max(alphas, key=alphas.get)


@pytest.mark.parametrize("method, lr_balanced", [("alphadecay", False), ("tb+alphadecay", True)])
def test_alphadecay_methods_spread_weight_decays_between_wd_s1_and_wd_s2(method, lr_balanced):
    model = tiny_model()
    parts = build_method(model, config(method, lr=0.2, weight_decay=1e-3, wd_s1=0.25, wd_s2=2.0, s1=0.6, s2=1.4))
    decays = balanced_weight_decays(parts.optimizer)
    assert sorted(decays.values()) == pytest.approx([0.25e-3, 2.0e-3])
    alphas = {entry.layer: entry.alpha for entry in parts.balancer.history[-1].layers}
    assert max(decays, key=decays.get) == max(alphas, key=alphas.get)  # larger alpha, larger decay
    rates = sorted(balanced_rates(parts.optimizer).values())
    assert rates == (pytest.approx([0.6 * 0.2, 1.4 * 0.2]) if lr_balanced else [0.2, 0.2])
    rest = [g for g in parts.optimizer.param_groups if "tb_layer" not in g]
    assert [g["weight_decay"] for g in rest] == [1e-3]


def test_paper_norm_rule_and_normalize_reach_the_balancer():
    model = tiny_model()
    parts = build_method(model, config("tb", norm_follows="name", normalize="mean"))
    assert parts.balancer.plan.selection.norm_follows == "name"
    assert all(not layer.norms for layer in parts.balancer.plan.layers)  # Sequential names: no bn -> conv partner
    assert sum(parts.balancer.factors.values()) == pytest.approx(len(parts.balancer.factors), rel=1e-12)
    with pytest.raises(ConfigError, match="unknown normalize 'median'"):
        config("tb", normalize="median").validate()
    with pytest.raises(ConfigError, match=r"wd_s1=2.0 > wd_s2=1.5"):
        config("alphadecay", wd_s1=2.0).validate()


def test_the_old_name_of_asynchronous_is_read():
    assert TrainConfig.from_dict({"tb_async": True}).asynchronous is True
    with pytest.raises(ConfigError, match="contradicts asynchronous=False"):
        TrainConfig.from_dict({"tb_async": True, "asynchronous": False})


def test_unknown_method_lists_the_accepted_ones():
    with pytest.raises(ConfigError, match=r"unknown method 'adam'.*cal.*tb\+sgdp"):
        build_method(tiny_model(), config("adam"))


# ---------------------------------------------------------------- structure


def _runtime_imports(path: Path) -> set[str]:
    """Modules ``path`` imports when it runs (imports under ``if TYPE_CHECKING:`` excluded)."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_methods_does_not_import_config_so_there_is_no_cycle():
    assert ".config" not in _runtime_imports(PACKAGE / "train" / "methods.py")
