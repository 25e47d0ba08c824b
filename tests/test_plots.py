"""Tests of the figures: each function writes a readable image, handles NaN / failed fits,
and rejects inconsistent input with a clear error."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import tempbalance as tb
from tempbalance import plots

PNG = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("matplotlib")


def is_png(path) -> bool:
    data = open(path, "rb").read()
    return data[:8] == PNG and len(data) > 1000


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Linear(64, 32), nn.Linear(32, 32, bias=False))
    nn.init.orthogonal_(model[2].weight)  # all eigenvalues equal: no fit
    return tb.analyze(model, keep_eigenvalues=True)


def test_plot_esd_with_fit_and_without(report, tmp_path):
    assert report[0].ok and not report[2].ok
    plots.plot_esd(report[0], tmp_path / "a.png")
    plots.plot_esd(report[2], tmp_path / "sub" / "b.png", title="custom")
    assert is_png(tmp_path / "a.png") and is_png(tmp_path / "sub" / "b.png")


def test_plot_esd_needs_eigenvalues(tmp_path):
    record = tb.analyze(nn.Linear(8, 8))[0]
    with pytest.raises(ValueError, match="keep_eigenvalues=True"):
        plots.plot_esd(record, tmp_path / "x.png")


def test_plot_esd_all_zero(tmp_path):
    lin = nn.Linear(8, 8)
    nn.init.zeros_(lin.weight)
    record = tb.analyze(lin, keep_eigenvalues=True)[0]
    plots.plot_esd(record, tmp_path / "z.png")
    assert is_png(tmp_path / "z.png")


def test_plot_alpha_summary_with_nan(report, tmp_path):
    assert math.isnan(report[2].alpha)
    plots.plot_alpha_summary(list(report), tmp_path / "s.png")
    assert is_png(tmp_path / "s.png")


def test_plot_heatmap(tmp_path):
    values = np.random.default_rng(0).uniform(2, 6, size=(5, 30))
    values[1, 3] = np.nan
    plots.plot_heatmap(values, [f"l{i}" for i in range(5)], list(range(30)), tmp_path / "h.png", title="alpha", cbar_label="alpha")
    assert is_png(tmp_path / "h.png")
    with pytest.raises(ValueError, match="2-D"):
        plots.plot_heatmap(np.zeros(4), ["a"], [0], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="do not match"):
        plots.plot_heatmap(values, ["a"], list(range(30)), tmp_path / "bad.png")


def test_plot_curves(tmp_path):
    x = np.arange(10)
    series = {"baseline": (x, x * 0.5, x * 0.05), "tb": (x, x * 0.6, None)}
    plots.plot_curves(series, tmp_path / "c.png", xlabel="epoch", ylabel="acc", title="test")
    assert is_png(tmp_path / "c.png")
    with pytest.raises(ValueError, match="series 'bad'"):
        plots.plot_curves({"bad": (x, x[:5], None)}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="std"):
        plots.plot_curves({"s": (x, x, x[:3])}, tmp_path / "bad.png")


def test_pyplot_backend_untouched(tmp_path, report):
    import matplotlib

    backend = matplotlib.get_backend()
    plots.plot_alpha_summary(list(report), tmp_path / "s.png")
    assert matplotlib.get_backend() == backend


def test_plot_alpha_depth(tmp_path):
    from tempbalance.summaries import alpha_by_depth

    records = [SimpleNamespace(name=f"model.layers.{b}.self_attn.{p}", alpha=2.0 + b + (p == "k_proj")) for b in (1, 0)
               for p in ("q_proj", "k_proj")]
    records += [SimpleNamespace(name="lm_head", alpha=3.0), SimpleNamespace(name="model.layers.2.mlp.up_proj", alpha=float("nan"))]
    assert alpha_by_depth(records) == {"self_attn.q_proj": ([0, 1], [2.0, 3.0]), "self_attn.k_proj": ([0, 1], [3.0, 4.0])}
    plots.plot_alpha_depth(records, tmp_path / "depth.png")
    assert is_png(tmp_path / "depth.png")
    with pytest.raises(ValueError, match="no layer sits in a numbered block"):
        plots.plot_alpha_depth([SimpleNamespace(name="fc", alpha=2.0)], tmp_path / "none.png")


def test_a_figure_that_fails_while_it_is_written_leaves_nothing_behind(report, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    target = tmp_path / "plots" / "summary.png"
    plots.plot_alpha_summary(list(report), target)
    before = target.read_bytes()

    def half_written(self, fname, **kwargs):
        open(fname, "wb").write(PNG)  # a truncated image, then the failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="no space left"):
        plots.plot_alpha_summary(list(report), target)
    assert target.read_bytes() == before  # the previous complete image is still there
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.png"]  # no temporary left


def test_report_to_csv_replaces_the_file_whole(report, tmp_path, monkeypatch):
    path = tmp_path / "alphas.csv"
    path.write_text("old\n")
    monkeypatch.setattr(type(report), "_write_csv", lambda self, handle: (handle.write("partial"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        report.to_csv(path)
    assert path.read_text() == "old\n"
