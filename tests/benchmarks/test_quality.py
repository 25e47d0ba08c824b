"""The quality benchmark's statistics (benchmarks/quality.py) against scipy: the paired t-test
and its 95% interval."""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import pytest

from tests.helpers.paths import REPO

stats = pytest.importorskip("scipy.stats")

BENCHMARKS = REPO / "benchmarks"


@pytest.fixture(scope="module")
def quality():
    saved = os.environ.get("OMP_NUM_THREADS")  # the script sets a default on import
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("quality")
    finally:
        sys.path.remove(str(BENCHMARKS))
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved


@pytest.mark.parametrize("seed", range(5))
def test_paired_stats_match_scipy(quality, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 31))
    base = {s: float(v) for s, v in enumerate(rng.normal(90, 2, n))}
    other = {s: base[s] + float(d) for s, d in enumerate(rng.normal(0.3, 1, n))}
    other[n + 5] = 50.0  # a seed the baseline lacks is not paired
    got = quality.paired_stats(base, other)
    a = np.array([base[s] for s in range(n)])
    b = np.array([other[s] for s in range(n)])
    test = stats.ttest_rel(b, a)
    interval = stats.t.interval(0.95, n - 1, loc=np.mean(b - a), scale=stats.sem(b - a))
    assert got["n"] == n
    assert got["mean"] == pytest.approx(float(np.mean(b - a)), rel=1e-12)
    assert got["p"] == pytest.approx(float(test.pvalue), rel=1e-9)
    assert got["ci"] == pytest.approx(interval, rel=1e-9)
    assert got["wins"] + got["ties"] + got["losses"] == n
    assert got["wins"] == int(np.sum(b > a)) and got["ties"] == int(np.sum(b == a))


def test_degenerate_pairs(quality):
    assert quality.paired_stats({}, {})["mean"] is None
    one = quality.paired_stats({0: 90.0}, {0: 91.0})
    assert one["mean"] == 1.0 and one["ci"] is None and one["p"] is None
    same = quality.paired_stats({0: 90.0, 1: 80.0}, {0: 91.0, 1: 81.0})  # zero spread: no p value
    assert same["mean"] == pytest.approx(1.0) and same["p"] is None and same["wins"] == 2


def test_seed_lists_are_compact(quality):
    assert quality._seed_list(tuple(range(30))) == "0–29"
    assert quality._seed_list((0, 1, 2)) == "[0, 1, 2]"
    assert quality._seed_list((0, 2, 4, 6)) == "[0, 2, 4, 6]"
