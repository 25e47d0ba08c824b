"""The report on damaged and unfinished run directories (issue #17): unfinished runs stay out of the
plots as out of the tables, a malformed file skips only its run with one warning naming the file,
a finished run whose metrics cannot be read is listed, nulls read back, and the files are
written atomically."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from _faults import fill_disk_after
from tempbalance import plots
from tempbalance.atomic import WriteError, temporaries
from tempbalance.train.report import collect_runs, summarize, write_report


def fake_run(root: Path, method: str, seed: int, accs: list[float], finished: bool = True, setting: str = "s") -> Path:
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
    fake_run(tmp_path, "cal", 1, [50.0, 60.0, 70.0])
    fake_run(tmp_path, "cal", 2, [52.0, 62.0, 72.0])
    fake_run(tmp_path, "cal", 3, [10.0], finished=False)  # killed after epoch 1
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
    fake_run(tmp_path, "cal", 1, [50.0, 60.0])
    fake_run(tmp_path, "tb", 1, [51.0, 62.0])
    broken = fake_run(tmp_path, "tb", 2, [55.0, 65.0])
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
    fake_run(tmp_path, "tb", 1, [50.0, 60.0])  # test_loss null, one layer's alpha null
    result = write_report(tmp_path)
    assert "| s | tb | 1 | 60.00 | 60.00 | — |" in result["markdown"]
    assert any(path.endswith("s_tb_seed1_alpha.png") for path in result["files"])
    assert summarize(collect_runs(tmp_path))[0]["final_mean"] == 60.0


def test_report_files_are_written_atomically(tmp_path, monkeypatch):
    fake_run(tmp_path, "cal", 1, [50.0, 60.0])
    write_report(tmp_path, plots=False)
    before = (tmp_path / "report.md").read_text()
    fake_run(tmp_path, "cal", 2, [52.0, 62.0])
    fill_disk_after(monkeypatch, room=0)
    with pytest.raises(WriteError, match=rf"cannot write {tmp_path / 'report.md'}: no space left"):
        write_report(tmp_path, plots=False)
    monkeypatch.undo()
    assert (tmp_path / "report.md").read_text() == before  # the previous report, not a 0-byte file
    assert temporaries(tmp_path / "report.md") == []
