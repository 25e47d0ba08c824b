"""The ``tempbalance`` entry point: exit statuses and quiet endings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tempbalance.cli import build_parser

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.parametrize("argv, status", [(["data", "list"], 141), (["train", "--help"], 0)])
def test_output_piped_into_a_reader_that_goes_away_ends_quietly(argv, status):
    """`tempbalance ... | head`: the reader closes the pipe before the output is written."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    process = subprocess.Popen([sys.executable, "-m", "tempbalance.cli", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
    process.stdout.close()  # before the interpreter has even imported torch
    got = process.wait(timeout=120)
    stderr = process.stderr.read().decode()
    assert stderr == "", stderr
    # 128 + SIGPIPE, as a shell reports a writer whose reader went away; argparse's help text
    # ignores a closed stdout itself (exit 0)
    assert got == status


def test_demo_threads_default_to_the_environment():
    args = build_parser().parse_args(["demo"])
    assert args.threads is None  # run_demo then leaves torch's threads (OMP_NUM_THREADS) alone
    assert build_parser().parse_args(["demo", "--threads", "3"]).threads == 3


def test_the_public_api_names_what_users_need():
    from importlib.metadata import version

    import tempbalance

    assert tempbalance.__version__ == version("tempbalance")
    assert issubclass(tempbalance.ConfigError, tempbalance.TempBalanceError)
    assert issubclass(tempbalance.ConfigError, ValueError)
    for name in ("ConfigError", "TempBalanceError", "Rebalance", "LayerBalance", "model_balancing"):
        assert name in tempbalance.__all__ and getattr(tempbalance, name) is not None
