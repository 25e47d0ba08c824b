"""Tests of the power-law fits against independent numpy re-derivations of each rule
(median Hill, every-xmin KS scan, fix-finger window), synthetic Pareto samples, failure
cases and Hypothesis properties. The `powerlaw` package oracle is in test_oracles.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tempbalance.powerlaw import fit_fix_finger, fit_ks, fit_median, fit_power_law


def pareto(alpha: float, n: int, seed: int, xmin: float = 1.0) -> np.ndarray:
    """Continuous Pareto samples with density ~ x^-alpha for x >= xmin (inverse CDF)."""
    u = np.random.default_rng(seed).uniform(size=n)
    return np.sort(xmin * (1 - u) ** (-1 / (alpha - 1)))


def t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.sort(x), dtype=torch.float64)


# ---------------------------------------------------------------- independent references


def ref_median(x: np.ndarray, xmin_pos: float = 2, textbook: bool = False) -> tuple[float, float]:
    x = np.sort(x)
    i = int(math.floor(len(x) / xmin_pos))
    tail = x[i:]
    if textbook:
        alpha = 1 + (len(tail) - 1) / np.sum(np.log(tail[1:] / tail[0]))
    else:
        alpha = 1 + len(tail) / (np.sum(np.log(tail)) - len(tail) * np.log(tail[0]))
    return alpha, tail[0]


def ref_ks_distance(tail: np.ndarray, alpha: float) -> float:
    n = len(tail)
    k = np.arange(n)
    return float(np.max(np.abs(1 - (tail / tail[0]) ** (1 - alpha) - k / n)))


def ref_scan(x: np.ndarray, candidates, textbook: bool = False) -> tuple[float, float, float, int]:
    """Plain loop over xmin candidates (indices), smallest D wins (first on ties).
    Returns (alpha, xmin, D, tail size)."""
    x = np.sort(x)
    best = (math.inf, math.nan, math.nan, 0)
    for i in candidates:
        tail = x[i:]
        s = np.sum(np.log(tail / tail[0]))
        if not s > 0:
            continue
        alpha = 1 + ((len(tail) - 1) if textbook else len(tail)) / s
        d = 1.0 if alpha <= 1 else ref_ks_distance(tail, alpha)
        if d < best[0]:
            best = (d, alpha, tail[0], len(tail))
    return best[1], best[2], best[0], best[3]


# ---------------------------------------------------------------- median


@pytest.mark.parametrize("xmin_pos", [2, 3, 1.5])
@pytest.mark.parametrize("textbook", [False, True])
def test_median_matches_re_derivation(xmin_pos, textbook):
    x = np.random.default_rng(0).lognormal(size=501)
    fit = fit_median(t(x), xmin_pos=xmin_pos, hill="textbook" if textbook else "reference")
    alpha, xmin = ref_median(x, xmin_pos, textbook)
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.xmin == xmin
    assert fit.tail_size == len(x) - int(len(x) // xmin_pos)
    tail = np.sort(x)[int(len(x) // xmin_pos) :]
    assert fit.ks_distance == pytest.approx(ref_ks_distance(tail, fit.alpha), rel=1e-12)


@pytest.mark.parametrize("alpha", [1.8, 2.5, 4.0])
def test_pareto_alpha_recovered(alpha):
    n = 5000
    x = pareto(alpha, n, seed=int(alpha * 10))
    sigma_full = (alpha - 1) / math.sqrt(n)
    ks = fit_ks(t(x))
    assert abs(ks.alpha - alpha) < 5 * (alpha - 1) / math.sqrt(ks.tail_size)
    median = fit_median(t(x))
    assert abs(median.alpha - alpha) < 5 * sigma_full * math.sqrt(2)
    assert median.ks_distance < 0.02


def test_ks_finds_the_power_law_above_a_bulk():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.uniform(0.05, 0.9, 3000), pareto(3.0, 2000, seed=6)])
    fit = fit_ks(t(x))
    assert 0.7 <= fit.xmin <= 1.5
    assert abs(fit.alpha - 3.0) < 5 * 2.0 / math.sqrt(fit.tail_size)


# ---------------------------------------------------------------- KS scan: exact, with pruning


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("textbook", [False, True])
def test_ks_equals_plain_loop(seed, textbook):
    rng = np.random.default_rng(seed)
    kind = seed % 3
    if kind == 0:
        x = np.concatenate([rng.uniform(0.1, 1, 150), pareto(2.5, 150, seed)])
    elif kind == 1:
        x = np.linalg.eigvalsh((w := rng.standard_normal((120, 200))) @ w.T)
    else:
        x = np.round(rng.exponential(size=300), 1) + 0.1  # many duplicates
    fit = fit_ks(t(x), hill="textbook" if textbook else "reference")
    alpha, xmin, d, size = ref_scan(x, range(len(x) - 1), textbook)
    assert (fit.xmin, fit.tail_size) == (xmin, size)
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.ks_distance == pytest.approx(d, rel=1e-9)


@pytest.mark.slow
def test_ks_pruned_scan_equals_plain_loop_on_a_large_spectrum():
    """N large enough that the lower-bound pass prunes most candidates."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((1500, 2500))
    x = np.linalg.eigvalsh(w @ w.T * 0.5)
    x = np.concatenate([x, pareto(2.2, 500, seed=12) * x.max()])
    fit = fit_ks(t(x))
    alpha, xmin, d, size = ref_scan(x, range(len(x) - 1))
    assert (fit.alpha, fit.xmin, fit.tail_size) == (pytest.approx(alpha, rel=1e-12), xmin, size)
    assert fit.ks_distance == pytest.approx(d, rel=1e-9)


def test_ks_skips_zero_candidates():
    x = np.concatenate([np.zeros(20), pareto(2.5, 200, seed=3)])
    fit = fit_ks(t(x))
    alpha, xmin, _, _ = ref_scan(x, range(20, len(x) - 1))
    assert fit.xmin == xmin and fit.alpha == pytest.approx(alpha, rel=1e-12)


# ---------------------------------------------------------------- fix-finger


def test_fix_finger_matches_re_derivation():
    rng = np.random.default_rng(7)
    x = np.sort(np.concatenate([rng.lognormal(0, 0.5, 800), pareto(2.5, 200, seed=8) * 2]))
    logs = np.log10(x)
    counts, edges = np.histogram(logs, bins=100, range=(logs.min(), logs.max()))
    peak = 10 ** edges[np.argmax(counts)]
    window = [i for i in range(len(x) - 1) if 0.95 * peak <= x[i] <= 1.5 * peak]
    assert len(window) > 5
    alpha, xmin, d, _ = ref_scan(x, window)
    fit = fit_fix_finger(t(x))
    assert fit.xmin == xmin
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.ks_distance == pytest.approx(d, rel=1e-9)
    assert 0.95 * peak <= fit.xmin <= 1.5 * peak


# ---------------------------------------------------------------- failures: NaN + reason, never a crash


@pytest.mark.parametrize("method", ["median", "ks", "fix-finger"])
@pytest.mark.parametrize(
    "values,needle",
    [
        ([1.0, 2.0], "too few"),
        ([], "too few"),
        ([3.0] * 50, "equal"),
        ([1.0, float("nan"), 2.0, 3.0], "non-finite"),
        ([1.0, 2.0, float("inf"), 4.0], "non-finite"),
    ],
)
def test_failed_fits_are_nan_with_reason(method, values, needle):
    fit = fit_power_law(torch.tensor(sorted(values), dtype=torch.float64), method)
    assert math.isnan(fit.alpha) and math.isnan(fit.xmin) and fit.tail_size == 0
    assert needle in fit.reason
    assert not fit.ok


def test_zeros_need_filtering_for_median():
    x = np.concatenate([np.zeros(60), pareto(2.5, 40, seed=1)])
    fit = fit_power_law(t(x), "median")
    assert math.isnan(fit.alpha) and "filter_zeros" in fit.reason
    filtered = fit_power_law(t(x), "median", filter_zeros=True)
    assert filtered.num_eigs == 40
    assert filtered.alpha == pytest.approx(ref_median(x[x > 1e-5])[0], rel=1e-12)


def test_zero_threshold_cut():
    x = np.array([1e-7, 1e-6, 1e-4, 0.5, 1.0, 2.0, 4.0, 9.0])
    assert fit_power_law(t(x), "median", filter_zeros=True).num_eigs == 6
    assert fit_power_law(t(x), "median", filter_zeros=True, zero_threshold=1e-3).num_eigs == 5


def test_bad_arguments_are_named():
    x = t(pareto(2.5, 100, 0))
    with pytest.raises(ValueError, match="fit='hill'"):
        fit_power_law(x, "hill")
    with pytest.raises(ValueError, match="hill='other'"):
        fit_power_law(x, "median", hill="other")
    with pytest.raises(ValueError, match="xmin_pos=0.5"):
        fit_power_law(x, "median", xmin_pos=0.5)


# ---------------------------------------------------------------- properties


def _matrix_eigs(m: int, n: int, scale: float, seed: int, heavy: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if heavy:
        w = w * torch.rand(m, 1, generator=gen, dtype=torch.float64).pow(-0.7)
    return torch.sort(torch.linalg.svdvals(w * scale) ** 2).values


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(8, 80),
    n=st.integers(8, 80),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 10_000),
    heavy=st.booleans(),
    method=st.sampled_from(["median", "ks", "fix-finger"]),
)
def test_alpha_finite_and_above_one(m, n, scale, seed, heavy, method):
    fit = fit_power_law(_matrix_eigs(m, n, scale, seed, heavy), method)
    assert fit.ok, fit.reason
    assert math.isfinite(fit.alpha) and fit.alpha > 1
    assert 0 <= fit.ks_distance < 1


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(8, 80),
    n=st.integers(8, 80),
    scale=st.floats(1e-3, 1e3),
    factor=st.floats(1e-2, 1e2),
    seed=st.integers(0, 10_000),
    method=st.sampled_from(["median", "ks"]),
)
def test_scaling_the_matrix_keeps_alpha(m, n, scale, factor, seed, method):
    a = fit_power_law(_matrix_eigs(m, n, scale, seed, True), method)
    b = fit_power_law(_matrix_eigs(m, n, scale * factor, seed, True), method)
    assert b.alpha == pytest.approx(a.alpha, rel=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(20, 400),
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["pareto+bulk", "lognormal", "rounded"]),
)
def test_pruned_ks_scan_equals_plain_loop_property(n, seed, kind):
    rng = np.random.default_rng(seed)
    if kind == "pareto+bulk":
        x = np.concatenate([rng.uniform(0.01, 1, n), pareto(rng.uniform(1.5, 5), n // 2, seed)])
    elif kind == "lognormal":
        x = rng.lognormal(0, rng.uniform(0.2, 3), n)
    else:
        x = np.round(rng.exponential(size=n), 2) + 0.01
    fit = fit_ks(t(x))
    alpha, xmin, d, size = ref_scan(x, range(len(x) - 1))
    assert (fit.xmin, fit.tail_size) == (xmin, size)
    assert fit.alpha == pytest.approx(alpha, rel=1e-9)
    assert fit.ks_distance == pytest.approx(d, rel=1e-9)
