"""Tests for tempbalance with Hugging Face accelerate: after ``prepare`` and in its checkpoints.

Both ways are covered: TempBalance passed through ``accelerator.prepare`` (wrapped as an
accelerate scheduler) and built afterwards with ``integrations.accelerate.attach``. A state
saved with ``save_state`` and loaded into fresh objects must continue exactly like the original.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers.reference import median_hill_alpha

accelerate = pytest.importorskip("accelerate")

import tempbalance  # noqa: E402
from tempbalance.errors import ConfigError  # noqa: E402
from tempbalance.integrations.accelerate import attach, register  # noqa: E402

LR = 0.05
BALANCED = ["2", "4", "6"]


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4),
    )


def _batches():
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(4)]


def _schedule(step: int) -> float:
    return 0.9 ** step


def _train(accelerator, model, optimizer, scheduler, batches):
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _setup(route: str, seed: int):
    accelerator = accelerate.Accelerator(cpu=True)
    model = _model(seed)
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR, momentum=0.9)
    base = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule)
    if route == "prepare":
        balancer = tempbalance.TempBalance(model, optimizer, base, interval=2)
        model, optimizer, stepper = accelerator.prepare(model, optimizer, balancer)
    else:
        model, optimizer, base = accelerator.prepare(model, optimizer, base)
        balancer = attach(accelerator, model, optimizer, base, interval=2)
        stepper = balancer
    return accelerator, model, optimizer, stepper, balancer


@pytest.mark.parametrize("route", ["prepare", "attach"])
def test_balances_after_prepare(route):
    accelerator, model, optimizer, stepper, balancer = _setup(route, 0)
    assert isinstance(optimizer, accelerate.optimizer.AcceleratedOptimizer)
    _train(accelerator, model, optimizer, stepper, _batches())
    assert [h.step for h in balancer.history] == [0, 2, 4]
    alphas = np.array([median_hill_alpha(model[int(n)].weight.detach().numpy()) for n in BALANCED])
    factors = 0.5 + (alphas - alphas.min()) / (alphas.max() - alphas.min())
    for name, factor in zip(BALANCED, factors):
        group = next(g for g in optimizer.param_groups if g.get("tb_layer") == name)
        assert group["lr"] == pytest.approx(LR * _schedule(4) * factor, rel=1e-9)
    norm_group = next(g for g in optimizer.param_groups if any(p is model[3].weight for p in g["params"]))
    assert norm_group["tb_layer"] == "2"  # the LayerNorm follows the Linear before it
    rest = next(g for g in optimizer.param_groups if g["name"] == "rest")
    assert rest["lr"] == pytest.approx(LR * _schedule(4))


@pytest.mark.parametrize("route", ["prepare", "attach"])
def test_save_state_load_state_round_trip(route, tmp_path):
    batches = _batches()
    accelerator, model, optimizer, stepper, balancer = _setup(route, 0)
    _train(accelerator, model, optimizer, stepper, batches[:3])
    accelerator.save_state(str(tmp_path / "state"))

    accelerator2, model2, optimizer2, stepper2, balancer2 = _setup(route, 1)  # other initial weights
    assert balancer2.history[0].layers[0].alpha != pytest.approx(balancer.history[0].layers[0].alpha)
    accelerator2.load_state(str(tmp_path / "state"))
    assert [h.to_dict() for h in balancer2.history] == [h.to_dict() for h in balancer.history]
    assert balancer2.factors == balancer.factors
    assert balancer2.last_epoch == 3
    assert [g["lr"] for g in optimizer2.param_groups] == pytest.approx([g["lr"] for g in optimizer.param_groups])

    _train(accelerator, model, optimizer, stepper, batches[3:])
    _train(accelerator2, model2, optimizer2, stepper2, batches[3:])
    assert [h.step for h in balancer2.history] == [0, 2, 4]
    assert balancer2.factors == pytest.approx(balancer.factors, rel=1e-9)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q)


def test_register_once_and_rejects_stateless():
    accelerator = accelerate.Accelerator(cpu=True)
    model = _model(0)
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR)
    balancer = tempbalance.TempBalance(model, optimizer)
    before = len(accelerator._custom_objects)
    register(accelerator, balancer)
    register(accelerator, balancer)
    assert len(accelerator._custom_objects) == before + 1
    with pytest.raises(ConfigError, match="state_dict"):
        register(accelerator, object())


def test_attach_passes_balance_through():
    accelerator = accelerate.Accelerator(cpu=True)
    model = _model(0)
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR, weight_decay=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    balancer = attach(accelerator, model, optimizer, balance="weight_decay", wd_s1=0.5, wd_s2=1.5)
    assert balancer.balance == ("weight_decay",)
    alphas = np.array([median_hill_alpha(model[int(n)].weight.detach().numpy()) for n in BALANCED])
    decays = 1e-3 * np.interp(alphas, [alphas.min(), alphas.max()], [0.5, 1.5])
    for name, decay in zip(BALANCED, decays):
        group = next(g for g in optimizer.param_groups if g.get("tb_layer") == name)
        assert group["weight_decay"] == pytest.approx(decay, rel=1e-9) and group["lr"] == LR
