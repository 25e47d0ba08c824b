"""Output piped to a file stays short: the CLI run as a real process with stdout and stderr going to a
file (no terminal), every line counted after splitting on both ``\\n`` and ``\\r`` (a bar's redraw
counts as a line)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
EPOCH_LINE = re.compile(
    r"(cal|tb) mnist1d/cnn1d seed \d+: epoch (\d+)/(\d+), loss \d+\.\d+, test acc \d+\.\d+%, "
    r"\d+(\.\d)?s elapsed(, ETA \S+)?"
)


def run_to_file(tmp_path: Path, *argv: str) -> tuple[str, list[str]]:
    """Run ``tempbalance ARGV`` with stdout and stderr both written to one file (as ``> log 2>&1``);
    the file's text and its lines, split on every ``\\n`` and ``\\r``."""
    log = tmp_path / "log.txt"
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    with open(log, "wb") as handle:
        code = subprocess.run([sys.executable, "-m", "tempbalance.cli", *argv], stdout=handle,
                              stderr=subprocess.STDOUT, env=env, timeout=600).returncode
    text = log.read_text(encoding="utf-8")
    assert code == 0, text
    return text, re.split(r"\r\n|\r|\n", text.rstrip("\n"))


def test_ten_epochs_to_a_file_print_at_most_15_lines(tmp_path):
    text, lines = run_to_file(
        tmp_path, "train", "--dataset", "mnist1d", "--model", "cnn1d", "--epochs", "10", "--train-fraction", "0.1",
        "--out", str(tmp_path / "run"),
    )
    assert len(lines) <= 15, text
    assert "\r" not in text  # no bar redraws at all
    epochs = [m for m in map(EPOCH_LINE.fullmatch, lines) if m]
    assert [int(m.group(2)) for m in epochs] == list(range(1, 11)), text  # one line per epoch, in order
    assert all(m.group(3) == "10" for m in epochs)
    assert all(m.group(5) for m in epochs[:-1]) and epochs[-1].group(5) is None  # an ETA until the last
    assert lines[-1].startswith("finished: cal on mnist1d/cnn1d seed 43, 10/10 epochs")


def test_no_progress_leaves_only_the_summary(tmp_path):
    text, lines = run_to_file(
        tmp_path, "train", "--dataset", "mnist1d", "--model", "cnn1d", "--epochs", "2", "--train-fraction", "0.1",
        "--out", str(tmp_path / "run"), "--no-progress",
    )
    assert lines == [lines[-1]] and lines[-1].startswith("finished: "), text


@pytest.mark.slow
def test_the_demo_piped_to_a_file_is_a_few_lines_per_run(tmp_path):
    """``make demo`` piped to a file: per run one "starting" line and one line per epoch, then the
    results (table, per-layer alphas, files); a second run reuses the runs with one line each."""
    argv = ["demo", "--out", str(tmp_path / "demo"), "--seeds", "1", "--epochs", "2", "--train-fraction", "0.1"]
    text, lines = run_to_file(tmp_path, *argv)
    runs, epochs = 2, 2  # cal and tb, one seed
    assert "\r" not in text
    results = next(i for i, line in enumerate(lines) if line.startswith("| setting"))
    progress, shown = lines[:results], lines[results:]
    assert len(progress) == runs * (1 + epochs), text
    assert sum(bool(EPOCH_LINE.fullmatch(line)) for line in progress) == runs * epochs
    assert sum(line.endswith(": starting") for line in progress) == runs
    # The results: 2 header + 2 method rows, a blank, the alpha caption, 2 header + 5 layer rows of
    # cnn1d, a blank and the report line: 15 lines.
    assert len(shown) == 15 and shown[-1].startswith("Report: "), text
    assert not any("warn" in line.lower() for line in lines), text
    again_text, again = run_to_file(tmp_path, *argv)  # finished runs are reused
    assert "\r" not in again_text
    assert sum(line.endswith(": done, skipped") for line in again) == runs
    assert len(again) == runs + len(shown), again_text
