"""Atomic checkpoints of a training run: the previous one kept, data fsynced before the rename, a
kill between the two renames, a truncated, foreign or unreadable newest file falling back to the
previous one, a full disk, and the random states they carry."""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

import pytest
import torch

from tempbalance.atomic import temporaries
from tempbalance.train import TrainConfig, run_training
from tempbalance.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tempbalance.train.metrics import read_metrics
from tests.helpers.cli import cli
from tests.helpers.runs import (
    TB_RUN,
    TINY_ARGS,
    assert_readable,
    assert_same_run,
    assert_same_weights,
    rows_without_times,
    tiny,
    without_times,
)


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


def test_rng_state_round_trip():
    import random

    import numpy as np

    from tempbalance.train.checkpoint import rng_state, set_rng_state

    state = rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(state)
    second = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_a_full_disk_names_the_file_and_never_leaves_metrics_ahead(tmp_path, straight, monkeypatch, capsys):
    out = tmp_path / "full"
    real_save = torch.save
    calls = []

    def save_on_a_full_disk(obj, handle, *args, **kwargs):
        calls.append(obj.get("epoch"))
        if obj.get("epoch") == 2:  # the disk fills up while the epoch-2 checkpoint is written
            handle.write(b"x" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from OSError(
                errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    code, err, _ = cli(["train", *TINY_ARGS, "--out", out], capsys)
    monkeypatch.undo()
    assert code == 1 and len(err) == 1, err
    assert str(out / "checkpoint.pt") in err[0] and "no space left on device" in err[0]
    assert calls == [0, 1, 2]
    assert temporaries(out / "checkpoint.pt") == []  # the 1000-byte temporary was removed
    assert load_checkpoint(out)["epoch"] == 1 and len(read_metrics(out)) == 1  # metrics not ahead
    # space freed: the same command with --resume finishes, identical to an uninterrupted run
    code, err, _ = cli(["train", *TINY_ARGS, "--out", out, "--resume"], capsys)
    assert code == 0, err
    assert_same_weights(straight, out)
    assert rows_without_times(out) == rows_without_times(straight)


def test_fallback_keeps_the_good_previous_checkpoint(tmp_path, straight, caplog):
    out = tmp_path / "fallback"
    run_training(tiny(out, stop_after=2))  # checkpoint.pt: epoch 2, checkpoint.prev.pt: epoch 1
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    good_previous = (out / "checkpoint.prev.pt").read_bytes()
    with caplog.at_level(logging.WARNING):
        run_training(tiny(out, stop_after=2, resume=True))  # redoes epoch 2 from checkpoint.prev.pt
    assert "checkpoint.pt is unreadable" in caplog.text
    # the first save after the fallback replaced the bad file and kept the good one as prev
    assert (out / "checkpoint.prev.pt").read_bytes() == good_previous
    assert load_checkpoint(out)["epoch"] == 2
    run_training(tiny(out, resume=True))
    assert_same_weights(straight, out)


def test_a_foreign_checkpoint_falls_back_to_the_previous_one(tmp_path, straight, caplog):
    out = tmp_path / "foreign"
    run_training(tiny(out, stop_after=2))
    torch.save({"epoch": 2, "hello": "not a training checkpoint"}, out / "checkpoint.pt")
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(out)["epoch"] == 1
    assert "not a tempbalance training checkpoint (no config, model" in caplog.text
    run_training(tiny(out, resume=True))
    assert_same_weights(straight, out)


@pytest.mark.slow
def test_kill_between_the_two_renames_of_a_checkpoint_leaves_a_resumable_run(tmp_path, monkeypatch, capsys):
    """The narrowest window of the atomic save: checkpoint.pt already moved to checkpoint.prev.pt,
    the new file not yet renamed into place. Simulated in process at the epoch-2 checkpoint."""
    config = dict(TB_RUN, epochs=3, progress=False)
    run_training(TrainConfig(**config, out=str(tmp_path / "straight")))
    real_replace, saves = os.replace, []

    def dying_replace(src, dst):
        if Path(src) in temporaries(cut / "checkpoint.pt"):
            saves.append(dst)
            if len(saves) == 3:  # checkpoints of epochs 0, 1, then 2: die before the final rename
                raise KeyboardInterrupt("simulated SIGKILL")
        return real_replace(src, dst)

    cut = tmp_path / "cut"
    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        run_training(TrainConfig(**config, out=str(cut)))
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (cut / "checkpoint.pt").exists() and (cut / "checkpoint.prev.pt").exists()
    assert len((cut / "metrics.jsonl").read_text().splitlines()) == 1  # never ahead of the newest checkpoint
    assert assert_readable(cut, tmp_path / "report", capsys) == 1
    run_training(TrainConfig(**config, out=str(cut), resume=True))
    a, b = load_checkpoint(cut), load_checkpoint(tmp_path / "straight")
    assert a["epoch"] == b["epoch"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert without_times(a["metrics"]) == without_times(b["metrics"])


@pytest.mark.slow
def test_checkpoint_data_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    from tempbalance.train.checkpoint import save_checkpoint

    def state(epoch: int, w: torch.Tensor) -> dict:
        return {"epoch": epoch, "config": {}, "model": {"w": w}, "optimizer": {}, "scheduler": {}, "rng": {},
                "metrics": [{"epoch": i + 1} for i in range(epoch)]}

    save_checkpoint(state(1, torch.ones(4)), tmp_path)
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync")
        return real_fsync(fd)

    def replace(src, dst):
        events.append(f"replace {Path(src).name} -> {Path(dst).name}")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(state(2, torch.zeros(4)), tmp_path)
    monkeypatch.undo()
    (final,) = [i for i, event in enumerate(events) if re.fullmatch(r"replace \.checkpoint\.\d+-\w+\.tmp\.pt -> checkpoint\.pt", event)]
    assert "fsync" in events[:final]  # the data reach the disk before the name points at them
    assert events.index("replace checkpoint.pt -> checkpoint.prev.pt") < final  # the previous one is kept
    assert torch.load(tmp_path / "checkpoint.prev.pt")["epoch"] == 1 and load_checkpoint(tmp_path)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
