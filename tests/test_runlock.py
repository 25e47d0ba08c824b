"""Tests of the per-run lock: one holder at a time across processes, released by the OS when the
holder dies (SIGKILL included), the stale lock file it leaves detected and taken over."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tempbalance.train.runlock import LOCK_NAME, RunLock, RunLockedError, lock_holder

HOLD = (
    "import sys, time; from tempbalance.train.runlock import RunLock\n"
    "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)\n"
)


def _holder(directory: Path) -> subprocess.Popen:
    """A process that takes the lock of ``directory`` and sleeps holding it."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
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
