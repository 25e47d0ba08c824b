"""TempBalance(asynchronous=True): the factors come from the weights as they were at the due
step (checked against the independent float64 rule of tests/helpers/reference.py), take effect
before the first optimizer step after the worker finishes, survive a checkpoint taken while
pending, and fail loudly. The worker is gated with events so that every timing below is forced,
not raced."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import tempbalance
import tempbalance.background as background
import tempbalance.scheduler as scheduler_module
from tempbalance import TempBalance
from tempbalance.errors import ConfigError
from tests.helpers.gate import Gate
from tests.helpers.models import BALANCED, SmallNet, lrs_by_name, train_step
from tests.helpers.reference import reference_rates

LR = 0.1


def make(seed=0, asynchronous=True):
    torch.manual_seed(seed)
    model = SmallNet()
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR, momentum=0.9)
    return model, optimizer, TempBalance(model, optimizer, asynchronous=asynchronous)


def rates_by_param(model, optimizer):
    return {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}


def rule_rates(weights_from, model):
    """The float64 rule's rates for ``model``'s parameters, from the weights of ``weights_from``
    (a copy of the model: matched by parameter order)."""
    by_copy = reference_rates(weights_from, LR, "order")
    return {id(p): by_copy[id(q)] for p, q in zip(model.parameters(), weights_from.parameters())}


def assert_rates(model, optimizer, expected):
    got = rates_by_param(model, optimizer)
    assert got.keys() == expected.keys()
    for key, rate in expected.items():
        assert got[key] == pytest.approx(rate, rel=1e-6)


def test_factors_come_from_the_snapshot_and_apply_at_the_next_optimizer_step(monkeypatch):
    model, optimizer, scheduler = make()
    gate = Gate(monkeypatch)
    for step in range(3):
        train_step(model, optimizer, step)
    snapshot = copy.deepcopy(model)  # the weights the due step() must measure
    before = lrs_by_name(optimizer)
    scheduler.step()
    assert scheduler.state_dict()["pending"] == 1 and len(scheduler.history) == 1
    for step in range(3, 8):  # training goes on while the worker is held: old factors stay
        train_step(model, optimizer, step)
        assert lrs_by_name(optimizer) == before
    gate.open_and_wait()
    assert len(scheduler.history) == 1  # finished, but applied only before the next update
    # the first parameter update after the measurement must already use the new factors
    seen = {}
    handle = optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.update(rates_by_param(model, opt)))
    train_step(model, optimizer, 8)
    handle.remove()
    expected = rule_rates(snapshot, model)
    assert seen == rates_by_param(model, optimizer)
    assert_rates(model, optimizer, expected)
    current = reference_rates(model, LR, "order")  # the weights have moved on: other factors
    assert any(abs(current[k] - expected[k]) > 1e-4 * LR for k in expected)
    entry = scheduler.history[-1]
    assert entry.step == 1 and entry.lag_steps == 5 and [x.layer for x in entry.layers] == BALANCED
    assert scheduler.state_dict()["pending"] is None and scheduler.wait() is None


def test_async_equals_sync_when_the_worker_is_waited_for():
    sync_model, sync_opt, sync = make(asynchronous=False)
    async_model, async_opt, asynchronous = make(asynchronous=True)
    for epoch in range(3):
        for step in range(4):
            train_step(sync_model, sync_opt, 10 * epoch + step)
            train_step(async_model, async_opt, 10 * epoch + step)
        sync.step()
        asynchronous.step()
        asynchronous.wait()
        assert sync.factors == asynchronous.factors  # same weights, same CPU computation: bit-equal
    assert [h.step for h in asynchronous.history] == [0, 1, 2, 3]
    assert [h.lag_steps for h in asynchronous.history] == [0, 0, 0, 0]


def test_a_due_step_waits_for_the_pending_measurement(monkeypatch):
    model, optimizer, scheduler = make()
    gate = Gate(monkeypatch)
    scheduler.step()
    timer = threading.Timer(0.2, gate.release.set)
    timer.start()
    scheduler.step()  # blocks until the first finishes, applies it, starts the second
    timer.join()
    assert [h.step for h in scheduler.history] == [0, 1] and scheduler.state_dict()["pending"] == 2
    assert scheduler.wait().step == 2 and gate.calls == 2


def test_rebalance_is_synchronous_and_applies_the_pending_one_first():
    model, optimizer, scheduler = make()
    train_step(model, optimizer, 0)
    scheduler.step()
    entry = scheduler.rebalance()
    assert [h.step for h in scheduler.history] == [0, 1, 1] and entry is scheduler.history[-1]
    assert_rates(model, optimizer, reference_rates(model, LR, "order"))


@pytest.mark.parametrize("resume_async", [True, False])
def test_a_checkpoint_taken_while_pending_is_remeasured_on_resume(monkeypatch, resume_async):
    model, optimizer, scheduler = make()
    gate = Gate(monkeypatch)
    for step in range(3):
        train_step(model, optimizer, step)
    scheduler.step()
    state = copy.deepcopy(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    )
    assert state["scheduler"]["pending"] == 1
    saved_model = copy.deepcopy(model)
    gate.release.set()
    scheduler.wait()  # the uninterrupted run's factors
    uninterrupted = scheduler.factors

    fresh_model, fresh_opt, fresh = make(seed=1, asynchronous=resume_async)
    fresh.load_state_dict(state["scheduler"])  # before the model: the measurement must wait for it
    fresh_model.load_state_dict(state["model"])
    fresh_opt.load_state_dict(state["optimizer"])
    assert fresh.state_dict()["pending"] == 1
    train_step(fresh_model, fresh_opt, 3)  # the pre-hook redoes the measurement on the loaded weights
    fresh.wait()
    assert fresh.factors == uninterrupted and fresh.history[-1].step == 1
    assert fresh.state_dict()["pending"] is None
    assert_rates(fresh_model, fresh_opt, rule_rates(saved_model, fresh_model))  # the rule on the saved weights


def test_worker_errors_reach_the_training_thread(monkeypatch):
    model, optimizer, scheduler = make()

    def broken(refs, options):
        raise RuntimeError("eigensolver exploded")

    monkeypatch.setattr(background, "analyze_layers", broken)
    scheduler.step()
    with pytest.raises(RuntimeError, match="eigensolver exploded"):
        scheduler.wait()


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_asynchronous_must_be_a_bool(value):
    model = SmallNet()
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR)
    with pytest.raises(ConfigError, match=f"asynchronous={value!r} must be True or False"):
        TempBalance(model, optimizer, asynchronous=value)


def test_asynchronous_is_refused_across_processes(monkeypatch):
    monkeypatch.setattr(scheduler_module, "_world_size", lambda: 4)
    model = SmallNet()
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR)
    with pytest.raises(ConfigError, match="world size is 4"):
        TempBalance(model, optimizer, asynchronous=True)


def test_snapshot_copies_tied_weights_once_and_leaves_the_model_alone():
    shared = torch.nn.Linear(64, 64)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    refs = tempbalance.find_layers(model)
    copies = background.snapshot_refs(refs)
    assert [c.name for c in copies] == [r.name for r in refs]
    for ref, snap in zip(refs, copies):
        assert snap.weight.device.type == "cpu" and snap.weight.data_ptr() != ref.weight.data_ptr()
        assert torch.equal(snap.weight, ref.weight.detach()) and not snap.weight.requires_grad
    with torch.no_grad():
        shared.weight.add_(1.0)
    assert not torch.equal(copies[0].weight, shared.weight.detach())


def test_states_move_between_the_modes_silently(caplog):
    model, optimizer, sync = make(asynchronous=False)
    train_step(model, optimizer, 0)
    sync.step()
    _, _, asynchronous = make(seed=1, asynchronous=True)
    with caplog.at_level("WARNING", logger="tempbalance"):
        asynchronous.load_state_dict(sync.state_dict())
    assert not caplog.records
    assert asynchronous.factors == sync.factors and asynchronous.state_dict()["pending"] is None
