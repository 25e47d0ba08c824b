"""Sweeps name what they train and count a run as done only when it really is (issue #17): keys the
sweep varies cannot be overridden, stale runs are listed and retrained on request, a summary that
disagrees with the metrics and the checkpoint does not make a run done, inputs are checked once
before any run, and failures name their setting."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tempbalance.cli import main as cli_main
from tempbalance.errors import ConfigError
from tempbalance.train import run_training
from tempbalance.train.checkpoint import load_checkpoint
from tempbalance.train.metrics import read_metrics
from tempbalance.train.rundir import inspect_run
from tempbalance.train.sweep import expand_sweep, run_status, run_sweep

BASE = {
    "dataset": "mnist1d", "model": "cnn1d", "width": 0.5, "train_fraction": 0.1, "epochs": 2, "batch_size": 64,
    "device": "cpu", "progress": False, "num_threads": 1,
}


def spec(**base) -> dict:
    return {"name": "t", "seeds": [3], "methods": ["cal"], "base": dict(BASE, **base)}


def cli(argv, capsys) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out


@pytest.mark.parametrize(
    "override, fragment",
    [
        ('method="tb"', "cannot override 'method'"),
        ("seed=1", "--set seeds=[...] chooses the seeds"),
        ("tag=x", "cannot override 'tag'"),
        ("overwrite=true", "--rerun-stale retrains"),
    ],
)
def test_keys_the_sweep_varies_cannot_be_overridden(override, fragment, tmp_path, capsys):
    sweep = tmp_path / "s.json"
    sweep.write_text(json.dumps(spec()))
    code, err, _ = cli(["sweep", sweep, "--set", override, "--dry-run"], capsys)
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    with pytest.raises(ConfigError, match="cannot override"):
        expand_sweep(spec(), [override], out=tmp_path)


def test_a_run_with_other_recorded_settings_is_stale_until_retrained(tmp_path, capsys):
    sweep = tmp_path / "s.json"
    sweep.write_text(json.dumps(spec()))
    root = tmp_path / "runs"
    assert cli(["sweep", sweep, "--out", root, "--set", "epochs=1"], capsys)[0] == 0
    code, _, out = cli(["sweep", sweep, "--out", root, "--dry-run"], capsys)  # the file's 2 epochs now
    assert code == 0 and out.splitlines()[1].split()[0] == "stale" and out.splitlines()[-1] == "1 runs (1 stale)"
    code, _, out = cli(["sweep", sweep, "--out", root], capsys)
    assert code == 1 and "0/1 runs finished, 0 failed, 1 stale" in out and "epochs: 1 -> 2" in out
    assert json.loads((root / "default" / "cal" / "seed3" / "summary.json").read_text())["epochs_done"] == 1
    code, _, out = cli(["sweep", sweep, "--out", root, "--rerun-stale"], capsys)
    assert code == 0 and "1/1 runs finished, 0 failed" in out
    assert json.loads((root / "default" / "cal" / "seed3" / "summary.json").read_text())["epochs_done"] == 2
    assert cli(["sweep", sweep, "--out", root, "--dry-run"], capsys)[2].splitlines()[1].split()[0] == "done"


def test_a_summary_that_disagrees_with_the_checkpoint_does_not_make_a_run_done(tmp_path):
    """As a slow second process left it: summary.json of 3 epochs, metrics and checkpoint at epoch 2."""
    runs = expand_sweep(spec(epochs=3), out=tmp_path / "runs")
    (run,) = runs
    run_training(run.config)
    finished_summary = (run.out / "summary.json").read_bytes()
    straight = tmp_path / "straight"
    shutil.copytree(run.out, straight)
    partial = tmp_path / "partial"
    run_training(dict(run.config.to_dict(), out=str(partial), resume=False, stop_after=2))
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "metrics.csv"):
        shutil.copy(partial / name, run.out / name)
    assert (run.out / "summary.json").read_bytes() == finished_summary
    files = inspect_run(run.out)
    assert not files.finished and "summary.json says 3 epochs, metrics.jsonl ends at epoch 2" in files.disagreement()
    assert run_status(run) == "partial"
    (summary,) = run_sweep(runs)  # resumes from the epoch-2 checkpoint
    assert summary["status"] == "finished" and inspect_run(run.out).finished
    a, b = load_checkpoint(run.out), load_checkpoint(straight)
    assert a["epoch"] == b["epoch"] == 3 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time"} for r in rows]  # noqa: E731
    assert strip(read_metrics(run.out)) == strip(read_metrics(straight))


def test_runs_all_missing_their_data_dir_are_reported_once_before_any_run(tmp_path, capsys, caplog):
    sweep = tmp_path / "s.json"
    sweep.write_text(json.dumps(dict(spec(dataset="cifar10", model="cnn-digits"), seeds=[1, 2, 3])))
    code, err, _ = cli(["sweep", sweep, "--out", tmp_path / "runs"], capsys)
    assert code == 2 and len(err) == 1, err
    assert "cifar10 needs a data directory: pass --set data_dir=DIR" in err[0] and "every run of the sweep" in err[0]
    assert not (tmp_path / "runs").exists()  # no run was started
    assert "starting" not in caplog.text


def test_the_end_of_sweep_failure_line_names_the_setting(tmp_path, capsys):
    sweep = tmp_path / "s.json"
    sweep.write_text(json.dumps(dict(spec(), settings=[{"name": "diverges", "lr": 1e30}, {"name": "fine"}])))
    code, _, out = cli(["sweep", sweep, "--out", tmp_path / "runs"], capsys)
    assert code == 1 and "1/2 runs finished, 1 failed" in out
    line = next(line for line in out.splitlines() if line.strip().startswith("failed:"))
    assert line.strip().startswith("failed: diverges cal seed 3 (") and "diverges/cal/seed3" in line
    assert "training diverged in epoch 1" in line and "--set lr=1e+30" in line


def test_a_run_another_process_holds_is_running_and_left_to_it(tmp_path):
    from tempbalance.train.runlock import RunLock

    (run,) = expand_sweep(spec(), out=tmp_path / "runs")
    with RunLock(run.out):  # as another process training it would hold it
        assert run_status(run) == "running"
        (summary,) = run_sweep([run])
    assert summary["status"] == "skipped" and "trained by another process (pid" in summary["reason"]
    assert not (run.out / "config.json").exists()  # nothing was written under the other process's lock
    assert run_status(run) == "new"
