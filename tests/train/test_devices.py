"""The training device: one that this machine lacks is a one-line error before any work."""

from __future__ import annotations

import torch

from tests.helpers.cli import cli
from tests.helpers.runs import TINY_ARGS


def test_a_missing_device_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device in ("mps", "xpu", "cuda:3"):
        code, err, _ = cli(["train", *TINY_ARGS[:-5], "--device", device, "--no-progress", "--out", tmp_path / device],
                           capsys)
        assert code == 2 and len(err) == 1 and f"--device {device}: " in err[0] and "--device cpu" in err[0], err
        assert not (tmp_path / device).exists()  # nothing was started
