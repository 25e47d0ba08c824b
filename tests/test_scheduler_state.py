"""TempBalance guards its state and its inputs: a state of another model, optimizer or plan, or
with non-finite / non-positive factors, is refused with a ConfigError naming the mismatch; a
state of version 1 (tempbalance 0.1, saved in tests/data) loads; balanced layers missing from the
optimizer are refused or left out; meta-device weights get a clear error; close() releases the
worker and the hook; split q/k/v parts are measured from the snapshot; block averaging gets the
layer names."""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

import tempbalance
from tempbalance import TempBalance
from tempbalance.errors import ConfigError
from tests.helpers.gate import Gate
from tests.helpers.models import SmallNet, perturb, train_step
from tests.helpers.reference import reference_alphas as rule_alphas

pytestmark = pytest.mark.filterwarnings("ignore:.*lr_scheduler.step.*:UserWarning")

LR = 0.1
V1_STATE = Path(__file__).parent / "data" / "tempbalance_state_v1.json"


def make(model=None, seed=0, **options):
    torch.manual_seed(seed)
    model = model or SmallNet()
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR, momentum=0.9)
    return model, optimizer, TempBalance(model, optimizer, lrs.CosineAnnealingLR(optimizer, T_max=10), **options)


class WideNet(SmallNet):
    """SmallNet with c2 / c3 of other widths: the same layer names, other shapes."""

    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(32, 40, 3, padding=1)
        self.n2 = nn.BatchNorm2d(40)
        self.c3 = nn.Conv2d(40, 48, 3, padding=1)


class OtherNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 64)
        self.b = nn.Linear(64, 64)
        self.c = nn.Linear(64, 64)
        self.d = nn.Linear(64, 2)


# --- foreign and damaged states ---------------------------------------------------------------


def test_a_state_of_another_model_is_refused_and_nothing_changes():
    _, _, other = make(OtherNet())
    model, optimizer, scheduler = make()
    before = (scheduler.factors, [g["lr"] for g in optimizer.param_groups], len(scheduler.history))
    with pytest.raises(ConfigError, match=r"another model or layer selection.*lacks balanced layers c1, c2, c3.*b, c"):
        scheduler.load_state_dict(other.state_dict())
    assert (scheduler.factors, [g["lr"] for g in optimizer.param_groups], len(scheduler.history)) == before


def test_same_names_with_other_widths_are_refused():
    _, _, wide = make(WideNet())
    _, _, scheduler = make()
    with pytest.raises(ConfigError, match=r"layer 'c2' has weight shape \(40, 32, 3, 3\) there, \(32, 32, 3, 3\) here"):
        scheduler.load_state_dict(wide.state_dict())


def test_a_state_of_an_optimizer_with_other_groups_is_refused():
    _, _, scheduler = make()
    state = scheduler.state_dict()
    bad = copy.deepcopy(state)
    bad["plan"]["groups"] = 5
    with pytest.raises(ConfigError, match="optimizer with 5 parameter groups, this one has 4"):
        scheduler.load_state_dict(bad)
    bad = copy.deepcopy(state)  # a version-1 state has no plan: the base scheduler's lists tell
    del bad["plan"]
    bad["base_scheduler"]["base_lrs"].append(LR)
    with pytest.raises(ConfigError, match=r"5 parameter groups \(base_scheduler.base_lrs\), this one has 4"):
        scheduler.load_state_dict(bad)


@pytest.mark.parametrize("value", [float("nan"), -0.3, float("inf"), 0.0])
def test_non_finite_or_non_positive_factors_are_refused(value):
    _, _, scheduler = make()
    state = scheduler.state_dict()
    state["factors"]["c2"] = value
    with pytest.raises(ConfigError, match=rf"factors\['c2'\] = {value!r}; every value must be finite and > 0"):
        scheduler.load_state_dict(state)
    state = scheduler.state_dict()
    state["untuned_lr"]["c1"] = -1.0
    with pytest.raises(ConfigError, match=r"untuned_lr\['c1'\] = -1.0; every value must be finite and >= 0"):
        scheduler.load_state_dict(state)


def test_states_of_other_targets_and_versions_are_refused():
    _, _, scheduler = make()
    _, _, decay = make(balance="weight_decay")
    with pytest.raises(ConfigError, match=r"balances \['weight_decay'\], this scheduler \['lr'\]"):
        scheduler.load_state_dict(decay.state_dict())
    with pytest.raises(ConfigError, match="version 1 or 2 expected, got 7"):
        scheduler.load_state_dict({"version": 7})
    with pytest.raises(ConfigError, match="got None"):
        scheduler.load_state_dict([1, 2])


def test_a_version_1_state_loads():
    saved = json.loads(V1_STATE.read_text())
    model, optimizer, scheduler = make(seed=5)
    scheduler.load_state_dict(saved["state"])
    assert scheduler.get_last_lr()[:3] == saved["last_lr"][:3]  # the balanced groups ("rest" is the optimizer's)
    assert scheduler.factors == saved["state"]["factors"] and scheduler.last_epoch == 2
    assert [h.step for h in scheduler.history] == [0, 1, 2] and scheduler.history[0].layers[0].weight_decay is None
    state = scheduler.state_dict()
    assert state["version"] == 2 and state["plan"]["layers"] == ["c1", "c2", "c3"]
    perturb(model, 7)
    scheduler.step()  # and it goes on: the cosine's next rate times the new factors
    cosine = lrs.CosineAnnealingLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR), T_max=10)
    for _ in range(3):
        cosine.step()
    for group in optimizer.param_groups[:3]:
        assert group["lr"] == pytest.approx(cosine.get_last_lr()[0] * scheduler.factors[group["tb_layer"]], rel=1e-12)


def test_loading_a_state_with_other_options_warns_once(caplog):
    _, _, scheduler = make()
    _, _, other = make(s1=0.6, s2=1.4)
    with caplog.at_level(logging.WARNING, logger="tempbalance"):
        scheduler.load_state_dict(scheduler.state_dict())
        assert not caplog.records
        scheduler.load_state_dict(other.state_dict())
    assert sum("saved with other options" in r.getMessage() for r in caplog.records) == 1


# --- construction guards ----------------------------------------------------------------------


def test_balanced_layers_missing_from_the_optimizer_are_refused_or_skipped(caplog):
    torch.manual_seed(1)
    model = SmallNet()
    c2 = {id(p) for p in (*model.c2.parameters(), *model.n2.parameters())}
    params = [p for p in model.parameters() if id(p) not in c2]
    with pytest.raises(ConfigError, match=r"balanced layers \['c2'\] have no parameter in the optimizer.*not_in_optimizer='skip'"):
        TempBalance(model, torch.optim.SGD(params, lr=LR))
    optimizer = torch.optim.SGD(params, lr=LR)
    with caplog.at_level(logging.WARNING, logger="tempbalance"):
        scheduler = TempBalance(model, optimizer, not_in_optimizer="skip")
    assert "left out of the balance" in caplog.text
    assert scheduler.layers == ["c1", "c3"] and scheduler.plan.skipped["c2"] == "not in the optimizer"
    alphas = rule_alphas(model)
    low, high = sorted(["c1", "c3"], key=alphas.get)
    assert scheduler.factors == {low: 0.5, high: 1.5}  # the min-max map over the layers present only
    with pytest.raises(ConfigError, match="not_in_optimizer='maybe' is not one of"):
        TempBalance(model, torch.optim.SGD(params, lr=LR), not_in_optimizer="maybe")


def test_meta_device_models_get_a_clear_error():
    with torch.device("meta"):
        model = SmallNet()
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR)
    with pytest.raises(ConfigError, match=r"\['c1', 'c2', 'c3'\] are on the meta device.*to_empty"):
        TempBalance(model, optimizer)


def test_a_duck_typed_optimizer_is_refused():
    class Holder:
        param_groups: list = []

    with pytest.raises(TypeError, match="expects a torch optimizer"):
        TempBalance(SmallNet(), Holder())


# --- close() and the context manager ----------------------------------------------------------


def test_close_releases_the_worker_and_the_hook(monkeypatch):
    torch.manual_seed(0)
    model = SmallNet()
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR)
    gate = Gate(monkeypatch)
    others = set(threading.enumerate())  # workers of schedulers other tests left open
    with TempBalance(model, optimizer, asynchronous=True) as scheduler:
        assert len(optimizer._optimizer_step_pre_hooks) == 1
        scheduler.step()
        assert scheduler.state_dict()["pending"] == 1
        gate.open_and_wait()
    assert len(optimizer._optimizer_step_pre_hooks) == 0
    assert not [t for t in set(threading.enumerate()) - others if t.name.startswith("tempbalance-measure")]
    assert scheduler.state_dict()["pending"] is None  # the pending result was dropped
    scheduler.step()  # still usable, now synchronous
    assert [h.step for h in scheduler.history] == [0, 2] and scheduler.state_dict()["pending"] is None


# --- split q/k/v parts and the names contract -------------------------------------------------


class Block(nn.Module):
    def __init__(self, dim: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class TinyViT(nn.Module):
    def __init__(self, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(64, 10)


def median_hill(w: np.ndarray) -> float:
    if not np.isfinite(w).all():
        return float("nan")
    eigs = np.sort(np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2)
    i = eigs.size // 2
    n = eigs.size - i
    return 1 + n / (np.log(eigs[i:]).sum() - n * np.log(eigs[i]))


def split_metric(model: TinyViT) -> dict[str, float]:
    out = {}
    for i, block in enumerate(model.blocks):
        w = block.qkv.weight.detach().numpy()
        out[f"blocks.{i}.qkv"] = float(np.mean([median_hill(w[64 * j: 64 * (j + 1)]) for j in range(3)]))
        out[f"blocks.{i}.proj"] = median_hill(block.proj.weight.detach().numpy())
    return out


def test_split_qkv_parts_are_measured_from_the_snapshot(monkeypatch):
    torch.manual_seed(6)
    model = TinyViT()
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR)
    scheduler = TempBalance(model, optimizer, split_qkv=True, asynchronous=True)
    assert [r.name for r in scheduler.plan.refs][:4] == ["blocks.0.qkv.q", "blocks.0.qkv.k", "blocks.0.qkv.v", "blocks.0.proj"]
    gate = Gate(monkeypatch)
    perturb(model, 1)
    snapshot = copy.deepcopy(model)
    scheduler.step()
    perturb(model, 2)  # the live weights move on while the worker is held
    gate.open_and_wait()
    scheduler.wait()
    recorded = {x.layer: x.metric for x in scheduler.history[-1].layers}
    assert recorded == pytest.approx(split_metric(snapshot), rel=1e-9)
    assert recorded != pytest.approx(split_metric(model), rel=1e-6)
    assert gate.calls == 1  # one measurement: the parts with everything else, on the worker


def test_block_averaging_matches_blocks_by_name_when_a_layer_fails():
    from tempbalance.transformer_layers import find_blocks, model_balancing

    torch.manual_seed(7)
    model = TinyViT()
    with torch.no_grad():
        model.blocks[0].proj.weight.fill_(float("nan"))
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=LR)
    options = model_balancing(model, assign="linear")
    scheduler = TempBalance(model, optimizer, **options)
    assert scheduler.factors["blocks.0.proj"] == 1.0
    metric = split_metric(model)
    blocks = find_blocks(model, scheduler.layers)
    means = {}
    for name, value in metric.items():
        if math.isfinite(value):
            means.setdefault(blocks[name], []).append(value)
    block_mean = {b: float(np.mean(v)) for b, v in means.items()}
    a = np.array(list(block_mean.values()))
    expected = {b: 0.5 + (m - a.min()) / (a.max() - a.min()) for b, m in block_mean.items()}
    for name in scheduler.layers:
        if name != "blocks.0.proj":
            assert scheduler.factors[name] == pytest.approx(expected[blocks[name]], rel=1e-9)
    assert scheduler.factors["blocks.0.qkv"] == pytest.approx(expected["blocks.0"], rel=1e-9)


def test_train_step_on_the_state_round_trip_is_exact():
    """A state saved and loaded at once changes nothing (also the plan signature it carries)."""
    model, optimizer, scheduler = make()
    train_step(model, optimizer, 0)
    scheduler.step()
    before = scheduler.get_last_lr()
    scheduler.load_state_dict(scheduler.state_dict())
    assert scheduler.get_last_lr() == before
