"""CPU tests that catch device mistakes before a device does: the in-memory data path on the
``meta`` device, the block-wise augmentation draws (the same random stream as one draw per batch,
re-derived here), the number of graphs ``torch.compile`` builds for gpu.sh's settings, and a
TensorBoard that fails in any way."""

from __future__ import annotations

import importlib
import json
import logging
import pickle
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from tempbalance.train.data import InMemoryDataset
from tempbalance.train.data import augment
from tempbalance.train.data.registry import DATASETS
from tempbalance.train.data.sharding import STREAM_AUGMENT, make_generator

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
_REAL_COMPILE = torch.compile


@pytest.fixture(scope="module")
def gpu_bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("gpu_bench")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _cifar_like(n_train: int, n_test: int, device: str = "cpu", seed: int = 0) -> InMemoryDataset:
    rng = np.random.default_rng(seed)
    return InMemoryDataset(
        DATASETS["cifar10"],
        rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n_train),
        rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n_test),
        classes=[str(i) for i in range(10)], device=device,
    )


# ---------------------------------------------------------------- the data path on another device


@pytest.mark.parametrize("augment_on", [True, False])
def test_every_batch_tensor_lives_on_the_dataset_device(augment_on):
    """On ``meta`` any tensor made on the CPU by mistake (offsets, masks, indices) fails or shows up."""
    data = _cifar_like(70, 23, device="meta")
    assert data.x_train.device.type == "meta"
    seen = 0
    for x, y in data.train_batches(16, epoch=2, seed=5, augment=augment_on, rank=1, world_size=2):
        assert x.device.type == "meta" and y.device.type == "meta"
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (3, 32, 32) and x.shape[0] == y.shape[0]
        seen += x.shape[0]
    assert seen == 35  # rank 1's half of 70
    sizes = [x.shape[0] for x, _ in data.test_batches(10)]
    assert sizes == [10, 10, 3]
    for x, y in data.test_batches(10):
        assert x.device.type == "meta" and y.device.type == "meta"


def test_draws_reach_the_device_in_one_copy_per_block(monkeypatch):
    monkeypatch.setattr(augment, "BLOCK_SAMPLES", 50)
    sizes = [16, 16, 16, 16, 7, 60, 3]
    draws = list(augment.draw_crop_flip(torch.Generator().manual_seed(1), sizes, 4, "meta"))
    assert [d[0].shape[0] for d in draws] == sizes
    for dy, dx, flip in draws:
        assert dy.device.type == dx.device.type == flip.device.type == "meta"
        assert dy.dtype == torch.int64 and flip.dtype == torch.bool
    # blocks of at most 50 examples (a larger batch alone): [16, 16, 16], [16, 7], [60], [3]
    bases = [id(dy._base) for dy, _, _ in draws]
    assert [bases.index(b) for b in bases] == [0, 0, 0, 3, 3, 5, 6]


# ---------------------------------------------------------------- the same random stream as before


def _crop_flip_reference(image: np.ndarray, padding: int, dy: int, dx: int, flip: bool) -> np.ndarray:
    c, h, w = image.shape
    padded = np.zeros((c, h + 2 * padding, w + 2 * padding), image.dtype)
    padded[:, padding : padding + h, padding : padding + w] = image
    out = padded[:, dy : dy + h, dx : dx + w]
    return out[:, :, ::-1] if flip else out


def _expected_epoch(data: InMemoryDataset, batch: int, *, epoch: int, seed: int, rank: int, world: int):
    """The published per-batch rule, written out: for each batch of the shuffled shard, in order, the
    (seed, epoch, rank) generator draws randint(0, 9, (2, B)) for the offsets, then rand(B) < 0.5."""
    from tempbalance.train.data.sharding import epoch_order, shard_batches

    generator = make_generator(seed, STREAM_AUGMENT, epoch, rank)
    info = data.info
    mean = np.asarray(info.mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(info.std, np.float32).reshape(3, 1, 1)
    x_all, y_all = data.x_train.numpy(), data.y_train.numpy()
    order = epoch_order(data.num_train, seed=seed, epoch=epoch)
    for index in shard_batches(order, batch, rank=rank, world_size=world):
        offsets = torch.randint(0, 2 * info.padding + 1, (2, index.numel()), generator=generator)
        flips = torch.rand(index.numel(), generator=generator) < 0.5
        raw = np.stack([
            _crop_flip_reference(x_all[i], info.padding, int(offsets[0, k]), int(offsets[1, k]), bool(flips[k]))
            for k, i in enumerate(index.tolist())
        ])
        yield (raw.astype(np.float32) / np.float32(info.pixel_scale) - mean) / std, y_all[index.numpy()]


@pytest.mark.parametrize("block", [None, 40, 1])
def test_block_draws_give_the_per_batch_stream_bit_for_bit(monkeypatch, block):
    if block is not None:
        monkeypatch.setattr(augment, "BLOCK_SAMPLES", block)
    data = _cifar_like(91, 5, seed=3)
    for epoch, world, rank, batch in [(0, 1, 0, 16), (3, 2, 1, 10), (1, 3, 2, 64)]:
        got = list(data.train_batches(batch, epoch=epoch, seed=7, rank=rank, world_size=world))
        want = list(_expected_epoch(data, batch, epoch=epoch, seed=7, rank=rank, world=world))
        assert len(got) == len(want)
        for (x, y), (xw, yw) in zip(got, want):
            np.testing.assert_array_equal(y.numpy(), yw)
            np.testing.assert_array_equal(x.numpy(), xw)


def test_random_crop_flip_keeps_its_stream():
    """The public one-batch function draws the same numbers in the same order."""
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment.random_crop_flip(images, 2, torch.Generator().manual_seed(9))
    generator = torch.Generator().manual_seed(9)
    offsets = torch.randint(0, 5, (2, 12), generator=generator)
    flips = torch.rand(12, generator=generator) < 0.5
    for b in range(12):
        want = _crop_flip_reference(images[b].numpy(), 2, int(offsets[0, b]), int(offsets[1, b]), bool(flips[b]))
        np.testing.assert_array_equal(out[b].numpy(), want)


def test_batch_sizes_that_do_not_match_are_refused():
    generator_batches = iter([(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))])
    info = DATASETS["cifar10"]
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    batches = augment.augmented_batches(generator_batches, info, mean, std, augment=True, seed=0, epoch=0, rank=0,
                                        batch_sizes=[5])
    with pytest.raises(ValueError, match="5 examples for a batch of 4"):
        next(batches)


# ---------------------------------------------------------------- torch.compile graphs at gpu.sh's settings


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


# ---------------------------------------------------------------- TensorBoard failures


def _fake_tensorboard(monkeypatch, writer_cls=None, import_error: Exception | None = None) -> None:
    module = types.ModuleType("torch.utils.tensorboard")
    if import_error is not None:
        def fail(name):
            raise import_error
        module.__getattr__ = fail  # type: ignore[attr-defined]
    else:
        module.SummaryWriter = writer_cls  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)


class _Writer:
    fail_on: str | None = None
    calls: list[str] = []

    def __init__(self, logdir):
        if self.fail_on == "init":
            raise OSError("read-only file system")
        self.logdir = logdir

    def add_scalar(self, key, value, global_step):
        type(self).calls.append(key)
        if self.fail_on == "write" and len(type(self).calls) > 2:
            raise RuntimeError("event file writer died")

    def flush(self):
        pass

    def close(self):
        if self.fail_on == "close":
            raise OSError("disk full")


@pytest.mark.parametrize("where", ["import", "init", "write", "close"])
def test_any_tensorboard_failure_disables_it_with_one_warning(monkeypatch, tmp_path, caplog, where):
    from tempbalance.train.metrics import MetricsWriter, read_metrics

    _Writer.calls = []
    monkeypatch.setattr(_Writer, "fail_on", where)
    if where == "import":
        _fake_tensorboard(monkeypatch, import_error=TypeError("Descriptors cannot be created directly"))
    else:
        _fake_tensorboard(monkeypatch, writer_cls=_Writer)
    rows = [{"epoch": e, "lr": 0.1, "train_loss": 1.0 / e, "test_acc": 50.0 + e} for e in (1, 2, 3)]
    with caplog.at_level(logging.WARNING, logger="tempbalance.train.metrics"):
        writer = MetricsWriter(tmp_path)
        for k in range(1, 4):
            writer.write(rows[:k])
        writer.close()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "TensorBoard disabled" in warnings[0].getMessage()
    assert read_metrics(tmp_path) == rows  # the run's own files are complete
    if where == "write":
        assert len(_Writer.calls) == 3  # nothing more after the failure


def test_working_tensorboard_gets_every_scalar(monkeypatch, tmp_path, caplog):
    from tempbalance.train.metrics import MetricsWriter

    _Writer.calls = []
    monkeypatch.setattr(_Writer, "fail_on", None)
    _fake_tensorboard(monkeypatch, writer_cls=_Writer)
    with caplog.at_level(logging.WARNING):
        writer = MetricsWriter(tmp_path)
        writer.write([{"epoch": 1, "lr": 0.1, "test_acc": 40.0}])
        writer.close()
    assert _Writer.calls == ["lr", "test_acc"] and not caplog.records


def test_bench_train_leaves_torch_and_the_loop_as_they_were(gpu_bench, tmp_path):
    from tempbalance.train import loop

    before = torch.compile, loop.save_checkpoint
    with pytest.raises(Exception):
        gpu_bench.main(["train", "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "run"),
                        "--json", str(tmp_path / "run.json"), "--compile", "--compile-backend", "eager"])
    assert (torch.compile, loop.save_checkpoint) == before
