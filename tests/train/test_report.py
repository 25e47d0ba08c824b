"""Tests of the report: numbers against hand-made runs (an independent numpy computation), runs of one
method with other settings kept apart, and damaged and unfinished run directories: unfinished runs
stay out of the plots as out of the tables, a malformed file skips only its run with one warning
naming the file, nulls read back, and the files are written atomically."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from tempbalance import plots
from tempbalance.atomic import WriteError, temporaries
from tempbalance.errors import ConfigError
from tempbalance.train import run_training
from tempbalance.train.report import collect_runs, method_label, summarize, write_report
from tests.helpers.faults import fill_disk_after
from tests.helpers.runs import tiny


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


def test_a_setting_saved_under_its_old_name_is_the_same_setting(tmp_path):
    for seed in (1, 2):
        fake_run(tmp_path, "s", "tb", seed, [70.0 + seed])
    for path in tmp_path.rglob("config.json"):
        config = json.loads(path.read_text())
        renamed = {"tb_async": True} if config["seed"] == 1 else {"asynchronous": True}  # tb_async before the rename
        path.write_text(json.dumps(dict(config, **renamed)))
    rows = {row["method"]: row for row in summarize(collect_runs(tmp_path))}
    assert set(rows) == {"tb"} and rows["tb"]["n_seeds"] == 2


# ---------------------------------------------------------------- damaged and unfinished runs


def fake_run_with_nulls(root: Path, method: str, seed: int, accs: list[float], finished: bool = True, setting: str = "s") -> Path:
    """A run directory as run_training leaves it (the fields the report reads)."""
    directory = root / setting / method / f"seed{seed}"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"method": method, "seed": seed, "tag": setting}))
    rows = [{"epoch": i + 1, "lr": 0.1, "test_acc": acc, "test_loss": None, "alpha": {"l1": 2.0 + i, "l2": None},
             "layer_lr": {"l1": 0.1, "l2": 0.1}} for i, acc in enumerate(accs)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (directory / "summary.json").write_text(json.dumps({"status": "finished", "epochs_done": len(accs)}))
    return directory


def test_unfinished_runs_are_left_out_of_the_plots_too(tmp_path, monkeypatch):
    fake_run_with_nulls(tmp_path, "cal", 1, [50.0, 60.0, 70.0])
    fake_run_with_nulls(tmp_path, "cal", 2, [52.0, 62.0, 72.0])
    fake_run_with_nulls(tmp_path, "cal", 3, [10.0], finished=False)  # killed after epoch 1
    drawn = {}
    monkeypatch.setattr(plots, "plot_curves", lambda series, path, **kw: drawn.update(series))
    result = write_report(tmp_path)
    assert "| s | cal | 2 |" in result["markdown"]
    assert list(drawn) == ["cal (n=2)"]  # the table's n, not 3
    epochs, means, _ = drawn["cal (n=2)"]
    assert epochs == [1, 2, 3] and means == pytest.approx([51.0, 61.0, 71.0])  # full curves, not cut to 1 point
    assert "Unfinished runs (not in the table or the plots): 1" in result["markdown"] and "cal/seed3" in result["markdown"]


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda d: (d / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 50.0}\n{"epoch": 2, "test_a\n'),
         "metrics.jsonl:2: not valid JSON"),
        (lambda d: (d / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 50.0}\n{"epoch": 2}\n'),
         "metrics.jsonl:2: no number in test_acc"),
        (lambda d: (d / "summary.json").write_text("{not json"), "summary.json is not valid JSON"),
        (lambda d: (d / "metrics.jsonl").write_text(""), "metrics.jsonl has no rows although the run finished"),
        (lambda d: (d / "config.json").write_text("{"), "config.json is not valid JSON"),
    ],
    ids=["bad-line", "missing-key", "bad-summary", "empty-metrics", "bad-config"],
)
def test_a_malformed_file_skips_its_run_with_one_warning_naming_the_file(damage, fragment, tmp_path, caplog):
    fake_run_with_nulls(tmp_path, "cal", 1, [50.0, 60.0])
    fake_run_with_nulls(tmp_path, "tb", 1, [51.0, 62.0])
    broken = fake_run_with_nulls(tmp_path, "tb", 2, [55.0, 65.0])
    damage(broken)
    with caplog.at_level(logging.WARNING):
        result = write_report(tmp_path, plots=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(broken) in warnings[0] and fragment in warnings[0], warnings
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["tb"]["n_seeds"] == 1 and rows["tb"]["final_mean"] == 62.0  # the others are still reported
    assert result["unusable"] == [str(broken)]
    assert "Runs left out because their files cannot be used: 1" in result["markdown"]
    assert f"- {broken}: " in result["markdown"] and fragment in result["markdown"]


def test_nulls_in_metrics_read_back_as_missing_values(tmp_path):
    fake_run_with_nulls(tmp_path, "tb", 1, [50.0, 60.0])  # test_loss null, one layer's alpha null
    result = write_report(tmp_path)
    assert "| s | tb | 1 | 60.00 | 60.00 | — |" in result["markdown"]
    assert any(path.endswith("s_tb_seed1_alpha.png") for path in result["files"])
    assert summarize(collect_runs(tmp_path))[0]["final_mean"] == 60.0


def test_report_files_are_written_atomically(tmp_path, monkeypatch):
    fake_run_with_nulls(tmp_path, "cal", 1, [50.0, 60.0])
    write_report(tmp_path, plots=False)
    before = (tmp_path / "report.md").read_text()
    fake_run_with_nulls(tmp_path, "cal", 2, [52.0, 62.0])
    fill_disk_after(monkeypatch, room=0)
    with pytest.raises(WriteError, match=rf"cannot write {tmp_path / 'report.md'}: no space left"):
        write_report(tmp_path, plots=False)
    monkeypatch.undo()
    assert (tmp_path / "report.md").read_text() == before  # the previous report, not a 0-byte file
    assert temporaries(tmp_path / "report.md") == []


# ---------------------------------------------------------------- AlphaDecay and FARMS runs


def test_report_draws_weight_decay_heat_maps(tmp_path):
    pytest.importorskip("matplotlib")
    run_training(tiny(tmp_path / "runs" / "ad", method="alphadecay", epochs=2, tag="s"))
    run_training(tiny(tmp_path / "runs" / "tb", method="tb", epochs=2, tag="s"))
    files = [f for f in write_report(tmp_path / "runs")["files"] if f.endswith(".png")]
    assert any(f.endswith("_alphadecay_seed5_wd.png") for f in files)
    assert any(f.endswith("_alphadecay_seed5_wd_factor.png") for f in files)
    assert not any("_tb_seed5_wd" in f for f in files)  # the rate-only run has no weight-decay map


def test_report_tells_tb_from_tb_farms(tmp_path):
    runs = [("cal", "full", (60.0, 62.0)), ("tb", "full", (59.0, 60.0)), ("tb", "farms", (61.0, 65.0)),
            ("cal", "farms", (60.0, 62.0))]
    for method, esd, accs in runs:
        for seed, acc in enumerate(accs):
            directory = tmp_path / f"{method}-{esd}" / f"seed{seed}"
            directory.mkdir(parents=True)
            config = {"dataset": "d", "model": "m", "method": method, "esd": esd, "seed": seed, "tag": "s"}
            (directory / "config.json").write_text(json.dumps(config))
            (directory / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "lr": 0.1, "test_acc": acc}) + "\n")
            (directory / "summary.json").write_text(json.dumps({"status": "finished", "epochs_done": 1}))
    rows = {row["method"]: row for row in summarize(collect_runs(tmp_path))}
    assert set(rows) == {"cal", "tb", "tb[esd=farms]"}  # CAL does not measure: its esd is no label
    assert rows["tb[esd=farms]"]["diff_vs_cal_mean"] == pytest.approx(2.0)  # (61 - 60 + 65 - 62) / 2
    assert rows["tb"]["diff_vs_cal_mean"] == pytest.approx(-1.5)
    assert method_label({"method": "tb+snr", "esd": "farms"}) == "tb+snr[esd=farms]"
    assert method_label({"method": "tb"}) == "tb"  # config.json written before the field existed
