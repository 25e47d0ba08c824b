"""Resuming a run: bit-exact after a stop, a SIGTERM or SIGKILL at any moment; the run's own settings
read back (a flag that changes the experiment refused, one that changes only the arithmetic warned
about); a run never silently overwritten; a full disk while resuming named."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tempbalance.atomic import WriteError, temporaries
from tempbalance.cli import main as cli_main
from tempbalance.errors import ConfigError
from tempbalance.train import run_training
from tempbalance.train import loop as loop_module
from tempbalance.train.checkpoint import load_checkpoint, save_checkpoint
from tests.helpers.cli import call_cli, cli
from tests.helpers.processes import ONE_THREAD_ENV
from tests.helpers.runs import (
    TB_RUN,
    TB_RUN_ARGS,
    TINY_ARGS,
    assert_readable,
    assert_same_run,
    assert_same_weights,
    rows_without_times,
    tiny,
    without_times,
)


def test_resume_after_stop_is_bit_exact(tmp_path):
    method = dict(method="tb+snr", s1=0.6, s2=1.4, snr_coef=0.01)
    run_training(tiny(tmp_path / "full", **method))
    stopped = run_training(tiny(tmp_path / "parts", stop_after=1, **method))
    assert stopped["status"] == "stopped" and not (tmp_path / "parts" / "summary.json").exists()
    assert load_checkpoint(tmp_path / "parts")["epoch"] == 1
    run_training(tiny(tmp_path / "parts", resume=True, **method))
    assert_same_run(tmp_path / "full", tmp_path / "parts")
    assert len((tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()) == 3


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


@pytest.mark.parametrize("method", ["lookahead", "sgdr", "tb+sgdp"])
def test_resume_is_exact_for_other_optimizers(tmp_path, method):
    same = dict(method=method, epochs=3, lookahead_k=3, sgdr_t0=2)
    run_training(tiny(tmp_path / "full", **same))
    run_training(tiny(tmp_path / "parts", stop_after=1, **same))
    run_training(tiny(tmp_path / "parts", resume=True, **same))
    assert_same_run(tmp_path / "full", tmp_path / "parts")


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


def test_a_finished_run_without_checkpoints_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "done"
    run_training(tiny(out, epochs=1))
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).unlink()
    before = {name: (out / name).read_bytes() for name in ("summary.json", "metrics.jsonl", "config.json")}
    with pytest.raises(ConfigError, match=r"already holds a run \(config\.json, metrics\.jsonl, metrics\.csv, "
                                          r"summary\.json\); pass resume=True .* overwrite=True"):
        run_training(tiny(out, epochs=1, lr=0.2))
    code, err, _ = cli(["train", *TINY_ARGS, "--epochs", "1", "--out", out], capsys)
    assert code == 2 and len(err) == 1 and str(out) in err[0] and "--resume" in err[0] and "--overwrite" in err[0]
    assert {name: (out / name).read_bytes() for name in before} == before
    # a finished run with its checkpoints removed still counts as finished for --resume
    assert run_training(tiny(out, epochs=1, resume=True))["status"] == "finished"
    # --overwrite starts over: the new settings' run replaces the old files (only the run's own)
    (out / "notes.txt").write_text("mine")
    code, err, _ = cli(["train", *TINY_ARGS, "--epochs", "1", "--lr", "0.2", "--overwrite", "--out", out], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["lr"] == 0.2 and (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="contradict"):
        tiny(out, resume=True, overwrite=True).validate()


def test_resume_alone_continues_with_the_runs_own_settings(tmp_path, straight, capsys):
    out = tmp_path / "parts"
    run_training(tiny(out, stop_after=1))
    code, err, stdout = cli(["train", "--out", out, "--resume", "--no-progress"], capsys)  # nothing else given
    assert code == 0, err
    assert stdout.startswith("finished: cal on mnist1d/cnn1d seed 5, 3/3 epochs")
    assert_same_weights(straight, out)
    assert rows_without_times(out) == rows_without_times(straight)
    # an explicit flag that changes the experiment is refused, naming it
    code, err, _ = cli(["train", "--out", out, "--resume", "--lr", "0.3"], capsys)
    assert code == 2 and len(err) == 1 and "lr: 0.1 -> 0.3" in err[0]
    # the Python API reads the run back the same way from a dict
    assert run_training({"out": str(out), "resume": True, "progress": False})["status"] == "finished"


def test_resume_uses_the_runs_thread_count_when_none_is_given(tmp_path, straight, monkeypatch):
    out = tmp_path / "threads"
    run_training(tiny(out, stop_after=1))
    seen = []
    real_epoch = loop_module._train_epoch

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop_module, "_train_epoch", spy)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # as OMP_NUM_THREADS=2 would give this process
    try:
        run_training(tiny(out, num_threads=None, resume=True))
    finally:
        torch.set_num_threads(previous)
    assert seen == [1, 1]  # the run's own thread count, not this process's 2
    assert_same_weights(straight, out)


def test_resume_with_other_numerics_warns_once_and_config_json_keeps_the_original(tmp_path, caplog, capsys):
    out = tmp_path / "numerics"
    run_training(tiny(out, stop_after=1))
    original = json.loads((out / "config.json").read_text())
    with caplog.at_level(logging.WARNING):
        code, err, _ = cli(["train", "--out", out, "--resume", "--threads", "2", "--no-deterministic",
                            "--no-progress", "--stop-after", "2"], capsys)
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if "bit-identical" in r.getMessage()]
    assert len(warnings) == 1
    assert "num_threads 1 -> 2" in warnings[0] and "deterministic True -> False" in warnings[0]
    written = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in written.items() if k != "resumed"} == original  # the run's original values
    assert written["resumed"][0]["epoch"] == 1 and written["resumed"][0]["threads"] == 2
    assert written["resumed"][0]["changed"] == ["num_threads 1 -> 2", "deterministic True -> False"]
    state = load_checkpoint(out)
    assert state["config"]["num_threads"] == 1 and state["config"]["deterministic"] is True


def test_a_full_disk_while_resuming_names_the_file(tmp_path, monkeypatch):
    out = tmp_path / "r"
    run_training(tiny(out, stop_after=1))
    import tempbalance.atomic as atomic

    real = atomic._create

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_create", full)
    with pytest.raises(WriteError, match=rf"cannot write {out / 'config.json'}: no space left"):
        run_training(tiny(out, resume=True))
    monkeypatch.setattr(atomic, "_create", real)
    assert run_training(tiny(out, resume=True))["status"] == "finished"


def _spawn(out: Path, resume: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "tempbalance.cli", "train", *TB_RUN_ARGS, "--out", str(out)]
    if resume:
        command.append("--resume")
    return subprocess.Popen(command, env=ONE_THREAD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _wait(proc: subprocess.Popen, condition, timeout: float = 120.0, pause: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before the kill point: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the kill point")
        if pause:
            time.sleep(pause)


def _wait_new_checkpoint(proc: subprocess.Popen, out: Path) -> None:
    before = _mtime(out / "checkpoint.pt")
    _wait(proc, lambda: _mtime(out / "checkpoint.pt") not in (0, before))


@pytest.mark.slow
def test_sigkill_at_three_moments_then_sigint_resume_is_bit_exact(tmp_path, capsys):
    """Kill -9 (1) right after the first checkpoint, (2) mid-epoch, (3) as a later checkpoint write
    starts; then SIGINT; resume with --resume each time and finish: identical to an uninterrupted run."""
    rng = random.Random(20231129)
    out = tmp_path / "killed"
    epochs_at_kill = []
    reference = _spawn(tmp_path / "straight", resume=False)  # uninterrupted, alongside

    proc = _spawn(out, resume=False)  # 1: soon after the epoch-0 checkpoint appears
    _wait(proc, lambda: (out / "checkpoint.pt").exists())
    time.sleep(rng.uniform(0.0, 0.3))
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    epochs_at_kill.append(assert_readable(out, tmp_path / "report1", capsys))

    proc = _spawn(out, resume=True)  # 2: mid-epoch, a random moment after a checkpoint
    _wait_new_checkpoint(proc, out)
    time.sleep(rng.uniform(0.05, 0.25))
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    epochs_at_kill.append(assert_readable(out, tmp_path / "report2", capsys))

    proc = _spawn(out, resume=True)  # 3: while a later checkpoint is being written (tmp file present)
    _wait_new_checkpoint(proc, out)
    renamed = [_mtime(out / "checkpoint.pt")]

    def writing_checkpoint() -> bool:
        if temporaries(out / "checkpoint.pt"):  # a checkpoint's temporary file is being written
            return True
        stamp = _mtime(out / "checkpoint.pt")
        if stamp != renamed[-1]:
            renamed.append(stamp)
        return len(renamed) > 3  # the write window was missed 3 times: kill right after a rename

    _wait(proc, writing_checkpoint, pause=0.0)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    epochs_at_kill.append(assert_readable(out, tmp_path / "report3", capsys))

    proc = _spawn(out, resume=True)  # 4: SIGINT (Ctrl-C) stops cleanly with exit 130
    _wait_new_checkpoint(proc, out)
    time.sleep(rng.uniform(0.0, 0.2))
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert stdout.startswith("interrupted:") and "Traceback" not in stderr
    assert not (out / "summary.json").exists()
    epochs_at_kill.append(assert_readable(out, tmp_path / "report4", capsys))
    assert epochs_at_kill == sorted(epochs_at_kill) and epochs_at_kill[-1] < TB_RUN["epochs"]

    code, err, _ = call_cli(["train", *TB_RUN_ARGS, "--out", out, "--resume"], capsys)
    assert code == 0, err
    _, reference_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_err

    killed, straight = load_checkpoint(out), load_checkpoint(tmp_path / "straight")
    assert killed["epoch"] == straight["epoch"] == TB_RUN["epochs"]
    assert killed["model"].keys() == straight["model"].keys()
    for key, value in straight["model"].items():
        assert torch.equal(killed["model"][key], value), key

    def rows(directory: Path) -> list[dict]:
        return without_times(json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines())

    assert rows(out) == rows(tmp_path / "straight") and len(rows(out)) == TB_RUN["epochs"]
    summaries = [json.loads((d / "summary.json").read_text()) for d in (out, tmp_path / "straight")]
    for key in ("status", "epochs_done", "final_test_acc", "final_test_loss", "best_test_acc", "best_epoch"):
        assert summaries[0][key] == summaries[1][key], key
    code, err, _ = call_cli(["report", tmp_path, "--no-plots", "--out", tmp_path / "report-final"], capsys)
    assert code == 0, err
