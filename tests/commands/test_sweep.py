"""``tempbalance sweep``: the dry run, a failing run that does not stop the sweep, keys the sweep
varies that cannot be overridden, stale runs listed and retrained on request, inputs checked once
before any run, and failure lines that name their setting."""

from __future__ import annotations

import json

import pytest

from tempbalance.cli import main as cli_main
from tempbalance.errors import ConfigError
from tempbalance.train.sweep import expand_sweep
from tests.helpers.cli import cli
from tests.helpers.paths import PAPER
from tests.helpers.sweeps import spec


def test_cli_dry_run_lists_runs(capsys):
    assert cli_main(["sweep", str(PAPER / "cifar10.toml"), "--dry-run", "--set", "epochs=2", "--out", "/tmp/x"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "40 runs"
    assert out[1].split()[:4] == ["new", "resnet18", "cal", "43"] and "/tmp/x/resnet18/cal/seed43" in out[1]
    assert " 2 " in out[1]


def test_a_failing_run_does_not_stop_the_sweep(tmp_path, capsys):
    sweep_file = tmp_path / "s.json"
    sweep_file.write_text(json.dumps({
        "seeds": [3],
        "base": {
            "dataset": "mnist1d", "model": "cnn1d", "width": 0.5, "train_fraction": 0.1, "epochs": 1,
            "batch_size": 64, "device": "cpu", "progress": False, "num_threads": 1,
        },
        "settings": [{"name": "diverges", "lr": 1e30}, {"name": "fine", "lr": 0.1}],
    }))
    assert cli_main(["sweep", str(sweep_file), "--out", str(tmp_path / "runs")]) == 1
    out = capsys.readouterr().out
    assert "1/2 runs finished, 1 failed" in out and "diverged" in out
    assert (tmp_path / "runs" / "fine" / "cal" / "seed3" / "summary.json").exists()


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
