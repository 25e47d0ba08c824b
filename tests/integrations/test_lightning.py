"""Tests for tempbalance.integrations.lightning: the TempBalanceCallback in real Lightning fits.

Rates are checked against an independent re-derivation (numpy float64 SVD -> median Hill alpha
-> linear map, times the LambdaLR schedule written out here); resuming from a checkpoint must
reproduce an uninterrupted run.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers.reference import median_hill_alpha

pl = pytest.importorskip("lightning.pytorch")

import tempbalance  # noqa: E402
from tempbalance.errors import ConfigError  # noqa: E402
from tempbalance.integrations.lightning import TempBalanceCallback  # noqa: E402

BALANCED = ["net.2", "net.5", "net.8"]
NORM_OWNER = {"net.3": "net.2", "net.6": "net.5"}
LR = 0.1
DECAY = 0.8


def _linear_map(alphas: np.ndarray, s1: float = 0.5, s2: float = 1.5) -> np.ndarray:
    return s1 + (s2 - s1) * (alphas - alphas.min()) / (alphas.max() - alphas.min())


class Module(pl.LightningModule):
    def __init__(self, schedule: str | None = "epoch"):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(16, 64), nn.ReLU(),
            nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(),
            nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(),
            nn.Linear(64, 64), nn.ReLU(),
            nn.Linear(64, 4),
        )
        self.schedule = schedule

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(tempbalance.param_groups(self), lr=LR, momentum=0.9)
        if self.schedule is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: DECAY ** i)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.schedule}}


def _loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


def _trainer(max_epochs: int, callback: TempBalanceCallback, **kwargs) -> "pl.Trainer":
    return pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=[callback], logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **kwargs,
    )


def _fit(trainer, module, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # num_workers / small-dataset hints
        trainer.fit(module, train_dataloaders=_loader(), **kwargs)


def _group_of(optimizer, param):
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


def test_epoch_balancing_composes_with_lambda_lr():
    module = Module("epoch")
    callback = TempBalanceCallback()
    trainer = _trainer(3, callback)
    _fit(trainer, module)
    balancer = callback.balancer
    assert trainer.lr_scheduler_configs[0].scheduler is balancer
    assert [h.step for h in balancer.history] == [0, 1, 2, 3]
    assert balancer.layers == BALANCED

    alphas = np.array([median_hill_alpha(module.net[int(n.split(".")[1])].weight.detach().numpy()) for n in BALANCED])
    recorded = np.array([x.alpha for x in balancer.history[-1].layers])
    np.testing.assert_allclose(recorded, alphas, rtol=1e-8)
    factors = _linear_map(alphas)
    optimizer = trainer.optimizers[0]
    for name, factor in zip(BALANCED, factors):
        layer = module.get_submodule(name)
        group = _group_of(optimizer, layer.weight)
        assert group["lr"] == pytest.approx(LR * DECAY ** 3 * factor, rel=1e-9)  # schedule(3) x factor
        assert _group_of(optimizer, layer.bias) is group
    lrs = sorted(_group_of(optimizer, module.get_submodule(n).weight)["lr"] for n in BALANCED)
    assert lrs[0] == pytest.approx(0.5 * LR * DECAY ** 3) and lrs[-1] == pytest.approx(1.5 * LR * DECAY ** 3)
    for norm, owner in NORM_OWNER.items():  # LayerNorm takes its Linear's rate
        norm_group = _group_of(optimizer, module.get_submodule(norm).weight)
        assert norm_group is _group_of(optimizer, module.get_submodule(owner).weight)
    first = _group_of(optimizer, module.net[0].weight)  # not balanced: the schedule alone
    assert first["lr"] == pytest.approx(LR * DECAY ** 3)


def test_step_interval_without_scheduler():
    module = Module(None)
    callback = TempBalanceCallback(interval=2, unit="step")
    trainer = _trainer(2, callback)  # 4 optimizer steps per epoch
    _fit(trainer, module)
    balancer = callback.balancer
    assert [h.step for h in balancer.history] == [0, 2, 4, 6, 8]
    alphas = np.array([median_hill_alpha(module.get_submodule(n).weight.detach().numpy()) for n in BALANCED])
    for name, factor in zip(BALANCED, _linear_map(alphas)):
        assert _group_of(trainer.optimizers[0], module.get_submodule(name).weight)["lr"] == pytest.approx(LR * factor)


def test_asynchronous_mode_lands_through_lightnings_optimizer_step():
    module = Module("epoch")
    callback = TempBalanceCallback(asynchronous=True)
    trainer = _trainer(3, callback)  # 4 optimizer steps per epoch
    _fit(trainer, module)
    balancer = callback.balancer
    snapshot = [module.get_submodule(n).weight.detach().numpy().copy() for n in BALANCED]
    entry = balancer.wait()  # the measurement of the last epoch's end, still in flight after fit
    assert entry is not None and entry.step == 3
    # epochs 1 and 2 were measured at their ends and applied by the pre-hook during the next epoch
    assert [h.step for h in balancer.history] == [0, 1, 2, 3]
    assert all(0 <= h.lag_steps <= 4 for h in balancer.history[1:3])
    alphas = np.array([median_hill_alpha(w) for w in snapshot])
    np.testing.assert_allclose([x.alpha for x in entry.layers], alphas, rtol=1e-8)
    for name, factor in zip(BALANCED, _linear_map(alphas)):
        group = _group_of(trainer.optimizers[0], module.get_submodule(name).weight)
        assert group["lr"] == pytest.approx(LR * DECAY ** 3 * factor, rel=1e-9)


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    full_cb = TempBalanceCallback()
    full_module = Module("epoch")
    _fit(_trainer(4, full_cb), full_module)

    first_cb = TempBalanceCallback()
    first = _trainer(2, first_cb)
    _fit(first, Module("epoch"))
    path = tmp_path / "half.ckpt"
    first.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert len(saved["callbacks"]["TempBalanceCallback"]["tempbalance"]["history"]) == 3

    resumed_cb = TempBalanceCallback()
    resumed_module = Module("epoch")
    resumed = _trainer(4, resumed_cb)
    _fit(resumed, resumed_module, ckpt_path=str(path))
    full, again = full_cb.balancer, resumed_cb.balancer
    assert [h.step for h in again.history] == [0, 1, 2, 3, 4]
    for h_full, h_again in zip(full.history, again.history):
        np.testing.assert_allclose([x.alpha for x in h_again.layers], [x.alpha for x in h_full.layers], rtol=1e-5)
    assert again.factors == pytest.approx(full.factors, rel=1e-5)
    assert again.get_last_lr() == pytest.approx(full.get_last_lr(), rel=1e-5)
    for p_full, p_again in zip(full_module.parameters(), resumed_module.parameters()):
        torch.testing.assert_close(p_again, p_full, rtol=1e-4, atol=1e-6)


def test_callback_state_dict_before_fit_is_kept_for_fit():
    callback = TempBalanceCallback()
    assert callback.state_dict() == {}
    callback.load_state_dict({"tempbalance": {"version": 1}})
    assert callback.state_dict() == {"tempbalance": {"version": 1}}


def test_bad_options_and_unit_mismatch():
    with pytest.raises(ConfigError, match="unit='batch'"):
        TempBalanceCallback(unit="batch")
    with pytest.raises(ConfigError, match="interval=0"):
        TempBalanceCallback(interval=0)
    callback = TempBalanceCallback(unit="step")
    with pytest.raises(ConfigError, match="differs from the LR scheduler's interval='epoch'"):
        _fit(_trainer(1, callback), Module("epoch"))


class DecayModule(Module):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(tempbalance.param_groups(self), lr=LR, momentum=0.9, weight_decay=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: DECAY ** i)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def test_balance_weight_decay_passes_through():
    module = DecayModule("epoch")
    callback = TempBalanceCallback(balance=("lr", "weight_decay"), wd_s1=0.25, wd_s2=2.0)
    trainer = _trainer(2, callback)
    _fit(trainer, module)
    alphas = np.array([median_hill_alpha(module.get_submodule(n).weight.detach().numpy()) for n in BALANCED])
    decays = 1e-2 * np.interp(alphas, [alphas.min(), alphas.max()], [0.25, 2.0])  # AlphaDecay's map
    optimizer = trainer.optimizers[0]
    for name, decay, factor in zip(BALANCED, decays, _linear_map(alphas)):
        group = _group_of(optimizer, module.get_submodule(name).weight)
        assert group["weight_decay"] == pytest.approx(decay, rel=1e-9)
        assert group["lr"] == pytest.approx(LR * DECAY ** 2 * factor, rel=1e-9)
    assert _group_of(optimizer, module.net[0].weight)["weight_decay"] == 1e-2
