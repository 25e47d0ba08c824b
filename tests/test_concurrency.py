"""Several processes on the same runs (issue #17), as real processes started here: three sweeps
of one file at once train each run once; a killed sweep's run is taken over by the next one; a
second `train` on a run being trained is refused. Each process is bounded in time."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tempbalance.atomic import temporaries
from tempbalance.train.rundir import RUN_FILES, inspect_run
from tempbalance.train.runlock import LOCK_NAME
from tempbalance.train.sweep import expand_sweep, load_sweep, run_status

pytestmark = pytest.mark.slow

TIMEOUT_S = 240
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
SWEEP = {
    "seeds": [1, 2],
    "methods": ["cal", "tb"],
    "base": {
        "dataset": "mnist1d", "model": "cnn1d", "width": 0.5, "train_fraction": 0.1, "epochs": 3, "batch_size": 64,
        "device": "cpu", "progress": False, "num_threads": 1,
    },
}


def _sweep_file(tmp_path: Path, methods=("cal", "tb"), **base) -> Path:
    spec = json.loads(json.dumps(SWEEP))
    spec["base"].update(base)
    spec["methods"] = list(methods)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(spec))
    return path


def _start(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tempbalance.cli", *map(str, argv)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"a process did not finish in {TIMEOUT_S} s")


def test_three_sweeps_at_once_train_every_run_exactly_once(tmp_path):
    sweep = _sweep_file(tmp_path)
    procs = [_start("sweep", sweep, "--out", tmp_path / "runs") for _ in range(3)]
    outputs = [_finish(proc) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], [err for _, err in outputs]
    runs = expand_sweep(load_sweep(sweep), out=tmp_path / "runs")
    started = {str(run.out): 0 for run in runs}
    for _, err in outputs:
        for line in err.splitlines():
            found = re.search(r"\] (\S+): (starting|resuming)", line)
            if found:
                started[found.group(1)] += 1
    assert set(started.values()) == {1}, started  # one process trained each run, nobody twice
    for run in runs:
        assert run_status(run) == "done"
        files = inspect_run(run.out)
        assert files.finished and files.summary["epochs_done"] == files.metrics_epoch == files.checkpoint_epoch == 3
        assert not (run.out / LOCK_NAME).exists()
        assert all(temporaries(run.out / name) == [] for name in RUN_FILES)
    summaries = [out.strip().splitlines()[0] for out, _ in outputs]
    assert all(re.match(r"sweep .*: \d/4 runs finished, 0 failed", line) for line in summaries), summaries


def test_a_killed_sweep_leaves_a_stale_lock_file_that_the_next_sweep_takes_over(tmp_path):
    sweep = _sweep_file(tmp_path, methods=["cal"], epochs=40)  # long enough to be killed mid-run
    first = _start("sweep", sweep, "--out", tmp_path / "runs", "--set", "seeds=[1]")
    run_dir = tmp_path / "runs" / "default" / "cal" / "seed1"
    deadline = time.monotonic() + TIMEOUT_S
    while not (run_dir / "metrics.jsonl").exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the sweep did not start training"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert (run_dir / LOCK_NAME).exists()  # left behind by the killed process
    # the next sweep (with 6 epochs: the killed run's 40 make it stale, retrained on request)
    second = _start("sweep", sweep, "--out", tmp_path / "runs", "--set", "seeds=[1]", "--set", "epochs=6",
                    "--rerun-stale")
    out, err = _finish(second)
    assert second.returncode == 0, err
    assert f"stale lock file (pid {first.pid} " in err and "stale: its recorded settings differ (epochs: 40 -> 6)" in err
    assert inspect_run(run_dir).finished and json.loads((run_dir / "config.json").read_text())["epochs"] == 6
    assert not (run_dir / LOCK_NAME).exists()


def test_a_second_train_on_a_run_being_trained_is_refused(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--dataset", "mnist1d", "--model", "cnn1d", "--epochs", "40", "--width", "0.5",
            "--train-fraction", "0.1", "--device", "cpu", "--threads", "1", "--no-progress", "--out", out]
    first = _start(*argv)
    deadline = time.monotonic() + TIMEOUT_S
    while not (out / "checkpoint.pt").exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    second = _start(*argv, "--resume")
    _, err = _finish(second)
    first.send_signal(signal.SIGTERM)
    _finish(first)
    assert second.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "is being trained by another process" in lines[0] and f"pid {first.pid}" in lines[0]
