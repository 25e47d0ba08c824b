"""Tests of the training harness: config validation, files written, exact resume, SIGTERM,
atomic checkpoints, and the CLI's one-line errors."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tempbalance
from tempbalance.cli import main as cli_main
from tempbalance.errors import ConfigError
from tempbalance.train import TrainConfig, run_training
from tempbalance.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

needs_scheduler = pytest.mark.skipif(
    not hasattr(tempbalance, "TempBalance"), reason="tempbalance.TempBalance not built yet"
)


def tiny(out: Path | None, **overrides) -> TrainConfig:
    """A run of a few batches: mnist1d (10% of it), cnn1d at half width (3 balanced convs)."""
    values = dict(
        dataset="mnist1d", model="cnn1d", method="cal", epochs=3, lr=0.1, batch_size=64, width=0.5,
        train_fraction=0.1, seed=5, device="cpu", progress=False, num_threads=1,
        out=None if out is None else str(out),
    )
    values.update(overrides)
    return TrainConfig(**values)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out)["model"]


SCALARS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc")


def without_times(rows: list[dict], scalars_only: bool = False) -> list[dict]:
    keep = (lambda k: k in SCALARS) if scalars_only else (lambda k: k != "epoch_time")
    return [{k: v for k, v in row.items() if keep(k)} for row in rows]


def assert_same_run(a: Path, b: Path, scalars_only: bool = False) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    ma, mb = load_checkpoint(a)["metrics"], load_checkpoint(b)["metrics"]
    assert without_times(ma, scalars_only) == without_times(mb, scalars_only)
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert sa["final_test_acc"] == sb["final_test_acc"] and sa["best_test_acc"] == sb["best_test_acc"]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"dataset": "imagenet-22k"}, r"unknown dataset 'imagenet-22k'.*accepted:.*mnist1d"),
        ({"model": "resnet9000"}, r"unknown model 'resnet9000'.*accepted:.*cnn1d"),
        ({"method": "adamw"}, r"unknown method 'adamw'.*accepted:.*tb\+snr"),
        ({"lr": 0.0}, r"lr=0.0 must be a finite number > 0"),
        ({"lr": float("nan")}, r"lr=nan"),
        ({"s1": 1.5, "s2": 0.5}, r"s1=1.5 > s2=0.5"),
        ({"epochs": 0}, r"epochs=0 must be an integer >= 1"),
        ({"train_fraction": 1.5}, r"train_fraction=1.5"),
        ({"fit": "mle"}, r"unknown fit 'mle'.*median"),
        ({"metric": "beta"}, r"unknown metric 'beta'.*alphahat"),
        ({"device": "tpu"}, r"unknown device 'tpu'"),
    ],
)
def test_bad_settings_are_named(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny(None, **overrides).validate()


def test_missing_data_dir_and_unknown_keys(tmp_path):
    with pytest.raises(ConfigError, match="nowhere"):
        tiny(None, data_dir=str(tmp_path / "nowhere")).validate()
    with pytest.raises(ConfigError, match=r"unknown training setting\(s\) \['learning_rate'\].*accepted:.*lr"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_default_model_comes_from_the_dataset():
    assert TrainConfig(dataset="mnist1d").validate().model == "cnn1d"


# ---------------------------------------------------------------- one run and its files


@needs_scheduler
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


@needs_scheduler
def test_tb_with_unit_factors_reproduces_cal_exactly(tmp_path):
    run_training(tiny(tmp_path / "cal", epochs=2))
    run_training(tiny(tmp_path / "tb", method="tb", s1=1.0, s2=1.0, epochs=2))
    assert_same_run(tmp_path / "cal", tmp_path / "tb", scalars_only=True)


def test_diverging_run_is_an_error_not_a_nan(tmp_path):
    with pytest.raises(tempbalance.errors.TempBalanceError, match="diverged"):
        run_training(tiny(tmp_path / "nan", lr=1e30, epochs=1))


# ---------------------------------------------------------------- resume


@needs_scheduler
def test_resume_after_stop_is_bit_exact(tmp_path):
    method = dict(method="tb+snr", s1=0.6, s2=1.4, snr_coef=0.01)
    run_training(tiny(tmp_path / "full", **method))
    stopped = run_training(tiny(tmp_path / "parts", stop_after=1, **method))
    assert stopped["status"] == "stopped" and not (tmp_path / "parts" / "summary.json").exists()
    assert load_checkpoint(tmp_path / "parts")["epoch"] == 1
    run_training(tiny(tmp_path / "parts", resume=True, **method))
    assert_same_run(tmp_path / "full", tmp_path / "parts")
    assert len((tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()) == 3


def test_truncated_checkpoint_falls_back_to_previous(tmp_path, caplog):
    run_training(tiny(tmp_path / "full"))
    out = tmp_path / "cut"
    run_training(tiny(out, stop_after=2))
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        assert load_checkpoint(out)["epoch"] == 1
    assert "checkpoint.pt is unreadable" in caplog.text
    run_training(tiny(out, resume=True))  # redoes epoch 2 from the previous checkpoint
    assert_same_run(tmp_path / "full", out)


def test_no_readable_checkpoint_names_both_files(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*checkpoint\.prev\.pt"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "empty") is None


def training_state(epoch: int, **extra) -> dict:
    """The keys every training checkpoint holds (values only as the loader checks them)."""
    return dict({"epoch": epoch, "config": {}, "model": {}, "optimizer": {}, "scheduler": {}, "rng": {},
                 "metrics": [{"epoch": i + 1} for i in range(epoch)]}, **extra)


def test_save_checkpoint_is_atomic_and_keeps_previous(tmp_path):
    save_checkpoint(training_state(1, x=torch.ones(3)), tmp_path)
    save_checkpoint(training_state(2, x=torch.zeros(3)), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    assert torch.load(tmp_path / "checkpoint.prev.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path)["epoch"] == 2


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_resume_matches(tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "tempbalance.cli", "train", "--dataset", "mnist1d", "--model", "cnn1d",
        "--method", "snr", "--epochs", "40", "--lr", "0.1", "--batch-size", "64", "--width", "0.5",
        "--train-fraction", "0.1", "--seed", "5", "--device", "cpu", "--threads", "1", "--no-progress",
        "--out", str(out),
    ]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stdout.startswith("interrupted:")
    assert not (out / "summary.json").exists()
    done = load_checkpoint(out)["epoch"]
    assert 1 <= done < 40
    # continue one more epoch from the checkpoint and compare with an uninterrupted run
    same = dict(method="snr", epochs=40, stop_after=done + 1)
    run_training(tiny(out, resume=True, **same))
    run_training(tiny(tmp_path / "straight", **same))
    a, b = load_checkpoint(out), load_checkpoint(tmp_path / "straight")
    assert a["epoch"] == b["epoch"] == done + 1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert without_times(a["metrics"]) == without_times(b["metrics"])


# ---------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--dataset", "nope", "--out", "X"], "unknown dataset 'nope'"),
        (["train", "--dataset", "mnist1d", "--method", "adam", "--out", "X"], "unknown method 'adam'"),
        (["train", "--dataset", "mnist1d", "--lr", "-1", "--out", "X"], "lr=-1.0"),
        (["train", "--dataset", "mnist1d", "--s1", "2", "--s2", "1", "--out", "X"], "s1=2.0 > s2=1.0"),
        (["train", "--dataset", "mnist1d", "--epochs", "0", "--out", "X"], "epochs=0"),
        (["train", "--dataset", "cifar10", "--data-dir", "/no/such/dir", "--out", "X"], "/no/such/dir"),
        (["sweep", "/no/such/sweep.toml"], "does not exist"),
        (["report", "/no/such/runs"], "does not exist"),
        (["demo", "--seeds", "9"], "seeds=9"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tempbalance: error:") and words in err[0], err


def test_cli_train_prints_summary_line(tmp_path, capsys):
    argv = [
        "train", "--dataset", "mnist1d", "--model", "cnn1d", "--epochs", "1", "--width", "0.5",
        "--train-fraction", "0.1", "--device", "cpu", "--threads", "1", "--no-progress", "--out", str(tmp_path / "r"),
    ]
    assert cli_main(argv) == 0
    assert capsys.readouterr().out.startswith("finished: cal on mnist1d/cnn1d seed 43, 1/1 epochs")


@pytest.mark.parametrize("method", ["lookahead", "sgdr", "tb+sgdp"])
def test_resume_is_exact_for_other_optimizers(tmp_path, method):
    if method.startswith("tb") and not hasattr(tempbalance, "TempBalance"):
        pytest.skip("tempbalance.TempBalance not built yet")
    same = dict(method=method, epochs=3, lookahead_k=3, sgdr_t0=2)
    run_training(tiny(tmp_path / "full", **same))
    run_training(tiny(tmp_path / "parts", stop_after=1, **same))
    run_training(tiny(tmp_path / "parts", resume=True, **same))
    assert_same_run(tmp_path / "full", tmp_path / "parts")


def test_rng_state_round_trip():
    import random

    import numpy as np

    from tempbalance.train.checkpoint import rng_state, set_rng_state

    state = rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(state)
    second = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


@needs_scheduler
def test_tb_async_run_stops_resumes_and_logs_alphas(tmp_path, capsys):
    out = tmp_path / "async"
    argv = [
        "train", "--dataset", "mnist1d", "--model", "cnn1d", "--method", "tb", "--tb-async", "--epochs", "3",
        "--width", "0.5", "--train-fraction", "0.1", "--device", "cpu", "--threads", "1", "--no-progress",
        "--batch-size", "64", "--seed", "5", "--stop-after", "1", "--out", str(out),
    ]
    assert cli_main(argv) == 0
    assert load_checkpoint(out)["scheduler"]["pending"] == 1  # saved while the worker measured epoch 1
    summary = run_training(tiny(out, method="tb", asynchronous=True, resume=True))
    assert summary["status"] == "finished" and summary["epochs_done"] == 3
    assert json.loads((out / "config.json").read_text())["asynchronous"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert sorted(row["alpha"]) == ["conv2", "conv3", "conv4"]
        for rate in row["layer_lr"].values():
            assert 0.5 * row["lr"] - 1e-12 <= rate <= 1.5 * row["lr"] + 1e-12
    # the measurement pending at the stop was redone after the resume, epoch 2's applied, epoch 3's in flight
    state = load_checkpoint(out)["scheduler"]
    assert [entry["step"] for entry in state["history"]] == [0, 1, 2] and state["pending"] == 3
    assert all(0 <= entry["lag_steps"] <= 7 for entry in state["history"][1:])  # 7 updates an epoch


# ---------------------------------------------------------------- the accelerator options, on CPU


@needs_scheduler
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
@needs_scheduler
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
