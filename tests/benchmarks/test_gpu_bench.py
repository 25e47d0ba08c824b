"""benchmarks/gpu_bench.py on the CPU: gpu.sh's sizes fill every batch, the number of graphs
``torch.compile`` builds at gpu.sh's settings, and a bench run that leaves torch and the loop as
they were."""

from __future__ import annotations

import importlib
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.paths import REPO

BENCHMARKS = REPO / "benchmarks"
_REAL_COMPILE = torch.compile


@pytest.fixture(scope="module")
def gpu_bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("gpu_bench")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_gpu_sh_sizes_fill_every_batch(gpu_bench):
    """The data gpu.sh trains on splits into full batches, train and eval (no ragged recompile)."""
    assert (10 * gpu_bench.TAR_TRAIN_PER_CLASS) % gpu_bench.TRAIN_BATCH == 0
    assert (10 * gpu_bench.TAR_TEST_PER_CLASS) % gpu_bench.EVAL_BATCH == 0
    assert gpu_bench.SYNTHETIC_TRAIN % gpu_bench.TRAIN_BATCH == 0 and gpu_bench.SYNTHETIC_TRAIN % 5 == 0
    assert gpu_bench.SYNTHETIC_TEST % gpu_bench.EVAL_BATCH == 0


def _pickle_cifar(folder: Path, n_train: int, n_test: int) -> Path:
    rng = np.random.default_rng(0)
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True)
    sizes = [n_train // 5 + (i < n_train % 5) for i in range(5)] + [n_test]
    for i, n in enumerate(sizes):
        name = f"data_batch_{i + 1}" if i < 5 else "test_batch"
        with open(root / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).tolist()}, f)
    return folder


def _graphs_built(monkeypatch, data_dir: Path, out: Path, batch: int, eval_batch: int) -> list[tuple]:
    """Train 2 epochs with torch.compile patched to an eager backend that records each graph built."""
    from tempbalance.train import TrainConfig, run_training

    graphs: list[tuple] = []

    def recording(gm, example_inputs):
        graphs.append(tuple(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 4))
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: _REAL_COMPILE(model, backend=recording))
    torch._dynamo.reset()
    run_training(TrainConfig(dataset="cifar10", model="resnet18", width=0.0625, method="tb", epochs=2,
                             batch_size=batch, eval_batch_size=eval_batch, data_dir=str(data_dir), out=str(out),
                             progress=False, compile=True, seed=1))
    torch._dynamo.reset()
    return graphs


@pytest.mark.slow
def test_compile_builds_two_graphs_at_gpu_sh_settings(gpu_bench, monkeypatch, tmp_path):
    batch, eval_batch = gpu_bench.TRAIN_BATCH, gpu_bench.EVAL_BATCH
    full = _pickle_cifar(tmp_path / "full", 5 * batch, eval_batch)
    assert len(_graphs_built(monkeypatch, full, tmp_path / "run_full", batch, eval_batch)) == 2  # train, eval
    ragged = _pickle_cifar(tmp_path / "ragged", 5 * batch + 5, eval_batch + 3)
    assert len(_graphs_built(monkeypatch, ragged, tmp_path / "run_ragged", batch, eval_batch)) > 2


@pytest.mark.slow
def test_bench_train_reports_the_graphs_it_compiled(gpu_bench, tmp_path):
    data = _pickle_cifar(tmp_path / "data", 160, 100)
    md = tmp_path / "results.md"
    torch._dynamo.reset()
    gpu_bench.main(["--md", str(md), "train", "--method", "cal", "--epochs", "2", "--width", "0.0625", "--batch", "32",
                    "--eval-batch", "50", "--data-dir", str(data), "--out", str(tmp_path / "run"),
                    "--json", str(tmp_path / "run.json"), "--compile", "--compile-backend", "eager", "--row",
                    "--started", str(time.time())])
    torch._dynamo.reset()
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["graphs"] == 2 and summary["n_train"] == 160 and len(summary["epoch_times"]) == 2
    # the planning numbers: one more epoch costs a steady epoch plus a checkpoint; the rest is fixed
    assert summary["per_epoch_s"] == pytest.approx(summary["steady_epoch_s"] + summary["checkpoint_s"])
    assert 0 < summary["fixed_s"] < summary["wall_s"]
    assert summary["fixed_s"] == pytest.approx(summary["wall_s"] - 2 * summary["per_epoch_s"])
    row = md.read_text().strip().splitlines()[-1]
    assert row.startswith("| cal (torch.compile) | 32 / 50 | 160 |") and "2 graphs (eager)" in row


def test_bench_train_leaves_torch_and_the_loop_as_they_were(gpu_bench, tmp_path):
    from tempbalance.train import loop

    before = torch.compile, loop.save_checkpoint
    with pytest.raises(Exception):
        gpu_bench.main(["train", "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "run"),
                        "--json", str(tmp_path / "run.json"), "--compile", "--compile-backend", "eager"])
    assert (torch.compile, loop.save_checkpoint) == before


def test_llama_step_reports_a_cut_analysis_as_a_missed_goal(gpu_bench, tmp_path):
    md = tmp_path / "results.md"
    assert gpu_bench.main(["--md", str(md), "llama", "--tiny", "--device", "cpu", "--cap", "0"]) == 0
    text = md.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 32 |")]
    assert len(rows) == 2 and all("no: cut at 0 s" in row for row in rows), text
    assert "did not finish within 0 s: the 30 s goal is **missed**" in text
