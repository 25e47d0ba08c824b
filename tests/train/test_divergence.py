"""Divergence: a non-finite loss or weight stops the run before the epoch is saved or logged, a
loss growing by orders of magnitude warns once, and the non-finite check itself."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import tempbalance
from tempbalance.train import TrainConfig, run_training
from tempbalance.train.checkpoint import load_checkpoint
from tempbalance.train.divergence import DivergenceError
from tempbalance.train.metrics import read_metrics
from tests.helpers.cli import cli
from tests.helpers.runs import TB_RUN, tiny


def test_diverging_run_is_an_error_not_a_nan(tmp_path):
    with pytest.raises(tempbalance.errors.TempBalanceError, match="diverged"):
        run_training(tiny(tmp_path / "nan", lr=1e30, epochs=1))


def test_divergence_stops_before_the_epoch_is_saved(tmp_path, capsys):
    """lr 100 with TB: epoch 2 ends with a finite mean train loss but non-finite BatchNorm
    statistics; that epoch is neither saved nor logged, and the last checkpoint has finite weights."""
    out = tmp_path / "nan"
    with pytest.raises(DivergenceError) as caught:
        run_training(tiny(out, method="tb", lr=100.0))
    message = str(caught.value)
    assert message.startswith("training diverged in epoch 2: ") and "non-finite weights in bn2.running_var" in message
    assert "lr=100.0" in message and "lower the learning rate" in message and "checkpoint of epoch 1" in message
    state = load_checkpoint(out)
    assert state["epoch"] == 1 == len(read_metrics(out))
    for name, tensor in state["model"].items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name
    text = (out / "metrics.jsonl").read_text()
    for line in text.splitlines():  # strict JSON: a parser that refuses NaN/Infinity reads every line
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    code, err, _ = cli(["train", "--out", out, "--resume", "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and "--lr 100.0" in err[0] and "--overwrite" in err[0]


def test_a_loss_growing_by_orders_of_magnitude_warns_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        summary = run_training(tiny(tmp_path / "lr30", lr=30.0))
    assert summary["status"] == "finished"
    warnings = [r.getMessage() for r in caplog.records if "orders of magnitude" in r.getMessage()]
    assert len(warnings) == 1 and "probably diverging" in warnings[0] and "lr=30.0" in warnings[0]
    assert summary["warnings"] == warnings
    assert json.loads((tmp_path / "lr30" / "summary.json").read_text())["warnings"] == warnings
    quiet = run_training(tiny(tmp_path / "fine"))  # a healthy run does not warn
    assert "warnings" not in quiet
    run_training(tiny(tmp_path / "parts", lr=30.0, stop_after=1))  # warned in epoch 1 ...
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resumed = run_training(tiny(tmp_path / "parts", lr=30.0, resume=True))
    assert resumed["warnings"] == warnings  # ... kept across the resume, not given again
    assert "orders of magnitude" not in caplog.text


def test_the_non_finite_check_finds_nan_and_inf_but_not_a_huge_finite_weight():
    from torch import nn

    from tempbalance.train.divergence import non_finite_tensors

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2).half())
    assert non_finite_tensors(model) == []
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # finite, though its sum overflows float32
    assert non_finite_tensors(model) == []
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
        model[1].running_var[1] = float("nan")
        model[0].bias[0] = float("-inf")
    assert non_finite_tensors(model) == ["0.bias", "2.weight", "1.running_var"]


@pytest.mark.slow
def test_diverging_run_stops_with_an_error_not_nan_rates(tmp_path):
    with pytest.raises(tempbalance.errors.TempBalanceError, match="diverged"):
        run_training(TrainConfig(**dict(TB_RUN, lr=1e30, epochs=2, progress=False, out=str(tmp_path / "r"))))
    rows = load_checkpoint(tmp_path / "r")["metrics"]
    assert rows == []  # the diverged epoch is never recorded; the epoch-0 checkpoint stays resumable
