"""Robustness of one training run (issue #17): no silent overwrite, resume reads the run's settings
back, numerics changes on resume, divergence caught before it is saved, strict-JSON metrics,
full disks, checkpoint fallback, devices and data directories checked before any work, and error
texts in the interface's own words."""

from __future__ import annotations

import errno
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tempbalance.atomic import WriteError, temporaries
from tempbalance.cli import main as cli_main
from tempbalance.errors import ConfigError
from tempbalance.train import TrainConfig, run_training
from tempbalance.train import loop as loop_module
from tempbalance.train.checkpoint import load_checkpoint
from tempbalance.train.divergence import DivergenceError
from tempbalance.train.metrics import read_metrics

TINY = dict(
    dataset="mnist1d", model="cnn1d", method="cal", epochs=3, lr=0.1, batch_size=64, width=0.5,
    train_fraction=0.1, seed=5, device="cpu", progress=False, num_threads=1,
)
TINY_ARGS = [
    "--dataset", "mnist1d", "--model", "cnn1d", "--epochs", "3", "--lr", "0.1", "--batch-size", "64",
    "--width", "0.5", "--train-fraction", "0.1", "--seed", "5", "--device", "cpu", "--threads", "1", "--no-progress",
]


def tiny(out: Path, **overrides) -> TrainConfig:
    return TrainConfig(**dict(TINY, out=str(out), **overrides))


def cli(argv, capsys) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out


def rows_without_times(directory: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "epoch_time"} for row in read_metrics(directory)]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run to compare resumed ones with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_training(tiny(out))
    return out


# ---------------------------------------------------------------- 2. no silent overwrite


def test_a_finished_run_without_checkpoints_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "done"
    run_training(tiny(out, epochs=1))
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).unlink()
    before = {name: (out / name).read_bytes() for name in ("summary.json", "metrics.jsonl", "config.json")}
    with pytest.raises(ConfigError, match=r"already holds a run \(config\.json, metrics\.jsonl, metrics\.csv, "
                                          r"summary\.json\); pass resume=True .* overwrite=True"):
        run_training(tiny(out, epochs=1, lr=0.2))
    code, err, _ = cli(["train", *TINY_ARGS, "--epochs", "1", "--out", out], capsys)
    assert code == 2 and len(err) == 1 and str(out) in err[0] and "--resume" in err[0] and "--overwrite" in err[0]
    assert {name: (out / name).read_bytes() for name in before} == before
    # a finished run with its checkpoints removed still counts as finished for --resume
    assert run_training(tiny(out, epochs=1, resume=True))["status"] == "finished"
    # --overwrite starts over: the new settings' run replaces the old files (only the run's own)
    (out / "notes.txt").write_text("mine")
    code, err, _ = cli(["train", *TINY_ARGS, "--epochs", "1", "--lr", "0.2", "--overwrite", "--out", out], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["lr"] == 0.2 and (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="contradict"):
        tiny(out, resume=True, overwrite=True).validate()


# ---------------------------------------------------------------- 2. resume reads the run back


def test_resume_alone_continues_with_the_runs_own_settings(tmp_path, straight, capsys):
    out = tmp_path / "parts"
    run_training(tiny(out, stop_after=1))
    code, err, stdout = cli(["train", "--out", out, "--resume", "--no-progress"], capsys)  # nothing else given
    assert code == 0, err
    assert stdout.startswith("finished: cal on mnist1d/cnn1d seed 5, 3/3 epochs")
    assert_same_weights(straight, out)
    assert rows_without_times(out) == rows_without_times(straight)
    # an explicit flag that changes the experiment is refused, naming it
    code, err, _ = cli(["train", "--out", out, "--resume", "--lr", "0.3"], capsys)
    assert code == 2 and len(err) == 1 and "lr: 0.1 -> 0.3" in err[0]
    # the Python API reads the run back the same way from a dict
    assert run_training({"out": str(out), "resume": True, "progress": False})["status"] == "finished"


def test_resume_uses_the_runs_thread_count_when_none_is_given(tmp_path, straight, monkeypatch):
    out = tmp_path / "threads"
    run_training(tiny(out, stop_after=1))
    seen = []
    real_epoch = loop_module._train_epoch

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop_module, "_train_epoch", spy)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # as OMP_NUM_THREADS=2 would give this process
    try:
        run_training(tiny(out, num_threads=None, resume=True))
    finally:
        torch.set_num_threads(previous)
    assert seen == [1, 1]  # the run's own thread count, not this process's 2
    assert_same_weights(straight, out)


def test_resume_with_other_numerics_warns_once_and_config_json_keeps_the_original(tmp_path, caplog, capsys):
    out = tmp_path / "numerics"
    run_training(tiny(out, stop_after=1))
    original = json.loads((out / "config.json").read_text())
    with caplog.at_level(logging.WARNING):
        code, err, _ = cli(["train", "--out", out, "--resume", "--threads", "2", "--no-deterministic",
                            "--no-progress", "--stop-after", "2"], capsys)
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if "bit-identical" in r.getMessage()]
    assert len(warnings) == 1
    assert "num_threads 1 -> 2" in warnings[0] and "deterministic True -> False" in warnings[0]
    written = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in written.items() if k != "resumed"} == original  # the run's original values
    assert written["resumed"][0]["epoch"] == 1 and written["resumed"][0]["threads"] == 2
    assert written["resumed"][0]["changed"] == ["num_threads 1 -> 2", "deterministic True -> False"]
    state = load_checkpoint(out)
    assert state["config"]["num_threads"] == 1 and state["config"]["deterministic"] is True


# ---------------------------------------------------------------- 3. divergence


def test_divergence_stops_before_the_epoch_is_saved(tmp_path, capsys):
    """lr 100 with TB: epoch 2 ends with a finite mean train loss but non-finite BatchNorm
    statistics; that epoch is neither saved nor logged, and the last checkpoint has finite weights."""
    out = tmp_path / "nan"
    with pytest.raises(DivergenceError) as caught:
        run_training(tiny(out, method="tb", lr=100.0))
    message = str(caught.value)
    assert message.startswith("training diverged in epoch 2: ") and "non-finite weights in bn2.running_var" in message
    assert "lr=100.0" in message and "lower the learning rate" in message and "checkpoint of epoch 1" in message
    state = load_checkpoint(out)
    assert state["epoch"] == 1 == len(read_metrics(out))
    for name, tensor in state["model"].items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name
    text = (out / "metrics.jsonl").read_text()
    for line in text.splitlines():  # strict JSON: a parser that refuses NaN/Infinity reads every line
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    code, err, _ = cli(["train", "--out", out, "--resume", "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and "--lr 100.0" in err[0] and "--overwrite" in err[0]


def test_a_loss_growing_by_orders_of_magnitude_warns_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        summary = run_training(tiny(tmp_path / "lr30", lr=30.0))
    assert summary["status"] == "finished"
    warnings = [r.getMessage() for r in caplog.records if "orders of magnitude" in r.getMessage()]
    assert len(warnings) == 1 and "probably diverging" in warnings[0] and "lr=30.0" in warnings[0]
    assert summary["warnings"] == warnings
    assert json.loads((tmp_path / "lr30" / "summary.json").read_text())["warnings"] == warnings
    quiet = run_training(tiny(tmp_path / "fine"))  # a healthy run does not warn
    assert "warnings" not in quiet
    run_training(tiny(tmp_path / "parts", lr=30.0, stop_after=1))  # warned in epoch 1 ...
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resumed = run_training(tiny(tmp_path / "parts", lr=30.0, resume=True))
    assert resumed["warnings"] == warnings  # ... kept across the resume, not given again
    assert "orders of magnitude" not in caplog.text


def test_metrics_are_strict_json_and_read_back(tmp_path):
    from tempbalance.train.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write([{"epoch": 1, "test_acc": 50.0, "test_loss": math.nan, "alpha": {"a": math.inf, "b": 2.5}}])
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert line == '{"epoch": 1, "test_acc": 50.0, "test_loss": null, "alpha": {"a": null, "b": 2.5}}'
    assert read_metrics(tmp_path) == [{"epoch": 1, "test_acc": 50.0, "test_loss": None, "alpha": {"a": None, "b": 2.5}}]
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 50.0, "test_loss": NaN}\n')  # older files
    assert read_metrics(tmp_path)[0]["test_loss"] is None


# ---------------------------------------------------------------- 4. full disks


def test_a_full_disk_names_the_file_and_never_leaves_metrics_ahead(tmp_path, straight, monkeypatch, capsys):
    out = tmp_path / "full"
    real_save = torch.save
    calls = []

    def save_on_a_full_disk(obj, handle, *args, **kwargs):
        calls.append(obj.get("epoch"))
        if obj.get("epoch") == 2:  # the disk fills up while the epoch-2 checkpoint is written
            handle.write(b"x" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from OSError(
                errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    code, err, _ = cli(["train", *TINY_ARGS, "--out", out], capsys)
    monkeypatch.undo()
    assert code == 1 and len(err) == 1, err
    assert str(out / "checkpoint.pt") in err[0] and "no space left on device" in err[0]
    assert calls == [0, 1, 2]
    assert temporaries(out / "checkpoint.pt") == []  # the 1000-byte temporary was removed
    assert load_checkpoint(out)["epoch"] == 1 and len(read_metrics(out)) == 1  # metrics not ahead
    # space freed: the same command with --resume finishes, identical to an uninterrupted run
    code, err, _ = cli(["train", *TINY_ARGS, "--out", out, "--resume"], capsys)
    assert code == 0, err
    assert_same_weights(straight, out)
    assert rows_without_times(out) == rows_without_times(straight)


def test_a_full_disk_while_resuming_names_the_file(tmp_path, monkeypatch):
    out = tmp_path / "r"
    run_training(tiny(out, stop_after=1))
    import tempbalance.atomic as atomic

    real = atomic._create

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_create", full)
    with pytest.raises(WriteError, match=rf"cannot write {out / 'config.json'}: no space left"):
        run_training(tiny(out, resume=True))
    monkeypatch.setattr(atomic, "_create", real)
    assert run_training(tiny(out, resume=True))["status"] == "finished"


# ---------------------------------------------------------------- 5. checkpoint fallback


def test_fallback_keeps_the_good_previous_checkpoint(tmp_path, straight, caplog):
    out = tmp_path / "fallback"
    run_training(tiny(out, stop_after=2))  # checkpoint.pt: epoch 2, checkpoint.prev.pt: epoch 1
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    good_previous = (out / "checkpoint.prev.pt").read_bytes()
    with caplog.at_level(logging.WARNING):
        run_training(tiny(out, stop_after=2, resume=True))  # redoes epoch 2 from checkpoint.prev.pt
    assert "checkpoint.pt is unreadable" in caplog.text
    # the first save after the fallback replaced the bad file and kept the good one as prev
    assert (out / "checkpoint.prev.pt").read_bytes() == good_previous
    assert load_checkpoint(out)["epoch"] == 2
    run_training(tiny(out, resume=True))
    assert_same_weights(straight, out)


def test_a_foreign_checkpoint_falls_back_to_the_previous_one(tmp_path, straight, caplog):
    out = tmp_path / "foreign"
    run_training(tiny(out, stop_after=2))
    torch.save({"epoch": 2, "hello": "not a training checkpoint"}, out / "checkpoint.pt")
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(out)["epoch"] == 1
    assert "not a tempbalance training checkpoint (no config, model" in caplog.text
    run_training(tiny(out, resume=True))
    assert_same_weights(straight, out)


# ---------------------------------------------------------------- 8. inputs checked before work


def test_a_missing_device_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device in ("mps", "xpu", "cuda:3"):
        code, err, _ = cli(["train", *TINY_ARGS[:-5], "--device", device, "--no-progress", "--out", tmp_path / device],
                           capsys)
        assert code == 2 and len(err) == 1 and f"--device {device}: " in err[0] and "--device cpu" in err[0], err
        assert not (tmp_path / device).exists()  # nothing was started


def _image_folder(root: Path, classes: int, per_class: int = 1) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((32, 32, 3), c * 20 + i, np.uint8)).save(folder / f"{i}.png")


def test_a_cifar100_request_on_a_10_class_folder_is_refused_before_decoding(tmp_path, monkeypatch, capsys):
    _image_folder(tmp_path / "c10", classes=10)
    monkeypatch.setenv("TEMPBALANCE_CACHE", str(tmp_path / "cache"))
    from tempbalance.train.data import readers

    monkeypatch.setattr(readers, "read_image_folder", lambda *a, **k: pytest.fail("decoded"))
    code, err, _ = cli(["train", "--dataset", "cifar100", "--data-dir", tmp_path / "c10", "--epochs", "1",
                        "--device", "cpu", "--out", tmp_path / "run"], capsys)
    assert code == 2 and len(err) == 1
    assert "cifar100 has 100 classes but" in err[0] and "holds 10 class folders (a folder of cifar10 or svhn?)" in err[0]
    assert "--data-dir DIR" in err[0]
    assert not (tmp_path / "run").exists() and not list((tmp_path / "cache").glob("*.npz"))
    (tmp_path / "c100" / "cifar-10-batches-py").mkdir(parents=True)  # the other CIFAR's pickles
    with pytest.raises(ConfigError, match=r"holds cifar-10-batches-py/ \(the other CIFAR\), not cifar-100-python/"):
        run_training(dict(TINY, dataset="cifar100", model="cnn1d", data_dir=str(tmp_path / "c100")))


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


def test_the_non_finite_check_finds_nan_and_inf_but_not_a_huge_finite_weight():
    from torch import nn

    from tempbalance.train.divergence import non_finite_tensors

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2).half())
    assert non_finite_tensors(model) == []
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # finite, though its sum overflows float32
    assert non_finite_tensors(model) == []
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
        model[1].running_var[1] = float("nan")
        model[0].bias[0] = float("-inf")
    assert non_finite_tensors(model) == ["0.bias", "2.weight", "1.running_var"]
