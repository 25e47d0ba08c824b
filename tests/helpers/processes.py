"""``tempbalance`` as a real process: its environment, starting it and waiting for it (bounded in time)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO

TIMEOUT_S = 240
SRC_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))


def start_cli(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tempbalance.cli", *map(str, argv)], env=SRC_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_cli(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"a process did not finish in {TIMEOUT_S} s")


ONE_THREAD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
