"""Fixtures of the training harness's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tempbalance.train import run_training
from tests.helpers.runs import tiny


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run to compare resumed ones with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_training(tiny(out))
    return out
