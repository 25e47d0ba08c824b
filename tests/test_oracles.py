"""Oracle tests: the "ks" fit against the `powerlaw` package, and whole-model analysis
against WeightWatcher 0.7.7 ``analyze()`` (default settings) on two architectures, on the
layers with 64+ eigenvalues (WeightWatcher fits only lambda > 1e-5: ``filter_zeros=True``)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import pytest
import torch

import tempbalance as tb
from tempbalance.powerlaw import fit_ks

pytestmark = pytest.mark.oracle


def quietly(fn, *args, **kwargs):
    """Run ``fn`` with warnings, stdout, stderr and library logging silenced."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in ("weightwatcher", "powerlaw"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        return fn(*args, **kwargs)


# ---------------------------------------------------------------- powerlaw package


@pytest.mark.parametrize("seed", range(4))
def test_ks_matches_powerlaw_package(seed):
    """powerlaw 2.x: ``Fit(data, parameter_ranges={'alpha': [1, None]})`` (without the range
    it caps alpha at 3). Its candidates are the unique values but the largest, its empirical
    CDF of the tail is k / n - the same (alpha, xmin, D) on continuous samples."""
    powerlaw = pytest.importorskip("powerlaw")
    rng = np.random.default_rng(seed)
    alpha_true = [2.2, 3.0, 4.5, 6.0][seed]
    tail = (1 - rng.uniform(size=300)) ** (-1 / (alpha_true - 1))
    x = np.sort(np.concatenate([rng.uniform(0.05, 1.0, 300), tail]))
    ref = quietly(powerlaw.Fit, x, parameter_ranges={"alpha": [1, None]}, verbose=False)
    ours = fit_ks(torch.tensor(x, dtype=torch.float64))
    assert ours.xmin == ref.xmin
    assert ours.alpha == pytest.approx(ref.alpha, rel=1e-9)
    assert ours.ks_distance == pytest.approx(ref.D, rel=1e-9)


# ---------------------------------------------------------------- WeightWatcher


def ww_analyze(model: torch.nn.Module):
    ww = pytest.importorskip("weightwatcher")
    return quietly(lambda: ww.WeightWatcher(model=model).analyze())


def _models():
    """Two small timm architectures (WeightWatcher takes ~0.5 s on each; ResNet18 and ViT-B/16
    are compared in benchmarks/analysis_speed.py)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return {
        "test_byobnet": timm.create_model("test_byobnet", pretrained=False),  # Conv2d (3x3, 1x1) + Linear
        "test_vit": timm.create_model("test_vit", pretrained=False),  # Linear
    }


@pytest.fixture(scope="module")
def results():
    """name -> (WeightWatcher frame, our ks report in float32, our ks report in float64)."""
    out = {}
    for name, model in _models().items():
        out[name] = (
            ww_analyze(model),
            tb.analyze(model, fit="ks", filter_zeros=True),
            tb.analyze(model, fit="ks", filter_zeros=True, precision="float64"),
        )
    return out


def _compared_rows(df, report):
    rows = [row for _, row in df.iterrows() if row["longname"] in report.names and row["num_evals"] >= 64]
    assert len(rows) >= 8
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("name", ["test_byobnet", "test_vit"])
@pytest.mark.parametrize("precision,rtol", [("auto", 1e-3), ("float64", 1e-9)])
def test_alpha_matches_weightwatcher(results, name, precision, rtol):
    df, report32, report64 = results[name]
    report = report32 if precision == "auto" else report64
    rows = _compared_rows(df, report)
    assert {report[row["longname"]].kind for row in rows} & {"Conv2d", "Linear"}
    for row in rows:
        record = report[row["longname"]]
        assert record.alpha == pytest.approx(row["alpha"], rel=rtol), row["longname"]
        assert record.num_eigs == row["num_evals"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["test_byobnet", "test_vit"])
def test_norm_metrics_match_weightwatcher(results, name):
    df, _, report = results[name]
    for row in _compared_rows(df, report):
        record = report[row["longname"]]
        for ours, theirs in (
            (record.xmin, row["xmin"]),
            (record.ks_distance, row["D"]),
            (record.lambda_max, row["lambda_max"]),
            (record.log_spectral_norm, row["log_spectral_norm"]),
            (record.log_norm, row["log_norm"]),
            (record.stable_rank, row["stable_rank"]),
            (record.alpha_weighted, row["alpha_weighted"]),
        ):
            assert ours == pytest.approx(theirs, rel=1e-9), row["longname"]
        # WeightWatcher adds 1e-10 to every p and to the rank
        assert record.entropy == pytest.approx(row["entropy"], rel=1e-6), row["longname"]
