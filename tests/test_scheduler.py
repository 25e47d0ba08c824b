"""TempBalance: the published rule against an independent float64 re-derivation, composition
with every kind of base scheduler, drop-in use, wrapped optimizers, checkpoint resume, and
numerical safety."""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

import tempbalance
from tempbalance import TempBalance
from tempbalance.errors import ConfigError
from tempbalance.train.models import create_model
from tests.helpers.models import BALANCED, MLP, SmallNet, perturb, train_step
from tests.helpers.reference import hill_median_reference, reference_alphas, reference_rates, svd_eigs

pytestmark = pytest.mark.filterwarnings("ignore:.*lr_scheduler.step.*:UserWarning")


# --- the published rule, re-derived independently in float64 -------------------------------


@pytest.fixture(scope="module")
def svd_alphas_by_arch() -> dict[str, dict[str, float]]:
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "vgg16"])
@pytest.mark.parametrize("norm_follows", ["order", "name"])
def test_rates_equal_an_independent_float64_rederivation(arch, norm_follows, svd_alphas_by_arch):
    from tempbalance.train.models import create_model

    torch.manual_seed(7)
    model = create_model(arch, num_classes=100)
    lr = 0.1
    optimizer = torch.optim.SGD(tempbalance.param_groups(model, norm_follows=norm_follows), lr=lr, momentum=0.9)
    scheduler = TempBalance(model, optimizer, norm_follows=norm_follows)
    if arch not in svd_alphas_by_arch:  # the same seed gives the same weights: one SVD pass per arch
        svd_alphas_by_arch[arch] = reference_alphas(model)
    expected = reference_rates(model, lr, norm_follows, alphas=svd_alphas_by_arch[arch])
    worst = 0.0
    for group in optimizer.param_groups:
        for p in group["params"]:
            worst = max(worst, abs(group["lr"] / expected[id(p)] - 1))
    assert worst < 1e-6
    rates = sorted({round(v, 12) for v in expected.values()})
    assert math.isclose(rates[0], 0.05) and math.isclose(rates[-1], 0.15)  # s1 and s2 reached
    assert len(scheduler.history) == 1 and scheduler.history[0].step == 0


# --- composition with base schedulers -----------------------------------------------------

SCHEDULERS = {
    "cosine": lambda opt: lrs.CosineAnnealingLR(opt, T_max=10, eta_min=1e-3),
    "lambda": lambda opt: lrs.LambdaLR(opt, lambda e: 0.9**e),
    "onecycle": lambda opt: lrs.OneCycleLR(opt, max_lr=0.5, total_steps=14),
    "warmup+cosine": lambda opt: lrs.SequentialLR(
        opt, [lrs.LinearLR(opt, start_factor=0.1, total_iters=3), lrs.CosineAnnealingLR(opt, T_max=9)], milestones=[3]
    ),
    "sgdr": lambda opt: lrs.CosineAnnealingWarmRestarts(opt, T_0=4, T_mult=1),
    "step": lambda opt: lrs.StepLR(opt, step_size=3, gamma=0.5),
    "plateau": lambda opt: lrs.ReduceLROnPlateau(opt, factor=0.5, patience=0),
}


@pytest.mark.parametrize("kind", list(SCHEDULERS))
@pytest.mark.parametrize("drop_in", [False, True], ids=["param_groups", "drop_in"])
def test_base_scheduler_composes(kind, drop_in):
    """The balanced rate is always (the base scheduler run alone) x (the current factor),
    while the factors change every step: nothing compounds, nothing is overwritten."""
    torch.manual_seed(0)
    model = SmallNet()
    make = SCHEDULERS[kind]
    opt_alone = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1, momentum=0.9)
    alone = make(opt_alone)
    params = model.parameters() if drop_in else tempbalance.param_groups(model)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    base = make(opt)
    tb = TempBalance(model, opt, base)
    assert [g["name"] for g in opt.param_groups] == [g["name"] for g in opt_alone.param_groups]
    seen_factors = set()
    for step in range(12):
        for group, ref in zip(opt.param_groups, opt_alone.param_groups):
            factor = group.get("tb_factor", 1.0)
            assert group["lr"] == pytest.approx(ref["lr"] * factor, rel=1e-12, abs=0)
            if "tb_layer" in group:
                seen_factors.add(round(factor, 9))
        assert tb.get_last_lr() == [g["lr"] for g in opt.param_groups]
        perturb(model, step)
        opt_alone.step()
        opt.step()
        if kind == "plateau":
            alone.step(1.0)
            tb.step(1.0)
        else:
            alone.step()
            tb.step()
    assert len(seen_factors) > 6  # the factors did move
    assert [h.step for h in tb.history] == list(range(13))


def test_factors_follow_alphas_and_history_records_them():
    torch.manual_seed(1)
    model = SmallNet()
    opt = torch.optim.SGD(tempbalance.param_groups(model), lr=0.2)
    tb = TempBalance(model, opt)
    assert tb.layers == BALANCED
    (entry,) = tb.history
    alphas = np.array([x.alpha for x in entry.layers])
    factors = np.array([x.factor for x in entry.layers])
    np.testing.assert_allclose(factors, 0.5 + (alphas - alphas.min()) / (alphas.max() - alphas.min()), rtol=1e-12)
    assert [x.lr for x in entry.layers] == pytest.approx(list(0.2 * factors), rel=1e-12)
    rows = tb.history_rows()
    assert [r["layer"] for r in rows] == BALANCED and set(rows[0]) == {"step", "layer", "alpha", "metric", "factor", "lr", "reason"}
    assert tb.factors == dict(zip(BALANCED, factors.tolist()))


# --- exactness: ratios 1.0 are plain training ---------------------------------------------

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("drop_in", [False, True], ids=["param_groups", "drop_in"])
def test_unit_ratios_reproduce_plain_training_exactly(name, drop_in):
    make = OPTIMIZERS[name]
    torch.manual_seed(3)
    plain = SmallNet()
    opt_p = make(plain.parameters())
    base_p = lrs.CosineAnnealingLR(opt_p, T_max=6)
    torch.manual_seed(3)
    model = SmallNet()
    opt = make(model.parameters() if drop_in else tempbalance.param_groups(model))
    tb = TempBalance(model, opt, lrs.CosineAnnealingLR(opt, T_max=6), s1=1.0, s2=1.0)
    for step in range(6):
        train_step(plain, opt_p, step)
        train_step(model, opt, step)
        base_p.step()
        tb.step()
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert all(f == 1.0 for f in tb.factors.values())


def test_balanced_training_differs_from_plain():
    torch.manual_seed(3)
    plain = SmallNet()
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(3)
    model = SmallNet()
    opt = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1, momentum=0.9)
    tb = TempBalance(model, opt)
    for step in range(2):
        train_step(plain, opt_p, step)
        train_step(model, opt, step)
        tb.step()
    assert not torch.equal(plain.c1.weight, model.c1.weight)


# --- optimizers that wrap others ----------------------------------------------------------


@pytest.mark.parametrize("drop_in", [False, True], ids=["param_groups", "drop_in"])
def test_timm_lookahead(drop_in):
    timm_optim = pytest.importorskip("timm.optim")
    torch.manual_seed(5)
    plain = SmallNet()
    la_p = timm_optim.Lookahead(torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9), alpha=0.8, k=2)
    base_p = lrs.CosineAnnealingLR(la_p, T_max=5)
    torch.manual_seed(5)
    model = SmallNet()
    inner = torch.optim.SGD(model.parameters() if drop_in else tempbalance.param_groups(model), lr=0.1, momentum=0.9)
    la = timm_optim.Lookahead(inner, alpha=0.8, k=2)
    tb = TempBalance(model, la, lrs.CosineAnnealingLR(la, T_max=5), s1=1.0, s2=1.0)
    assert la.param_groups is inner.param_groups and len(inner.param_groups) == 4
    assert all("lookahead_k" in g for g in inner.param_groups)
    for step in range(5):
        train_step(plain, la_p, step)
        train_step(model, la, step)
        base_p.step()
        tb.step()
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)
    # and with real factors the rates reach the inner optimizer
    tb2 = TempBalance(model, la, None)
    rates = {g["tb_layer"]: g["lr"] for g in inner.param_groups if "tb_layer" in g}
    assert rates == pytest.approx({k: la.param_groups[0]["tb_untuned_lr"] * f for k, f in tb2.factors.items()})


# --- checkpoint resume --------------------------------------------------------------------


def _setup(seed, drop_in):
    torch.manual_seed(seed)
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters() if drop_in else tempbalance.param_groups(model), lr=0.1, momentum=0.9, weight_decay=5e-4)
    base = lrs.SequentialLR(
        opt, [lrs.LinearLR(opt, start_factor=0.2, total_iters=3), lrs.CosineAnnealingLR(opt, T_max=7)], milestones=[3]
    )
    return model, opt, TempBalance(model, opt, base, interval=2)


@pytest.mark.parametrize("drop_in", [False, True], ids=["param_groups", "drop_in"])
@pytest.mark.parametrize("tb_first", [False, True], ids=["opt_then_tb", "tb_then_opt"])
def test_resume_gives_the_uninterrupted_rate_sequence(drop_in, tb_first):
    total, stop = 10, 5
    model, opt, tb = _setup(0, drop_in)
    uninterrupted = []
    for step in range(total):
        train_step(model, opt, step)
        tb.step()
        uninterrupted.append(tb.get_last_lr())
    final = [p.detach().clone() for p in model.parameters()]

    model, opt, tb = _setup(0, drop_in)
    resumed = []
    for step in range(stop):
        train_step(model, opt, step)
        tb.step()
        resumed.append(tb.get_last_lr())
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "tb": tb.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=False)

    model, opt, tb = _setup(99, drop_in)  # other initial weights, fresh everything
    model.load_state_dict(ckpt["model"])
    if tb_first:
        tb.load_state_dict(ckpt["tb"])
        opt.load_state_dict(ckpt["opt"])
    else:
        opt.load_state_dict(ckpt["opt"])
        tb.load_state_dict(ckpt["tb"])
    assert tb.last_epoch == stop and len(tb.history) == 1 + stop // 2
    for step in range(stop, total):
        train_step(model, opt, step)
        tb.step()
        resumed.append(tb.get_last_lr())
    assert resumed == uninterrupted
    for a, b in zip(final, model.parameters()):
        assert torch.equal(a, b)
    assert [h.step for h in tb.history] == [0, 2, 4, 6, 8, 10]


def test_state_dict_contains_the_base_scheduler():
    model = SmallNet()
    opt = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    base = lrs.CosineAnnealingLR(opt, T_max=4)
    tb = TempBalance(model, opt, base)
    tb.step()
    state = tb.state_dict()
    assert state["base_scheduler"]["last_epoch"] == 1 and state["last_epoch"] == 1
    assert set(state["factors"]) == set(BALANCED) and set(state["untuned_lr"]) == set(BALANCED)
    base2 = lrs.CosineAnnealingLR(opt, T_max=4)
    tb2 = TempBalance(model, opt, base2)
    tb2.load_state_dict(state)
    assert base2.last_epoch == 1 and tb2.get_last_lr() == tb.get_last_lr()


# --- interval and warmup ------------------------------------------------------------------


def test_interval_and_warmup():
    model = SmallNet()
    opt = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    tb = TempBalance(model, opt, interval=3)
    for step in range(7):
        perturb(model, step)
        tb.step()
    assert [h.step for h in tb.history] == [0, 3, 6]

    model = SmallNet()
    opt = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    tb = TempBalance(model, opt, warmup=2, interval=2)
    assert tb.history == [] and set(tb.factors.values()) == {1.0}
    assert all(g["lr"] == 0.1 for g in opt.param_groups)
    tb.step()
    assert set(tb.factors.values()) == {1.0}
    tb.step()
    assert [h.step for h in tb.history] == [2] and min(tb.factors.values()) == 0.5
    for _ in range(4):
        tb.step()
    assert [h.step for h in tb.history] == [2, 4, 6]


# --- numerical safety ---------------------------------------------------------------------


def _mlp():
    return nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 2))


def test_equal_alphas_give_factor_one():
    model = _mlp()
    with torch.no_grad():
        for i in (2, 3):
            model[i].weight.copy_(model[1].weight)
    opt = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    tb = TempBalance(model, opt)
    assert tb.factors == {"1": 1.0, "2": 1.0, "3": 1.0}
    assert all(g["lr"] == 0.1 for g in opt.param_groups)


@pytest.mark.parametrize("poison", ["zeros", "nan", "inf"])
def test_a_failed_fit_keeps_factor_one_and_is_reported_once(poison, caplog):
    model = _mlp()
    with torch.no_grad():
        model[2].weight.fill_({"zeros": 0.0, "nan": float("nan"), "inf": float("inf")}[poison])
    opt = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="tempbalance.scheduler"):
        tb = TempBalance(model, opt)
        for _ in range(3):
            tb.step()
    factors = tb.factors
    assert factors["2"] == 1.0 and sorted([factors["1"], factors["3"]]) == [0.5, 1.5]
    assert all(math.isfinite(g["lr"]) for g in opt.param_groups)
    messages = [r.getMessage() for r in caplog.records if "layer 2 keeps factor 1" in r.getMessage()]
    assert len(messages) == 1
    assert tb.history[-1].layers[1].reason is not None


def test_bad_factors_from_a_callable_are_replaced(caplog):
    model = _mlp()
    opt = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="tempbalance.scheduler"):
        tb = TempBalance(model, opt, assign=lambda v: np.array([np.nan, np.inf, 2.0]))
    assert tb.factors == {"1": 1.0, "2": 1.0, "3": 2.0}
    assert sum("keeps factor 1" in r.getMessage() for r in caplog.records) == 2
    with pytest.raises(ValueError, match="returned 1 factors for 3 layers"):
        TempBalance(model, opt, assign=lambda v: [1.0])


# --- drop-in and validation ---------------------------------------------------------------


def test_drop_in_splits_groups_and_reindexes_the_base_scheduler():
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    base = lrs.LambdaLR(opt, lambda e: 1.0 / (1 + e))
    tb = TempBalance(model, opt, base)
    assert [g["name"] for g in opt.param_groups] == [*BALANCED, "rest"]
    assert len(base.base_lrs) == len(base.lr_lambdas) == len(opt.param_groups) == 4
    assert all(g["momentum"] == 0.9 and g["initial_lr"] == 0.1 for g in opt.param_groups)
    tb.step()
    assert opt.param_groups[-1]["lr"] == pytest.approx(0.05)


def test_drop_in_keeps_each_original_groups_options():
    model = SmallNet()
    decay = [p for p in model.parameters() if p.ndim > 1]
    other = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": other, "weight_decay": 0.0}], lr=0.1)
    TempBalance(model, opt)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["c1.group0", "c2.group0", "c3.group0", "rest.group0", "c1.group1", "c2.group1", "c3.group1", "rest.group1"]
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4] * 4 + [0.0] * 4


def test_drop_in_after_the_optimizer_has_state_is_refused():
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_step(model, opt, 0)
    with pytest.raises(ConfigError, match=r"state is not empty.*tempbalance.param_groups"):
        TempBalance(model, opt)


def test_the_selection_comes_from_the_groups_and_another_one_is_refused():
    model = SmallNet()
    opt = torch.optim.SGD(tempbalance.param_groups(model, norm_follows="none"), lr=0.1)
    tb = TempBalance(model, opt)  # the selection recorded by param_groups
    assert tb.plan.selection.norm_follows == "none" and all(not x.norms for x in tb.plan.layers)
    with pytest.raises(ConfigError, match="norm_follows='order' differs from the norm_follows='none'"):
        TempBalance(model, opt, norm_follows="order")
    opt = torch.optim.SGD(tempbalance.param_groups(model, eigs_thresh=200), lr=0.1)
    TempBalance(model, opt, eigs_thresh=200)  # the same options: fine
    groups = tempbalance.param_groups(model, norm_follows="none")
    for group in groups:  # tagged by hand (no recorded selection): audited against the options
        del group["tb_selection"]
    with pytest.raises(ConfigError, match="do not match the layers TempBalance balances"):
        TempBalance(model, torch.optim.SGD(groups, lr=0.1))


@pytest.mark.parametrize(
    "options, error, fragment",
    [
        ({"s1": 0.0}, ConfigError, "s1=0.0 must be > 0"),
        ({"s1": 2.0}, ConfigError, "s1=2.0 must be <= s2=1.5"),
        ({"s1": 0.5, "s2": 0.4}, ConfigError, "s1=0.5 must be <= s2=0.4"),
        ({"s1": 0.0, "assign": "sqrt"}, ConfigError, "s1=0.0 must be > 0"),
        ({"interval": 0}, ConfigError, "interval=0 must be an integer >= 1"),
        ({"interval": 1.5}, ConfigError, "interval=1.5 must be an integer >= 1"),
        ({"warmup": -1}, ConfigError, "warmup=-1 must be an integer >= 0"),
        ({"assign": "tb_cubic"}, ConfigError, "assign='tb_cubic' is not a known assignment function; accepted: ["),
        ({"metric": "beta"}, ConfigError, "metric='beta' is not a known metric; accepted: ["),
        ({"norm_follows": "bn"}, ConfigError, "norm_follows='bn' is not one of"),
        ({"eigs_thresh": -5}, ConfigError, "eigs_thresh=-5 must be an integer >= 0"),
        ({"fit": "mle"}, ConfigError, "fit='mle' is not one of"),
        ({"precision": "half"}, ConfigError, "precision='half' is not one of"),
        ({"assign_options": {"tau": 0}, "assign": "sigmoid"}, ConfigError, "tau > 0"),
        ({"assign_options": {"tau": 3}}, ConfigError, "assign='linear' does not take ['tau']"),
        ({"pl_fitting": "median"}, TypeError, "unknown option(s) ['pl_fitting']; analysis options accepted: ["),
    ],
)
def test_option_validation(options, error, fragment):
    model = SmallNet()
    opt = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    with pytest.raises(error) as err:
        TempBalance(model, opt, **options)
    assert fragment in str(err.value)


def test_other_metrics_and_assign_functions():
    model = SmallNet()
    opt = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    for metric in ("alpha_weighted", "alphahat", "spectral_norm"):
        tb = TempBalance(model, opt, metric=metric)
        values = [x.metric for x in tb.history[0].layers]
        lo, hi = int(np.argmin(values)), int(np.argmax(values))
        assert tb.history[0].layers[lo].factor == 0.5 and tb.history[0].layers[hi].factor == 1.5
    for assign in ("sqrt", "log2", "step", "sigmoid", "tb_linear_map"):
        tb = TempBalance(model, opt, assign=assign, s1=0.5, s2=1.5)
        assert all(0 < f < 10**0.5 for f in tb.factors.values())


def test_changes_made_outside_are_detected(caplog):
    model = SmallNet()
    opt = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    tb = TempBalance(model, opt)
    for g in opt.param_groups:
        g["lr"] = 0.02
    with caplog.at_level(logging.WARNING, logger="tempbalance.scheduler"):
        tb.step()
    assert any("changed outside TempBalance" in r.getMessage() for r in caplog.records)
    assert {g["tb_untuned_lr"] for g in opt.param_groups if "tb_layer" in g} == {0.02}
    tb.set_untuned_lr(0.3)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.3 * g.get("tb_factor", 1.0), rel=1e-15)


def test_model_without_balanceable_layers(caplog):
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING):
        tb = TempBalance(model, opt, lrs.StepLR(opt, 1, 0.5))
    assert tb.layers == [] and "no layer" in caplog.text
    tb.step()
    assert opt.param_groups[0]["lr"] == 0.05 and tb.history == []


def test_is_an_lr_scheduler():
    model = SmallNet()
    opt = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    tb = TempBalance(model, opt)
    assert isinstance(tb, lrs.LRScheduler)
    assert len(tb.get_last_lr()) == len(opt.param_groups) == len(tb.get_lr())
    assert "TempBalance(3 layers" in repr(tb)


# --- a short real training run ------------------------------------------------------------


@pytest.mark.slow
def test_training_run_rates_follow_alphas():
    models = pytest.importorskip("tempbalance.train.models")
    mnist1d = pytest.importorskip("mnist1d.data")
    args = mnist1d.get_dataset_args()
    args.num_samples = 1000
    data = mnist1d.make_dataset(args)
    x = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data["y"], dtype=torch.long)
    torch.manual_seed(0)
    model = models.create_model("cnn1d", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(tempbalance.param_groups(model, weight_decay=5e-4), lr=0.1, momentum=0.9)
    epochs = 4
    tb = TempBalance(model, opt, lrs.CosineAnnealingLR(opt, T_max=epochs, eta_min=1e-3))
    assert tb.layers == ["conv2", "conv3", "conv4"]
    losses = []
    for epoch in range(epochs):
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(epoch))
        total = 0.0
        for i in range(0, x.shape[0], 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        losses.append(total / x.shape[0])
        tb.step()
    assert losses[-1] < losses[0]
    assert len(tb.history) == epochs + 1
    for entry in tb.history:
        alphas = np.array([x.alpha for x in entry.layers])
        rates = np.array([x.lr for x in entry.layers])
        assert np.all(np.isfinite(alphas)) and alphas.max() > alphas.min()
        # larger alpha -> larger rate, and the rate is the linear map of alpha
        assert np.array_equal(np.argsort(alphas), np.argsort(rates))
        factors = np.array([x.factor for x in entry.layers])
        np.testing.assert_allclose(factors, 0.5 + (alphas - alphas.min()) / np.ptp(alphas), rtol=1e-12)
    assert {tuple(round(x.alpha, 6) for x in h.layers) for h in tb.history}.__len__() == epochs + 1
    for g in opt.param_groups:  # the groups carry the current rates
        if "tb_layer" in g:
            assert g["lr"] == pytest.approx(tb.history[-1].layers[tb.layers.index(g["tb_layer"])].lr, rel=1e-12)


# --- FARMS alphas -------------------------------------------------------------------------


def test_tempbalance_on_farms_alphas():
    torch.manual_seed(0)
    model = create_model("resnet18", 10, width=0.25)
    balancer = tempbalance.TempBalance(model, torch.optim.SGD(tempbalance.param_groups(model), lr=0.1), esd="farms")
    plain = tempbalance.TempBalance(model, torch.optim.SGD(tempbalance.param_groups(model), lr=0.1))
    entries = balancer.history[-1].layers
    assert [e.layer for e in entries] == [e.layer for e in plain.history[-1].layers]  # same layers balanced
    farms = tempbalance.analyze(model, esd="farms", precision="float64").alphas()
    for entry in entries:
        assert entry.alpha == farms[entry.layer]
    # at initialisation the plain ESD puts the rectangular stage-entry conv on top (shape alone);
    # FARMS does not
    top_plain = max(plain.history[-1].layers, key=lambda e: e.alpha).layer
    top_farms = max(entries, key=lambda e: e.alpha).layer
    assert top_plain == "layer4.0.shortcut.0" and top_farms != top_plain
    with pytest.raises(ConfigError, match="esd='bogus'"):
        tempbalance.TempBalance(model, torch.optim.SGD(tempbalance.param_groups(model), lr=0.1), esd="bogus")


# --- bad weights during training ----------------------------------------------------------


def _rates_ok(optimizer: torch.optim.Optimizer) -> bool:
    return all(math.isfinite(float(g["lr"])) and float(g["lr"]) >= 0 for g in optimizer.param_groups)


@pytest.mark.slow
def test_nan_weights_mid_training_keep_rates_finite_and_warn_once(caplog):
    torch.manual_seed(0)
    x, y = torch.randn(256, 20), torch.randint(0, 5, (256,))
    model = MLP()
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=0.05, momentum=0.9)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    scheduler = tempbalance.TempBalance(model, optimizer, cosine)
    assert scheduler.layers == ["h1", "h2", "h3"]
    with caplog.at_level(logging.WARNING, logger="tempbalance"):
        for epoch in range(8):
            for batch in range(0, 256, 32):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[batch : batch + 32]), y[batch : batch + 32]).backward()
                optimizer.step()
            if epoch == 3:  # poison one balanced layer just before its rebalance
                with torch.no_grad():
                    model.h2.weight[5, 5] = float("nan")
            scheduler.step()
            assert _rates_ok(optimizer), [g["lr"] for g in optimizer.param_groups]
            if epoch == 3:
                assert scheduler.factors["h2"] == 1.0
                entry = {e.layer: e for e in scheduler.history[-1].layers}["h2"]
                assert math.isnan(entry.alpha) and "non-finite" in entry.reason
                others = [scheduler.factors["h1"], scheduler.factors["h3"]]
                assert sorted(others) == [0.5, 1.5]  # the two healthy layers still span s1..s2
    warnings = [r.getMessage() for r in caplog.records if "keeps factor 1" in r.getMessage()]
    assert sum("layer h2 " in w for w in warnings) == 1
    # the NaN spreads through training to the other layers: each warns once, never per epoch
    assert len(warnings) == len(set(warnings)) <= 3


@pytest.mark.slow
def test_identical_alphas_give_factor_one():
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.h2.weight.copy_(model.h1.weight)
        model.h3.weight.copy_(model.h1.weight)
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    scheduler = tempbalance.TempBalance(model, optimizer)
    alphas = [e.alpha for e in scheduler.history[-1].layers]
    assert len(set(alphas)) == 1 and math.isfinite(alphas[0])
    assert scheduler.factors == {"h1": 1.0, "h2": 1.0, "h3": 1.0}
    assert all(g["lr"] == 0.1 for g in optimizer.param_groups)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_balances_with_finite_rates(dtype):
    torch.manual_seed(0)
    model = MLP().to(dtype)
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    scheduler = tempbalance.TempBalance(model, optimizer)
    scheduler.step()
    assert _rates_ok(optimizer)
    alphas = {name: hill_median_reference(svd_eigs(getattr(model, name).weight)) for name in scheduler.layers}
    low, high = min(alphas.values()), max(alphas.values())
    for entry in scheduler.history[-1].layers:
        assert entry.alpha == pytest.approx(alphas[entry.layer], rel=1e-6)  # float64 by default in TempBalance
        expected = 0.5 + (alphas[entry.layer] - low) / (high - low)  # the linear map, s1 = 0.5, s2 = 1.5
        assert scheduler.factors[entry.layer] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_small_1x1_conv_is_not_balanced_and_keeps_the_global_rate():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 3),
        nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16, 3),
    )
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    scheduler = tempbalance.TempBalance(model, optimizer)
    assert "2" not in scheduler.layers and "eigs_thresh" in scheduler.plan.skipped["2"]
    (group,) = [g for g in optimizer.param_groups if any(p is model[2].weight for p in g["params"])]
    assert group["lr"] == 0.1
    assert _rates_ok(optimizer)
