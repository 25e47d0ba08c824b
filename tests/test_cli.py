"""The ``tempbalance`` entry point: bad input on any command is one line and exit status 2 (with
``--debug`` the traceback), and output piped into a reader that goes away ends quietly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tempbalance.cli import main as cli_main
from tempbalance.errors import ConfigError
from tests.helpers.cli import call_cli
from tests.helpers.paths import SRC
from tests.helpers.processes import ONE_THREAD_ENV
from tests.helpers.runs import TB_RUN_ARGS


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


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--dataset", "nope", "--out", "X"], "unknown dataset 'nope'"),
        (["train", "--dataset", "mnist1d", "--method", "adam", "--out", "X"], "unknown method 'adam'"),
        (["train", "--dataset", "mnist1d", "--lr", "-1", "--out", "X"], "lr=-1.0"),
        (["train", "--dataset", "mnist1d", "--s1", "2", "--s2", "1", "--out", "X"], "s1=2.0 > s2=1.0"),
        (["train", "--dataset", "mnist1d", "--epochs", "0", "--out", "X"], "epochs=0"),
        (["train", "--dataset", "cifar10", "--data-dir", "/no/such/dir", "--out", "X"], "/no/such/dir"),
        (["sweep", "/no/such/sweep.toml"], "does not exist"),
        (["report", "/no/such/runs"], "does not exist"),
        (["demo", "--seeds", "9"], "seeds=9"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tempbalance: error:") and words in err[0], err


# (argv with {d} = the fixture's directory, a fragment the one error line must contain)
BAD_CLI = [
    (["train", "--dataset", "imagenet-22k"], "'imagenet-22k'"),
    (["train", "--dataset", "mnist1d", "--model", "resnet9000"], "'resnet9000'"),
    (["train", "--dataset", "mnist1d", "--method", "adamw"], "'adamw'"),
    (["train", "--dataset", "mnist1d", "--method", "tb", "--fit", "mle"], "'mle'"),
    (["train", "--dataset", "mnist1d", "--method", "tb", "--metric", "beta"], "'beta'"),
    (["train", "--dataset", "mnist1d", "--lr", "0"], "lr=0.0"),
    (["train", "--dataset", "mnist1d", "--lr", "-0.1"], "lr=-0.1"),
    (["train", "--dataset", "mnist1d", "--lr", "nan"], "lr=nan"),
    (["train", "--dataset", "mnist1d", "--s1", "1.4", "--s2", "0.6"], "s1=1.4 > s2=0.6"),
    (["train", "--dataset", "mnist1d", "--epochs", "0"], "epochs=0"),
    (["train", "--dataset", "mnist1d", "--batch-size", "-4"], "batch_size=-4"),
    (["train", "--dataset", "mnist1d", "--train-fraction", "1.5"], "train_fraction=1.5"),
    (["train", "--dataset", "mnist1d", "--stop-after", "0"], "stop_after=0"),
    (["train", "--dataset", "mnist1d", "--device", "tpu"], "'tpu'"),
    (["train", "--dataset", "mnist1d", "--amp", "fp8"], "'fp8'"),
    (["train", "--dataset", "mnist1d", "--resume"], "resume"),
    (["train", "--dataset", "mnist1d", "--epochs", "ten"], "'ten'"),  # argparse
    (["train", "--dataset", "mnist1d", "--learning-rate", "0.1"], "--learning-rate"),  # argparse
    (["frobnicate"], "'frobnicate'"),  # argparse
    (["train", "--dataset", "cifar10", "--data-dir", "{d}/no-such-dir"], "no-such-dir"),
    (["train", "--dataset", "tinyimagenet", "--data-dir", "{d}/empty"], "tiny-imagenet-200"),
    (["train", "--dataset", "tinyimagenet", "--data-dir", "{d}/tin"], "val/images/"),
    (["data", "tinyimagenet", "--data-dir", "{d}/tin"], "val_annotations.txt"),
    (["data", "prepare", "mnist2d"], "'mnist2d'"),
    (["train", *TB_RUN_ARGS, "--model", "mlp", "--out", "{d}/run", "--resume"], "model: 'cnn1d' -> 'mlp'"),
    (["train", *TB_RUN_ARGS, "--method", "cal", "--out", "{d}/run"], "--resume"),
    (["analyze", "{d}/run/checkpoint.pt", "--arch", "resnet18"], "does not fit --arch 'resnet18'"),
    (["analyze", "{d}/truncated.pt"], "truncated.pt"),
    (["analyze", "{d}/missing.pt"], "missing.pt"),
    (["analyze", "not-an-architecture"], "'not-an-architecture'"),
    (["analyze", "cnn-digits", "--xmin-pos", "0"], "xmin_pos=0.0"),
    (["analyze", "cnn-digits", "--fit", "mle"], "'mle'"),  # argparse choices
    (["report", "{d}/no-such-runs"], "no-such-runs"),
    (["report", "{d}/empty"], "empty"),
    (["sweep", "{d}/no-such.toml"], "no-such.toml"),
    (["sweep", "{d}/bad.toml", "--dry-run"], "lr=-2.0"),
    (["sweep", "{d}/unknown.toml", "--dry-run"], "'adamw'"),
    (["sweep", "{d}/bad.toml", "--set", "epochs"], "'epochs'"),
    (["demo", "--seeds", "0"], "seeds=0"),
    (["demo", "--lr", "-1"], "lr=-1.0"),
]


def _case_id(index: int, case) -> str:
    argv = case.values[0] if hasattr(case, "values") else case[0]
    return f"{index}-" + "-".join(a.replace("{d}/", "") for a in argv[:4] if not a.startswith("--dataset"))


@pytest.mark.slow
@pytest.mark.parametrize("argv, fragment", BAD_CLI, ids=[_case_id(i, c) for i, c in enumerate(BAD_CLI)])
def test_bad_cli_input_is_one_line_exit_2(argv, fragment, bad_inputs, capsys, caplog, monkeypatch):
    monkeypatch.chdir(bad_inputs)
    code, err, _ = call_cli([a.replace("{d}", str(bad_inputs)) for a in argv], capsys, caplog)
    assert code == 2, err
    assert len(err) == 1, err
    assert "error" in err[0] and fragment in err[0], err
    assert "Traceback" not in err[0]


@pytest.mark.slow
def test_debug_shows_the_traceback_and_without_it_one_line(bad_inputs, capsys):
    """As real processes: exit status 2 and one line; with --debug the traceback."""
    with pytest.raises(ConfigError, match="imagenet-22k"):
        cli_main(["--debug", "train", "--dataset", "imagenet-22k"])
    base = [sys.executable, "-m", "tempbalance.cli"]
    argv = ["train", "--dataset", "mnist1d", "--lr", "-3"]
    pipes = dict(env=ONE_THREAD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    plain = subprocess.Popen([*base, *argv], **pipes)
    debug = subprocess.Popen([*base, "--debug", *argv], **pipes)
    _, plain_err = plain.communicate(timeout=120)
    _, debug_err = debug.communicate(timeout=120)
    assert plain.returncode == 2
    assert plain_err.strip().splitlines() == ["tempbalance: error: lr=-3.0 must be a finite number > 0"]
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug_err and "ConfigError" in debug_err and "lr=-3.0" in debug_err
