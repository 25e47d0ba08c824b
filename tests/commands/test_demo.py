"""Test of the demo through its options: 1 seed, 1 epoch, a small share of mnist1d; its thread
setting follows the environment."""

from __future__ import annotations

import json


from tempbalance.cli import build_parser
from tempbalance.cli import main as cli_main


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--seeds", "1", "--epochs", "1", "--train-fraction", "0.1", "--threads", "1",
            "--no-progress"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    for method in ("cal", "tb"):
        summary = json.loads((out / "mnist1d-cnn1d" / method / "seed43" / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["epochs_done"] == 1
        assert summary["dataset"] == "mnist1d" and summary["model"] == "cnn1d"
        assert f"| mnist1d-cnn1d | {method} | 1 |" in printed
    # per-layer alphas of both methods for every conv / linear layer, TB factors for the balanced ones
    lines = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| conv")}
    assert sorted(lines) == ["conv1", "conv2", "conv3", "conv4"]
    assert lines["conv1"].rstrip().endswith("| — |")  # not balanced
    factor = float(lines["conv3"].split("|")[-2])
    assert 0.5 <= factor <= 1.5
    assert (out / "report.md").exists() and (out / "report.csv").exists()
    assert (out / "plots" / "mnist1d-cnn1d_test_acc.png").exists()
    assert (out / "plots" / "mnist1d-cnn1d_tb_seed43_alpha.png").exists()
    # a second call reuses the finished runs
    assert cli_main(argv) == 0


# ---------------------------------------------------------------- options


def test_demo_threads_default_to_the_environment():
    args = build_parser().parse_args(["demo"])
    assert args.threads is None  # run_demo then leaves torch's threads (OMP_NUM_THREADS) alone
    assert build_parser().parse_args(["demo", "--threads", "3"]).threads == 3
