"""A one-run sweep on the tiny training setting."""

from __future__ import annotations

BASE = {
    "dataset": "mnist1d", "model": "cnn1d", "width": 0.5, "train_fraction": 0.1, "epochs": 2, "batch_size": 64,
    "device": "cpu", "progress": False, "num_threads": 1,
}


def spec(**base) -> dict:
    return {"name": "t", "seeds": [3], "methods": ["cal"], "base": dict(BASE, **base)}
