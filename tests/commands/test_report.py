"""``tempbalance report`` on a tiny real sweep (2 methods x 2 seeds x 2 epochs on mnist1d): the table
against an independent numpy computation from the metrics files, and the plots written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tempbalance.cli import main as cli_main
from tempbalance.train.sweep import expand_sweep, run_sweep


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    spec = {
        "name": "tiny",
        "seeds": [1, 2],
        "methods": ["cal", "tb"],
        "base": {
            "dataset": "mnist1d", "model": "cnn1d", "width": 0.5, "train_fraction": 0.1, "epochs": 2, "lr": 0.1,
            "batch_size": 64, "device": "cpu", "progress": False, "num_threads": 1,
        },
        "settings": [{"name": "mnist1d"}],
    }
    run_sweep(expand_sweep(spec, out=root))
    return root


def test_report_on_a_tiny_real_sweep(tiny_sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli_main(["report", str(tiny_sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| mnist1d | cal | 2 |" in printed and "| mnist1d | tb | 2 |" in printed
    # independent recomputation from the metrics files
    acc = {}
    for path in tiny_sweep.rglob("metrics.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        method, seed = path.parent.parent.name, path.parent.name
        acc[(method, seed)] = [row["test_acc"] for row in rows]
    with open(out / "report.csv") as handle:
        table = {row["method"]: row for row in csv.DictReader(handle)}
    for method in ("cal", "tb"):
        finals = [acc[(method, s)][-1] for s in ("seed1", "seed2")]
        bests = [max(acc[(method, s)]) for s in ("seed1", "seed2")]
        assert float(table[method]["final_mean"]) == pytest.approx(np.mean(finals))
        assert float(table[method]["final_std"]) == pytest.approx(np.std(finals, ddof=1))
        assert float(table[method]["best_mean"]) == pytest.approx(np.mean(bests))
        assert table[method]["n_seeds"] == "2"
    diffs = [acc[("tb", s)][-1] - acc[("cal", s)][-1] for s in ("seed1", "seed2")]
    assert float(table["tb"]["diff_vs_cal_mean"]) == pytest.approx(np.mean(diffs))
    assert table["tb"]["n_pairs"] == "2"
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "mnist1d_test_acc.png" in pngs
    assert {"mnist1d_tb_seed1_alpha.png", "mnist1d_tb_seed1_lr.png", "mnist1d_tb_seed1_factor.png"} <= set(pngs)
    assert not any(name.startswith("mnist1d_cal_seed1_") for name in pngs)  # cal has no per-layer alphas
    assert all((out / "plots" / name).stat().st_size > 1000 for name in pngs)
