"""Fixtures shared by the test files, and the registries every test leaves as it found them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tempbalance import assign, layers, norms, powerlaw
from tempbalance.train import methods
from tempbalance.train.data import loading as data_loading
from tempbalance.train.data import registry as data_registry
from tempbalance.train.models import registry as model_registry
from tests.helpers.runs import TB_RUN

# Every process-wide registry a test can add to (register_layer_type, register_norm_type(s),
# register_assign, register_metric, register_model, register_method, a data set or a fit).
REGISTRIES = {
    "layer types": layers._REGISTRY,
    "norm types": norms._REGISTRY,
    "assign functions": assign.ASSIGN_FUNCTIONS,
    "assign aliases": assign.ASSIGN_ALIASES,
    "metrics": assign.METRICS,
    "metric aliases": assign.METRIC_ALIASES,
    "fits": powerlaw.FIT_METHODS,
    "methods": methods.METHODS,
    "models": model_registry._FACTORIES,
    "data sets": data_registry.DATASETS,
    "data loaders": data_loading.LOADERS,
}


@pytest.fixture(autouse=True)
def _restore_registries():
    """Put every registry back as it was before the test (entries and their order)."""
    saved = {name: dict(registry) for name, registry in REGISTRIES.items()}
    yield
    for name, registry in REGISTRIES.items():
        if list(registry.items()) != list(saved[name].items()):
            registry.clear()
            registry.update(saved[name])


@pytest.fixture
def data_cache(tmp_path, monkeypatch):
    """Decoded data-set copies go to the test's own directory (``TEMPBALANCE_CACHE``)."""
    monkeypatch.setenv("TEMPBALANCE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    """Files the bad-input table refers to: a stopped run, damaged checkpoints, a wrong TinyImageNet."""
    from tempbalance.train import TrainConfig, run_training

    root = tmp_path_factory.mktemp("bad")
    run = root / "run"
    run_training(TrainConfig(**dict(TB_RUN, method="cal", epochs=2, stop_after=1, progress=False, out=str(run))))
    broken = root / "broken"
    broken.mkdir()
    shutil.copy(run / "config.json", broken / "config.json")
    (broken / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:200])  # truncated
    (broken / "checkpoint.prev.pt").write_bytes(b"\x00garbage")  # corrupted
    (root / "truncated.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:300])
    tiny = root / "tin" / "tiny-imagenet-200"
    (tiny / "train" / "n01443537" / "images").mkdir(parents=True)
    (tiny / "val" / "images").mkdir(parents=True)  # no val_annotations.txt, not arranged
    (root / "empty").mkdir()
    (root / "bad.toml").write_text('seeds = [1]\nmethods = ["cal"]\n[base]\ndataset = "mnist1d"\nlr = -2.0\n')
    (root / "unknown.toml").write_text('seeds = [1]\nmethods = ["adamw"]\n[base]\ndataset = "mnist1d"\n')
    return root
