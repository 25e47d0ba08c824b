"""The harness's AlphaDecay methods: per-layer weight decay in metrics.jsonl (equal to AlphaDecay's
rule on the run's own logged alphas), the report's weight-decay heat maps, the CLI flags, and a
run saved under the old field name ``tb_async`` that still resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_train import needs_scheduler, tiny

from tempbalance.cli import main as cli_main
from tempbalance.errors import ConfigError
from tempbalance.train import run_training
from tempbalance.train.checkpoint import load_checkpoint, save_checkpoint
from tempbalance.train.report import write_report


def rows_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@needs_scheduler
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


@needs_scheduler
def test_report_draws_weight_decay_heat_maps(tmp_path):
    pytest.importorskip("matplotlib")
    run_training(tiny(tmp_path / "runs" / "ad", method="alphadecay", epochs=2, tag="s"))
    run_training(tiny(tmp_path / "runs" / "tb", method="tb", epochs=2, tag="s"))
    files = [f for f in write_report(tmp_path / "runs")["files"] if f.endswith(".png")]
    assert any(f.endswith("_alphadecay_seed5_wd.png") for f in files)
    assert any(f.endswith("_alphadecay_seed5_wd_factor.png") for f in files)
    assert not any("_tb_seed5_wd" in f for f in files)  # the rate-only run has no weight-decay map


@needs_scheduler
def test_cli_flags_reach_the_run(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "train", "--dataset", "mnist1d", "--model", "cnn1d", "--method", "tb+alphadecay", "--epochs", "1",
        "--width", "0.5", "--train-fraction", "0.1", "--device", "cpu", "--threads", "1", "--no-progress",
        "--batch-size", "64", "--seed", "5", "--out", str(out), "--wd-s1", "0.3", "--wd-s2", "1.7",
        "--normalize", "mean", "--norm-follows", "name", "--asynchronous",
    ]
    assert cli_main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["wd_s1"], config["wd_s2"], config["normalize"], config["norm_follows"], config["asynchronous"]) == (
        0.3, 1.7, "mean", "name", True)
    assert cli_main(["train", "--method", "tb", "--normalize", "median", "--dataset", "mnist1d"]) == 2
    assert "unknown normalize 'median'" in capsys.readouterr().err


@needs_scheduler
def test_a_run_saved_as_tb_async_resumes(tmp_path):
    out = tmp_path / "old"
    run_training(tiny(out, method="tb", asynchronous=True, stop_after=1))
    state = load_checkpoint(out)
    state["config"]["tb_async"] = state["config"].pop("asynchronous")  # as 0.1 wrote it
    for key in ("wd_s1", "wd_s2", "normalize", "norm_follows"):
        del state["config"][key]
    save_checkpoint(state, out)
    config = json.loads((out / "config.json").read_text())
    config["tb_async"] = config.pop("asynchronous")
    (out / "config.json").write_text(json.dumps(config))
    summary = run_training(tiny(out, method="tb", asynchronous=True, resume=True))
    assert summary["status"] == "finished" and summary["epochs_done"] == 3
    with pytest.raises(ConfigError, match="settings differ"):
        run_training(tiny(out, method="tb", resume=True, epochs=4, stop_after=4))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["config"]["asynchronous"] is True


def test_the_follow_up_sweep_file_expands(tmp_path):
    from pathlib import Path

    from tempbalance.train.sweep import expand_sweep, load_sweep

    path = Path(__file__).resolve().parents[1] / "configs" / "follow-ups" / "alphadecay-cifar100.toml"
    data = tmp_path / "cifar100"
    data.mkdir()
    runs = expand_sweep(load_sweep(path), [f"data_dir={data}"])
    assert {(r.setting, r.method) for r in runs} == {
        (s, m) for s in ("resnet18", "vgg16") for m in ("cal", "tb", "alphadecay", "tb+alphadecay")
    }
    assert len(runs) == 8 * 5 and all(r.config.norm_follows == "name" and r.config.epochs == 200 for r in runs)
    ad = next(r for r in runs if r.method == "tb+alphadecay" and r.setting == "vgg16")
    assert (ad.config.lr, ad.config.wd_s1, ad.config.wd_s2, ad.config.s1) == (0.05, 0.5, 1.5, 0.5)
