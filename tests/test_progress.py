"""tempbalance.progress: a tqdm bar on a terminal; off a terminal no bar updates, a log line per
milestone or per share of the work, each with the time elapsed and an ETA; nothing when disabled."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest
import torch
from torch import nn

import tempbalance as tb
from tempbalance import progress as progress_module
from tempbalance.errors import ConfigError
from tempbalance.progress import Progress, format_duration

LOGGER = "tempbalance.progress"


class Clock:
    """A stand-in for ``time.monotonic`` that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


def no_bar(capsys) -> bool:
    """True when nothing like a tqdm bar reached stderr (pytest's, which is no terminal)."""
    err = capsys.readouterr().err
    return "\r" not in err and "%|" not in err


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_durations_read_as_seconds_minutes_hours():
    assert format_duration(0.04) == "0.0s"
    assert format_duration(4.25) == "4.2s"
    assert format_duration(12.4) == "12s"
    assert format_duration(185) == "3m05s"
    assert format_duration(7380) == "2h03m"


def test_off_a_terminal_a_milestone_is_one_line_with_elapsed_and_eta(caplog, clock, capsys):
    caplog.set_level(logging.INFO, LOGGER)
    with Progress(40, "cal run", "batch", interactive=False) as bar:
        for epoch in range(1, 5):
            clock.now += 2.0  # 10 batches in 2 s
            bar.update(10)
            bar.milestone({"epoch": f"{epoch}/4", "loss": "0.5"})
    assert no_bar(capsys)  # not a single redraw
    got = lines(caplog)
    # After epoch 1: 2 s for 10 of 40 batches, 30 left at 5 batches/s -> 6 s.
    assert got[0] == "cal run: epoch 1/4, loss 0.5, 2.0s elapsed, ETA 6.0s"
    assert got[2] == "cal run: epoch 3/4, loss 0.5, 6.0s elapsed, ETA 2.0s"
    assert got[3] == "cal run: epoch 4/4, loss 0.5, 8.0s elapsed"  # done: no ETA
    assert len(got) == 4


@pytest.mark.parametrize("total, step", [(50, 1), (1000, 1), (1000, 7), (30, 3)])
def test_one_line_per_tenth_of_the_work(caplog, clock, capsys, total, step):
    caplog.set_level(logging.INFO, LOGGER)
    counts = []
    with Progress(total, "analyzing layers", "layer", log_every=0.1, interactive=False) as bar:
        done = 0
        while done < total:
            n = min(step, total - done)
            done += n
            clock.now += 0.5
            bar.update(n)
    for line in lines(caplog):
        found = re.fullmatch(r"analyzing layers: (\d+)/(\d+) \((\d+)%\), .* elapsed(, ETA .*)?", line)
        assert found, line
        counts.append(int(found.group(1)))
    assert len(counts) == 10 and counts[-1] == total
    # each line is the first count at or past the next tenth of the total
    for k, count in enumerate(counts, start=1):
        assert count >= k * total / 10 > count - step
    assert no_bar(capsys)


def test_a_jump_over_several_tenths_logs_one_line(caplog, clock, capsys):
    caplog.set_level(logging.INFO, LOGGER)
    bar = Progress(100, "work", log_every=0.1, interactive=False)
    clock.now += 1
    bar.update(55)
    clock.now += 1
    bar.update(5)  # 60%: the next tenth after 50%
    assert [line.split(",")[0] for line in lines(caplog)] == ["work: 55/100 (55%)", "work: 60/100 (60%)"]


def test_skipped_work_is_out_of_the_eta_and_logs_nothing(caplog, clock, capsys):
    caplog.set_level(logging.INFO, LOGGER)
    bar = Progress(100, "resumed", log_every=0.1, interactive=False)
    bar.skip(50)  # done by an interrupted run
    assert lines(caplog) == []
    clock.now += 10.0
    bar.update(10)  # 10 new units in 10 s, 40 left at 1 unit/s -> 40 s
    assert lines(caplog) == ["resumed: 60/100 (60%), 10s elapsed, ETA 40s"]


def test_short_work_logs_nothing_before_the_delay(caplog, clock, capsys):
    caplog.set_level(logging.INFO, LOGGER)
    bar = Progress(10, "quick", log_every=0.1, delay=3.0, interactive=False)
    for _ in range(5):
        clock.now += 0.5
        bar.update(1)
    assert lines(caplog) == []  # 2.5 s: still short
    clock.now += 1.0
    bar.update(1)  # 3.5 s: long work, and the next tenth is passed
    assert lines(caplog) == ["quick: 6/10 (60%), 3.5s elapsed, ETA 2.3s"]


def test_disabled_shows_and_logs_nothing(caplog, monkeypatch, capsys):
    caplog.set_level(logging.DEBUG, LOGGER)
    monkeypatch.setattr(progress_module, "_is_terminal", lambda stream: True)
    for interactive in (None, True, False):
        with Progress(10, "off", enabled=False, log_every=0.1, interactive=interactive) as bar:
            bar.update(5)
            bar.skip(2)
            bar.milestone({"epoch": "1/1"})
    assert no_bar(capsys) and lines(caplog) == []


def test_on_a_terminal_a_tqdm_bar_and_no_log_lines(caplog, monkeypatch, capsys):
    pytest.importorskip("tqdm")
    caplog.set_level(logging.INFO, LOGGER)
    monkeypatch.setattr(progress_module, "_is_terminal", lambda stream: stream is sys.stderr)
    with Progress(20, "tb run", "batch", log_every=0.1) as bar:
        bar.skip(5)
        bar.update(15)
        bar.milestone({"epoch": "2/2", "test acc": "91.00%"})
    shown = capsys.readouterr().err
    assert "tb run" in shown and "20/20" in shown and "\r" in shown  # a bar, redrawn in place
    assert "epoch=2/2" in shown and "test acc=91.00%" in shown
    assert lines(caplog) == []


def test_without_tqdm_a_terminal_gets_the_log_lines(caplog, monkeypatch, capsys):
    caplog.set_level(logging.INFO, LOGGER)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import tqdm.auto raises ImportError
    with Progress(2, "run", interactive=True) as bar:
        bar.update(2)
        bar.milestone({"epoch": "1/1"})
    assert no_bar(capsys)
    assert lines(caplog)[0].startswith("run: epoch 1/1, ")


def test_a_terminal_is_told_from_a_file(monkeypatch):
    class Stream(io.StringIO):
        def __init__(self, tty: bool):
            super().__init__()
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    pytest.importorskip("tqdm")
    for tty in (True, False):
        stream = Stream(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        with Progress(3, "detect") as bar:
            bar.update(3)
        assert ("detect" in stream.getvalue()) is tty
    closed = io.StringIO()
    closed.close()
    assert progress_module._is_terminal(closed) is False


@pytest.mark.parametrize("kwargs, named", [
    ({"total": -1}, "total=-1"), ({"total": 2.5}, "total=2.5"), ({"log_every": 0}, "log_every=0"),
    ({"log_every": 1.5}, "log_every=1.5"), ({"delay": -1}, "delay=-1"),
])
def test_bad_settings_are_named(kwargs, named):
    values = {"total": 10, **kwargs}
    with pytest.raises(ConfigError, match=re.escape(named)):
        Progress(values.pop("total"), "bad", **values)


def test_analyze_logs_a_long_analysis_per_tenth(caplog, monkeypatch, capsys):
    """A module of 30 layers with the "long analysis" threshold at 0 s: 10 lines, none with
    progress=False; the records are those of an analysis without progress."""
    caplog.set_level(logging.INFO, LOGGER)
    monkeypatch.setattr("tempbalance.analysis.LONG_ANALYSIS_S", 0.0)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(30)])
    report = tb.analyze(model, progress=True)
    got = lines(caplog)
    assert len(got) == 10 and got[-1].startswith("analyzing layers: 30/30 (100%)")
    assert no_bar(capsys)
    caplog.clear()
    quiet = tb.analyze(model, progress=False)
    assert lines(caplog) == []
    assert quiet.alphas() == report.alphas()


def test_a_resumed_checkpoint_analysis_logs_only_new_work(caplog, monkeypatch, capsys, tmp_path):
    caplog.set_level(logging.INFO, LOGGER)
    monkeypatch.setattr("tempbalance.analysis.LONG_ANALYSIS_S", 0.0)
    torch.manual_seed(1)
    path = tmp_path / "deep.pt"
    torch.save(nn.Sequential(*[nn.Linear(12, 12) for _ in range(20)]).state_dict(), path)
    journal = tmp_path / "journal.jsonl"
    first = tb.analyze(path, progress=True, journal=journal)
    assert len(lines(caplog)) == 10
    caplog.clear()
    again = tb.analyze(path, progress=True, journal=journal)  # every tensor is in the journal
    assert lines(caplog) == []
    assert again.alphas() == first.alphas()
