"""Tests of the report: numbers against hand-made runs and an independent numpy computation on
a tiny real sweep (2 methods x 2 seeds x 2 epochs on mnist1d), files and plots written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import tempbalance
from tempbalance.cli import main as cli_main
from tempbalance.errors import ConfigError
from tempbalance.train.report import collect_runs, summarize, write_report
from tempbalance.train.sweep import expand_sweep, run_sweep


def fake_run(root: Path, setting: str, method: str, seed: int, accs: list[float], finished: bool = True) -> None:
    """A run directory as run_training leaves it (only the fields the report reads)."""
    directory = root / setting / method / f"seed{seed}"
    directory.mkdir(parents=True)
    config = {"dataset": "d", "model": "m", "method": method, "seed": seed, "tag": setting}
    (directory / "config.json").write_text(json.dumps(config))
    rows = [{"epoch": i + 1, "lr": 0.1, "test_acc": acc, "alpha": {"l1": 2.0 + i}, "layer_lr": {"l1": 0.1}}
            for i, acc in enumerate(accs)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (directory / "summary.json").write_text(json.dumps({"status": "finished", "epochs_done": len(accs)}))


def test_summary_numbers_on_hand_made_runs(tmp_path):
    fake_run(tmp_path, "s", "cal", 1, [50.0, 60.0, 58.0])
    fake_run(tmp_path, "s", "cal", 2, [52.0, 64.0, 62.0])
    fake_run(tmp_path, "s", "tb", 1, [51.0, 61.0, 61.0])
    fake_run(tmp_path, "s", "tb", 2, [53.0, 63.0, 66.0])
    fake_run(tmp_path, "s", "tb", 3, [10.0, 20.0, 30.0])  # no cal partner: not in the paired difference
    fake_run(tmp_path, "s", "snr", 1, [1.0, 2.0], finished=False)  # unfinished: left out
    rows = {row["method"]: row for row in summarize(collect_runs(tmp_path))}
    assert set(rows) == {"cal", "tb"}
    cal, tb = rows["cal"], rows["tb"]
    assert cal["n_seeds"] == 2 and cal["final_mean"] == pytest.approx(60.0)
    assert cal["final_std"] == pytest.approx(2 ** 0.5 * 2)
    assert cal["best_mean"] == pytest.approx(62.0) and cal["best_std"] == pytest.approx(2 ** 0.5 * 2)
    assert cal["diff_vs_cal_mean"] is None and cal["n_pairs"] == 0
    assert tb["n_seeds"] == 3 and tb["final_mean"] == pytest.approx((61 + 66 + 30) / 3)
    assert tb["best_mean"] == pytest.approx((61 + 66 + 30) / 3)
    # paired: seed 1: 61 - 58 = 3, seed 2: 66 - 62 = 4
    assert tb["n_pairs"] == 2 and tb["diff_vs_cal_mean"] == pytest.approx(3.5)
    assert tb["diff_vs_cal_std"] == pytest.approx(np.std([3.0, 4.0], ddof=1))
    result = write_report(tmp_path, plots=False)
    assert "| s | tb | 3 | 52.33 ± 19.50 | 52.33 ± 19.50 | +3.50 ± 0.71 (n=2) |" in result["markdown"]
    assert "snr/seed1" in result["markdown"]  # listed as unfinished


def test_single_seed_has_no_std(tmp_path):
    fake_run(tmp_path, "s", "cal", 1, [40.0, 45.0])
    row = summarize(collect_runs(tmp_path))[0]
    assert row["final_std"] is None and row["final_mean"] == 45.0
    assert "| s | cal | 1 | 45.00 | 45.00 | — |" in write_report(tmp_path, plots=False)["markdown"]


def test_empty_directory_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no run directories"):
        write_report(tmp_path)


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


@pytest.mark.skipif(not hasattr(tempbalance, "TempBalance"), reason="tempbalance.TempBalance not built yet")
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


def test_runs_of_one_method_with_other_settings_are_separate_rows(tmp_path):
    for seed in (1, 2):
        fake_run(tmp_path, "s", "cal", seed, [60.0 + seed])
        fake_run(tmp_path / "narrow", "s", "tb", seed, [70.0 + seed])
        fake_run(tmp_path / "wide", "s", "tb", seed, [50.0 + seed])
    for path in (tmp_path / "narrow").rglob("config.json"):
        config = json.loads(path.read_text())
        path.write_text(json.dumps(dict(config, s1=0.8, s2=1.2)))
    rows = {row["method"]: row for row in summarize(collect_runs(tmp_path))}
    assert set(rows) == {"cal", "tb[s1=0.8,s2=1.2]", "tb[s1=0.5,s2=1.5]"}  # never one "tb" row averaging both
    assert rows["tb[s1=0.8,s2=1.2]"]["final_mean"] == pytest.approx(71.5)
    assert rows["tb[s1=0.5,s2=1.5]"]["diff_vs_cal_mean"] == pytest.approx(-10.0)
