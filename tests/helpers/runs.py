"""Tiny training runs (mnist1d, cnn1d at half width) and the comparisons the harness tests make of
their files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tempbalance.train import TrainConfig
from tempbalance.train.checkpoint import load_checkpoint
from tempbalance.train.metrics import read_metrics
from tests.helpers.cli import call_cli

# A run of a few batches: mnist1d (10% of it), cnn1d at half width (3 balanced convs), 3 epochs of CAL.
TINY = dict(
    dataset="mnist1d", model="cnn1d", method="cal", epochs=3, lr=0.1, batch_size=64, width=0.5,
    train_fraction=0.1, seed=5, device="cpu", progress=False, num_threads=1,
)
TINY_ARGS = [
    "--dataset", "mnist1d", "--model", "cnn1d", "--epochs", "3", "--lr", "0.1", "--batch-size", "64",
    "--width", "0.5", "--train-fraction", "0.1", "--seed", "5", "--device", "cpu", "--threads", "1", "--no-progress",
]


def rows_without_times(directory: Path) -> list[dict]:
    """The metric rows of the run in ``directory``, without the wall-clock ``epoch_time``."""
    return without_times(read_metrics(directory))


def assert_same_weights(a: Path, b: Path) -> None:
    """The newest checkpoints of runs ``a`` and ``b`` hold bit-identical weights."""
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def tiny(out: Path | None, **overrides) -> TrainConfig:
    """A run of a few batches: mnist1d (10% of it), cnn1d at half width (3 balanced convs)."""
    return TrainConfig(**dict(TINY, out=None if out is None else str(out), **overrides))


def weights(out: Path) -> dict[str, torch.Tensor]:
    """The model weights of the newest checkpoint of the run in ``out``."""
    return load_checkpoint(out)["model"]


SCALARS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc")


def without_times(rows: list[dict], scalars_only: bool = False) -> list[dict]:
    """Metric rows without the wall-clock ``epoch_time`` (the one field allowed to differ), or only
    their scalars."""
    keep = (lambda k: k in SCALARS) if scalars_only else (lambda k: k != "epoch_time")
    return [{k: v for k, v in row.items() if keep(k)} for row in rows]


def assert_same_run(a: Path, b: Path, scalars_only: bool = False) -> None:
    """Runs ``a`` and ``b`` end with the same weights, metrics and final / best accuracy."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    ma, mb = load_checkpoint(a)["metrics"], load_checkpoint(b)["metrics"]
    assert without_times(ma, scalars_only) == without_times(mb, scalars_only)
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert sa["final_test_acc"] == sb["final_test_acc"] and sa["best_test_acc"] == sb["best_test_acc"]


# A TempBalance run of ~0.4 s per epoch on one thread: mnist1d (10%), cnn1d at half width
# (3 balanced convs), 12 epochs, batch 32 (13 batches per epoch).
TB_RUN = dict(
    dataset="mnist1d", model="cnn1d", method="tb", epochs=12, lr=0.1, batch_size=32, width=0.5,
    train_fraction=0.1, seed=5, device="cpu", num_threads=1,
)
TB_RUN_ARGS = [
    "--dataset", "mnist1d", "--model", "cnn1d", "--method", "tb", "--epochs", "12", "--lr", "0.1",
    "--batch-size", "32", "--width", "0.5", "--train-fraction", "0.1", "--seed", "5", "--device", "cpu",
    "--threads", "1", "--no-progress",
]


def assert_readable(out: Path, report_dir: Path, capsys) -> int:
    """The run directory after a kill: a checkpoint loads and `tempbalance report` reads it."""
    state = load_checkpoint(out)
    assert state is not None and 0 <= state["epoch"] < TB_RUN["epochs"]
    code, err, _ = call_cli(["report", out, "--no-plots", "--out", report_dir], capsys)
    assert code == 0, err
    assert (report_dir / "report.md").exists()
    return state["epoch"]
