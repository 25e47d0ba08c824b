"""Per-epoch metrics: strict-JSON ``metrics.jsonl`` read back, and TensorBoard, which may fail in any
way without costing the run its own files."""

from __future__ import annotations

import logging
import math
import sys
import types

import pytest

from tempbalance.train.metrics import read_metrics


def test_metrics_are_strict_json_and_read_back(tmp_path):
    from tempbalance.train.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write([{"epoch": 1, "test_acc": 50.0, "test_loss": math.nan, "alpha": {"a": math.inf, "b": 2.5}}])
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert line == '{"epoch": 1, "test_acc": 50.0, "test_loss": null, "alpha": {"a": null, "b": 2.5}}'
    assert read_metrics(tmp_path) == [{"epoch": 1, "test_acc": 50.0, "test_loss": None, "alpha": {"a": None, "b": 2.5}}]
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 50.0, "test_loss": NaN}\n')  # older files
    assert read_metrics(tmp_path)[0]["test_loss"] is None


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
