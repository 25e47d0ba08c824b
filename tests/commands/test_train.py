"""``tempbalance train``: the flags come from TrainConfig's fields (every field has one, its help is the
docstring's line, the flag names of earlier releases still work, a field added later gets a flag
with nothing else to change), they reach the run, and a resume with no readable checkpoint is one
line."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

import pytest

import tempbalance.train
from tempbalance.cli import build_parser
from tempbalance.cli import main as cli_main
from tempbalance.commands.train import config_from_args, train_flags
from tempbalance.train import TrainConfig
from tests.helpers.cli import call_cli
from tests.helpers.runs import TB_RUN_ARGS


# Every flag name of the previous release (its OPTIONS and SWITCHES tables, typed again here).
OLD_OPTIONS = {
    "--dataset": "dataset", "--model": "model", "--method": "method", "--epochs": "epochs", "--lr": "lr",
    "--batch-size": "batch_size", "--weight-decay": "weight_decay", "--momentum": "momentum", "--seed": "seed",
    "--out": "out", "--data-dir": "data_dir", "--device": "device", "--train-fraction": "train_fraction",
    "--width": "width", "--s1": "s1", "--s2": "s2", "--assign": "assign", "--metric": "metric", "--fit": "fit",
    "--snr-coef": "snr_coef", "--amp": "amp", "--threads": "num_threads", "--eval-batch-size": "eval_batch_size",
    "--stop-after": "stop_after", "--tag": "tag",
}
OLD_SWITCHES = {
    "--resume": ("resume", True), "--download": ("download", True), "--compile": ("compile", True),
    "--tb-async": ("asynchronous", True), "--sync-bn": ("sync_bn", True), "--no-progress": ("progress", False),
    "--no-augment": ("augment", False), "--no-deterministic": ("deterministic", False),
}


def parse(argv: list[str]):
    return build_parser().parse_args(["train", *argv])


def _other_value(field: dataclasses.Field) -> tuple[str, object]:
    """A command-line text and the value it must give, different from the field's default."""
    kind = field.type
    if "int" in kind:
        return "7", 7
    if "float" in kind:
        return "0.375", 0.375
    return "something", "something"


def test_every_field_has_a_flag_that_sets_it():
    by_field = {flag.field: flag for flag in train_flags()}
    assert list(by_field) == list(TrainConfig.field_names())
    for field in dataclasses.fields(TrainConfig):
        flag = by_field[field.name]
        if field.type == "bool":
            positive, negative = flag.names[0], "--no-" + flag.names[0][2:]
            assert getattr(config_from_args(parse([positive])), field.name) is True
            assert getattr(config_from_args(parse([negative])), field.name) is False
        else:
            text, value = _other_value(field)
            assert getattr(config_from_args(parse([flag.names[0], text])), field.name) == value, field.name
    assert config_from_args(parse([])) == TrainConfig()  # unset flags keep the defaults


def test_the_flag_names_of_earlier_releases_still_work():
    for flag, field in OLD_OPTIONS.items():
        value = "3" if field in ("epochs", "batch_size", "seed", "num_threads", "eval_batch_size", "stop_after") else "x"
        if field in ("lr", "weight_decay", "momentum", "train_fraction", "width", "s1", "s2", "snr_coef"):
            value = "0.25"
        assert str(getattr(config_from_args(parse([flag, value])), field)) == value, flag
    for flag, (field, value) in OLD_SWITCHES.items():
        assert getattr(config_from_args(parse([flag])), field) is value, flag
    # the settings the old tables did not reach
    config = config_from_args(parse(["--sgdr-t0", "50", "--lars-trust", "0.002", "--lookahead-k", "5",
                                     "--lookahead-alpha", "0.5", "--snr-power-iterations", "3", "--num-threads", "2"]))
    assert (config.sgdr_t0, config.lars_trust, config.lookahead_k, config.lookahead_alpha,
            config.snr_power_iterations, config.num_threads) == (50, 0.002, 5, 0.5, 3, 2)


def test_help_comes_from_the_docstring_with_defaults_and_accepted_values(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "--lars-trust LARS_TRUST LARS trust coefficient, default 1e-3." in text
    assert "--sgdr-t0 SGDR_T0 restart period (epochs) of sgdr, default 100 (T_mult = 1)." in text
    assert "--threads THREADS, --num-threads THREADS torch CPU threads for the run (None = leave as is). (default: None)" in text
    assert "Accepted: cal, snr, tb, tb+snr" in text and "Accepted: median, ks, fix-finger" in text


def test_a_field_added_later_gets_a_flag_with_nothing_else_to_change(monkeypatch):
    @dataclass
    class Extended(TrainConfig):
        """A TrainConfig with the fields another change adds.

        Attributes:
            wd_s1, wd_s2: the lowest / highest weight-decay factor (balance="weight_decay").
            esd: write each epoch's eigenvalue spectra.
            balance: what is balanced.
            layers: names of the balanced layers.
        """

        wd_s1: float = 0.5
        wd_s2: float = 1.5
        esd: bool = False
        balance: str = "lr"
        layers: list = dataclasses.field(default_factory=list)
        undocumented: int | None = None

    monkeypatch.setattr(tempbalance.train, "TrainConfig", Extended)
    args = parse(["--wd-s1", "0.4", "--wd-s2", "1.6", "--esd", "--balance", "weight_decay",
                  "--layers", '["conv2", "conv3"]', "--undocumented", "4", "--lr", "0.3"])
    config = config_from_args(args)
    assert (config.wd_s1, config.wd_s2, config.esd, config.balance, config.layers, config.undocumented, config.lr) == (
        0.4, 1.6, True, "weight_decay", ["conv2", "conv3"], 4, 0.3)
    helps = {flag.field: flag.help for flag in train_flags()}
    assert helps["wd_s2"].startswith("the lowest / highest weight-decay factor") and "(default: 1.5)" in helps["wd_s2"]
    assert helps["undocumented"] == "see tempbalance.train.TrainConfig (default: None)"


def test_cli_train_prints_summary_line(tmp_path, capsys):
    argv = [
        "train", "--dataset", "mnist1d", "--model", "cnn1d", "--epochs", "1", "--width", "0.5",
        "--train-fraction", "0.1", "--device", "cpu", "--threads", "1", "--no-progress", "--out", str(tmp_path / "r"),
    ]
    assert cli_main(argv) == 0
    assert capsys.readouterr().out.startswith("finished: cal on mnist1d/cnn1d seed 43, 1/1 epochs")


def test_cli_flags_reach_the_run(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "train", "--dataset", "mnist1d", "--model", "cnn1d", "--method", "tb+alphadecay", "--epochs", "1",
        "--width", "0.5", "--train-fraction", "0.1", "--device", "cpu", "--threads", "1", "--no-progress",
        "--batch-size", "64", "--seed", "5", "--out", str(out), "--wd-s1", "0.3", "--wd-s2", "1.7",
        "--normalize", "mean", "--norm-follows", "name", "--asynchronous",
    ]
    assert cli_main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["wd_s1"], config["wd_s2"], config["normalize"], config["norm_follows"], config["asynchronous"]) == (
        0.3, 1.7, "mean", "name", True)
    assert cli_main(["train", "--method", "tb", "--normalize", "median", "--dataset", "mnist1d"]) == 2
    assert "unknown normalize 'median'" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_with_no_readable_checkpoint_is_one_line(bad_inputs, capsys, caplog):
    argv = ["train", *TB_RUN_ARGS, "--method", "cal", "--out", bad_inputs / "broken", "--resume"]
    code, err, _ = call_cli(argv, capsys, caplog)
    assert code == 2
    assert len(err) == 1, err


@pytest.mark.slow
def test_resume_with_no_readable_checkpoint_exits_2_naming_both_files(bad_inputs, capsys, caplog):
    argv = ["train", *TB_RUN_ARGS, "--method", "cal", "--out", bad_inputs / "broken", "--resume"]
    code, err, _ = call_cli(argv, capsys, caplog)
    assert code == 2
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and "checkpoint.pt" in errors[0] and "checkpoint.prev.pt" in errors[0]
    assert not any("Traceback" in line for line in err)
