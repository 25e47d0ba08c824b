"""Tests of the per-run lock: one holder at a time across processes, released by the OS when the
holder dies (SIGKILL included), the stale lock file it leaves detected and taken over, and a second
``train`` on a run being trained refused."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tempbalance.train.runlock import LOCK_NAME, RunLock, RunLockedError, lock_holder
from tests.helpers.paths import REPO
from tests.helpers.processes import TIMEOUT_S, finish_cli, start_cli

HOLD = (
    "import sys, time; from tempbalance.train.runlock import RunLock\n"
    "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)\n"
)


def _holder(directory: Path) -> subprocess.Popen:
    """A process that takes the lock of ``directory`` and sleeps holding it."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_one_holder_at_a_time_and_the_lock_file_goes_with_it(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        assert lock.held and (tmp_path / "run" / LOCK_NAME).exists()
        assert f"pid {os.getpid()}" in lock_holder(tmp_path / "run")
        with pytest.raises(RunLockedError, match=rf"being trained by another process \(pid {os.getpid()} "):
            RunLock(tmp_path / "run").acquire()  # a second handle, as another process would have
    assert not (tmp_path / "run" / LOCK_NAME).exists() and lock_holder(tmp_path / "run") is None
    RunLock(tmp_path / "run").acquire().release()  # free again


def test_a_killed_holder_leaves_a_stale_lock_file_that_is_taken_over(tmp_path, caplog):
    proc = _holder(tmp_path)
    try:
        holder = lock_holder(tmp_path)
        assert holder is not None and f"pid {proc.pid}" in holder
        with pytest.raises(RunLockedError) as caught:
            RunLock(tmp_path).acquire()
        assert f"pid {proc.pid}" in str(caught.value) and caught.value.holder == holder
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {proc.pid} ")  # the file stays behind ...
    assert lock_holder(tmp_path) is None  # ... but nobody holds the lock
    with caplog.at_level(logging.INFO), RunLock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / LOCK_NAME).read_text()
    assert f"stale lock file (pid {proc.pid}" in caplog.text


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno

    from tempbalance.train import runlock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING):
        lock = RunLock(tmp_path).acquire()
    assert not lock.held and "file locks are not supported here" in caplog.text
    assert lock_holder(tmp_path) is None
    lock.release()


# ---------------------------------------------------------------- as real processes


@pytest.mark.slow
def test_a_second_train_on_a_run_being_trained_is_refused(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--dataset", "mnist1d", "--model", "cnn1d", "--epochs", "40", "--width", "0.5",
            "--train-fraction", "0.1", "--device", "cpu", "--threads", "1", "--no-progress", "--out", out]
    first = start_cli(*argv)
    deadline = time.monotonic() + TIMEOUT_S
    while not (out / "checkpoint.pt").exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    second = start_cli(*argv, "--resume")
    _, err = finish_cli(second)
    first.send_signal(signal.SIGTERM)
    finish_cli(first)
    assert second.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "is being trained by another process" in lines[0] and f"pid {first.pid}" in lines[0]
