"""The training loop: one run and the files it writes (config, metrics, checkpoints, summary), the
rates of the balanced methods, seeds, accelerator options on the CPU (bf16 autocast, torch.compile),
and ``config.json`` rewritten atomically."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import tempbalance
from tempbalance.errors import ConfigError
from tempbalance.train import TrainConfig, run_training
from tempbalance.train.checkpoint import load_checkpoint
from tempbalance.train.models import create_model
from tests.helpers.runs import TB_RUN, assert_same_run, tiny, weights


def test_tb_run_writes_config_metrics_checkpoints_and_summary(tmp_path):
    out = tmp_path / "tb"
    summary = run_training(tiny(out, method="tb", epochs=2))
    assert summary["status"] == "finished" and summary["epochs_done"] == 2
    config = json.loads((out / "config.json").read_text())
    assert set(TrainConfig.field_names()) <= set(config) and config["device"] == "cpu"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    balanced = ["conv2", "conv3", "conv4"]  # first (conv1) and last (linear) are not balanced
    for row in rows:
        assert sorted(row["alpha"]) == balanced and sorted(row["layer_lr"]) == balanced
        assert all(0 < a < 100 for a in row["alpha"].values())
        for rate in row["layer_lr"].values():  # linear map: within [s1, s2] x the global rate
            assert 0.5 * row["lr"] - 1e-12 <= rate <= 1.5 * row["lr"] + 1e-12
    # the first epoch's rates come from the alphas of the initial weights: one layer gets s1, one s2
    first = sorted(rows[0]["layer_lr"].values())
    assert first[0] == pytest.approx(0.5 * 0.1) and first[-1] == pytest.approx(1.5 * 0.1)
    with open(out / "metrics.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 2 and "alpha/conv2" in table[0] and "layer_lr/conv4" in table[0]
    assert float(table[1]["test_acc"]) == pytest.approx(rows[1]["test_acc"])
    assert summary["final_test_acc"] == rows[-1]["test_acc"]
    assert summary["best_test_acc"] == max(row["test_acc"] for row in rows)
    assert (out / "checkpoint.pt").exists() and (out / "checkpoint.prev.pt").exists()
    assert load_checkpoint(out)["epoch"] == 2


def test_cal_rates_follow_cosine_and_rerun_needs_resume(tmp_path):
    out = tmp_path / "cal"
    run_training(tiny(out, epochs=3))
    rows = load_checkpoint(out)["metrics"]
    import math

    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * t / 3)) for t in range(3)]
    assert [row["lr"] for row in rows] == pytest.approx(expected)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_training(tiny(out, epochs=3))
    assert run_training(tiny(out, epochs=3, resume=True))["status"] == "finished"
    with pytest.raises(ConfigError, match=r"lr: 0.1 -> 0.2"):
        run_training(tiny(out, epochs=3, lr=0.2, resume=True))


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    run_training(tiny(tmp_path / "a", epochs=1))
    run_training(tiny(tmp_path / "b", epochs=1))
    run_training(tiny(tmp_path / "c", epochs=1, seed=6))
    assert_same_run(tmp_path / "a", tmp_path / "b")
    assert not torch.equal(weights(tmp_path / "a")["conv2.weight"], weights(tmp_path / "c")["conv2.weight"])


def test_tb_with_unit_factors_reproduces_cal_exactly(tmp_path):
    run_training(tiny(tmp_path / "cal", epochs=2))
    run_training(tiny(tmp_path / "tb", method="tb", s1=1.0, s2=1.0, epochs=2))
    assert_same_run(tmp_path / "cal", tmp_path / "tb", scalars_only=True)


def test_bf16_autocast_runs_and_changes_the_arithmetic(tmp_path):
    plain = run_training(tiny(tmp_path / "fp32", method="tb", epochs=1))
    bf16 = run_training(tiny(tmp_path / "bf16", method="tb", epochs=1, amp="bf16"))
    assert bf16["status"] == "finished" and math.isfinite(bf16["final_test_loss"])
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["amp"] == "bf16"
    # autocast really ran: the weights differ from the float32 run's, but stay float32 and close
    wa, wb = weights(tmp_path / "fp32"), weights(tmp_path / "bf16")
    assert all(wb[k].dtype == wa[k].dtype for k in wa)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa if wa[k].is_floating_point())
    assert abs(bf16["final_test_acc"] - plain["final_test_acc"]) < 15


@pytest.mark.slow  # inductor compiles the model on the CPU (~1 min on 2 cores)
def test_compiled_run_saves_plain_weights_and_resumes(tmp_path):
    out = tmp_path / "compiled"
    stopped = run_training(tiny(out, method="tb", compile=True, stop_after=1))
    assert stopped["status"] == "stopped"
    keys = set(weights(out))
    assert keys == set(tempbalance.train.models.create_model("cnn1d", 10, 1, 0.5).state_dict())  # no _orig_mod.
    summary = run_training(tiny(out, method="tb", compile=True, resume=True))
    assert summary["status"] == "finished" and summary["epochs_done"] == 3
    eager = run_training(tiny(tmp_path / "eager", method="tb"))
    assert abs(summary["final_test_acc"] - eager["final_test_acc"]) < 15  # same recipe, other kernels


def rows_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, lr_balanced", [("alphadecay", False), ("tb+alphadecay", True)])
def test_alphadecay_run_logs_per_layer_weight_decay(tmp_path, method, lr_balanced):
    out = tmp_path / method
    summary = run_training(tiny(out, method=method, epochs=3, weight_decay=1e-3, wd_s1=0.25, wd_s2=2.0))
    assert summary["status"] == "finished"
    rows = rows_of(out)
    for before, row in zip(rows, rows[1:]):  # an epoch trains with the decays set from the alphas logged before it
        alphas = before["alpha"]
        a = np.array(list(alphas.values()))
        want = 1e-3 * np.interp(a, [a.min(), a.max()], [0.25, 2.0])  # AlphaDecay's rule on the logged alphas
        assert list(row["layer_wd"]) == list(alphas)
        np.testing.assert_allclose(list(row["layer_wd"].values()), want, rtol=1e-9)
        rates = np.array(list(row["layer_lr"].values()))
        assert (rates.min() < rates.max()) == lr_balanced
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "layer_wd/conv2" in header


def test_train_with_esd_farms_logs_farms_alphas(tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(
        dataset="mnist1d", model="cnn1d", method="tb", esd="farms", epochs=1, batch_size=64, width=0.5,
        train_fraction=0.1, seed=3, device="cpu", progress=False, num_threads=1, out=str(out),
    )
    run_training(config)
    assert json.loads((out / "config.json").read_text())["esd"] == "farms"
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["alpha"]
    model = create_model("cnn1d", 10, in_channels=1, width=0.5)
    model.load_state_dict(load_checkpoint(out)["model"])
    farms = tempbalance.analyze(model, esd="farms", precision="float64").alphas()
    plain = tempbalance.analyze(model, precision="float64").alphas()
    assert logged and all(logged[name] == pytest.approx(farms[name], rel=1e-12) for name in logged)
    assert all(abs(logged[name] - plain[name]) > 1e-6 for name in logged)
    with pytest.raises(ConfigError, match="unknown esd 'x'"):
        TrainConfig(dataset="mnist1d", esd="x").validate()


@pytest.mark.slow
def test_config_json_survives_a_crash_while_it_is_rewritten(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_training(TrainConfig(**dict(TB_RUN, method="cal", epochs=2, stop_after=1, progress=False, out=str(out))))
    before = (out / "config.json").read_text()
    import tempbalance.train.checkpoint as checkpoint_module

    real_replace = os.replace

    def killed_before_rename(src, dst, *args, **kwargs):
        if str(dst).endswith("config.json"):
            Path(src).write_text(Path(src).read_text()[:10])  # a half-written temporary file
            raise KeyboardInterrupt("simulated kill during the write")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.os, "replace", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        run_training(TrainConfig(**dict(TB_RUN, method="cal", epochs=2, progress=False, out=str(out), resume=True)))
    monkeypatch.setattr(checkpoint_module.os, "replace", real_replace)
    assert (out / "config.json").read_text() == before  # the old, complete file is still there
    json.loads((out / "config.json").read_text())
