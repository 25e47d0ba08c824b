"""``TrainConfig`` validation: every bad setting named with what is accepted, before any work; the
errors in the Python API's own words; ``ConfigError`` the harness's one validation error."""

from __future__ import annotations

import ast

import pytest

from tempbalance.errors import ConfigError
from tempbalance.train import TrainConfig, run_training
from tests.helpers.paths import PACKAGE
from tests.helpers.runs import TB_RUN, TINY, tiny


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"dataset": "imagenet-22k"}, r"unknown dataset 'imagenet-22k'.*accepted:.*mnist1d"),
        ({"model": "resnet9000"}, r"unknown model 'resnet9000'.*accepted:.*cnn1d"),
        ({"method": "adamw"}, r"unknown method 'adamw'.*accepted:.*tb\+snr"),
        ({"lr": 0.0}, r"lr=0.0 must be a finite number > 0"),
        ({"lr": float("nan")}, r"lr=nan"),
        ({"s1": 1.5, "s2": 0.5}, r"s1=1.5 > s2=0.5"),
        ({"epochs": 0}, r"epochs=0 must be an integer >= 1"),
        ({"train_fraction": 1.5}, r"train_fraction=1.5"),
        ({"fit": "mle"}, r"unknown fit 'mle'.*median"),
        ({"metric": "beta"}, r"unknown metric 'beta'.*alphahat"),
        ({"device": "tpu"}, r"unknown device 'tpu'"),
    ],
)
def test_bad_settings_are_named(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny(None, **overrides).validate()


def test_missing_data_dir_and_unknown_keys(tmp_path):
    with pytest.raises(ConfigError, match="nowhere"):
        tiny(None, data_dir=str(tmp_path / "nowhere")).validate()
    with pytest.raises(ConfigError, match=r"unknown training setting\(s\) \['learning_rate'\].*accepted:.*lr"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_default_model_comes_from_the_dataset():
    assert TrainConfig(dataset="mnist1d").validate().model == "cnn1d"


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"method": "cal", "assign": "nope"}, id="unknown-assign"),
        pytest.param({"method": "tb", "s1": 0.0}, id="s1-zero"),
        pytest.param({"seed": "seven"}, id="seed-not-int"),
    ],
)
def test_train_config_rejects_before_any_work(overrides):
    with pytest.raises(ConfigError):
        TrainConfig(**dict(TB_RUN, **overrides)).validate()


def test_python_api_errors_name_python_settings(tmp_path):
    """The same errors say resume=True / data_dir=DIR from Python, --resume / --data-dir DIR from the CLI."""
    with pytest.raises(ConfigError, match=r"cifar10 needs a data directory: pass data_dir=DIR \(with download=True"):
        run_training(dict(TINY, dataset="cifar10", model="cnn1d"))
    with pytest.raises(ConfigError, match=r"resume=True needs an output directory \(out=DIR\)"):
        TrainConfig(**dict(TINY, resume=True)).validate()
    out = tmp_path / "x"
    run_training(tiny(out, epochs=1))
    with pytest.raises(ConfigError, match="pass resume=True to continue it or overwrite=True") as caught:
        run_training(tiny(out, epochs=1))
    assert "--" not in str(caught.value)


# The harness's own validation (the model registry and the analyze command are other modules').
HARNESS = [p for p in (PACKAGE / "train").rglob("*.py") if "models" not in p.parts] + [
    p for p in (PACKAGE / "commands").glob("*.py") if p.name != "analyze.py"
]


@pytest.mark.parametrize("path", HARNESS, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_harness_validates_with_config_error_only(path):
    """No ValueError / TypeError / FileNotFoundError / KeyError raised for bad input: ConfigError
    (a ValueError, so callers catching ValueError still do) is the one type."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
            assert node.exc.func.id not in ("ValueError", "TypeError", "FileNotFoundError", "KeyError"), (
                f"{path.name}:{node.lineno} raises {node.exc.func.id}"
            )
