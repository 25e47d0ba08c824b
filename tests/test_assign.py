"""Assignment functions (metric -> factor) and the metric registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tempbalance.assign import (
    ASSIGN_FUNCTIONS,
    assign_options,
    create_assign,
    get_metric,
    register_assign,
    register_metric,
)
from tempbalance.errors import ConfigError


def test_linear_is_the_published_map():
    values = np.array([2.0, 3.0, 2.5, 4.0])
    f = create_assign("linear")(values)
    expected = 0.5 + (values - 2.0) / 2.0
    np.testing.assert_allclose(f, expected, rtol=0, atol=1e-15)
    assert f[0] == 0.5 and f[3] == 1.5


def test_linear_custom_ratios_and_reference_alias():
    values = np.array([1.0, 5.0, 3.0])
    f = create_assign("tb_linear_map", s1=0.6, s2=1.4)(values)
    np.testing.assert_allclose(f, [0.6, 1.4, 1.0])


@pytest.mark.parametrize("name", ["linear", "sqrt", "log2", "step", "sigmoid"])
def test_all_equal_values_give_factor_one(name):
    for values in (np.full(5, 2.7), np.array([3.1])):
        f = create_assign(name)(values)
        assert np.all(np.isfinite(f))
        np.testing.assert_allclose(f, 1.0, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["linear", "sqrt", "log2", "step", "sigmoid"])
def test_empty_input(name):
    assert create_assign(name)(np.array([])).shape == (0,)


def test_sqrt_and_log2_are_normalised_to_mean_one():
    values = np.array([2.0, 3.0, 4.5, 6.0])
    fs = create_assign("sqrt")(values)
    np.testing.assert_allclose(fs, 4 * np.sqrt(values) / np.sqrt(values).sum())
    fl = create_assign("tb_log2")(values)
    np.testing.assert_allclose(fl, 4 * np.log2(values) / np.log2(values).sum())
    assert math.isclose(fs.mean(), 1.0) and math.isclose(fl.mean(), 1.0)


def test_sqrt_and_log2_outside_their_domain_give_nan():
    assert np.isnan(create_assign("sqrt")(np.array([-1.0, 2.0]))).all()
    assert np.isnan(create_assign("log2")(np.array([0.5, 2.0]))).all()


def test_step_by_rank_as_the_reference():
    values = np.array([4.0, 3.0, 5.0, 1.0])
    f = create_assign("step")(values)
    # ranks 2, 1, 3, 0 of n = 4: s1 + (s2 - s1) * rank / n
    np.testing.assert_allclose(f, [0.5 + 0.5, 0.5 + 0.25, 0.5 + 0.75, 0.5])
    g = create_assign("step", endpoint=True)(values)
    np.testing.assert_allclose(g, [0.5 + 2 / 3, 0.5 + 1 / 3, 1.5, 0.5])


def test_step_ties_share_the_mean_rank():
    f = create_assign("step", endpoint=True)(np.array([1.0, 2.0, 2.0, 3.0]))
    np.testing.assert_allclose(f, [0.5, 1.0, 1.0, 1.5])


def test_sigmoid_model_balancing():
    values = np.array([2.0, 2.5, 3.0])
    f = create_assign("tb_sigmoid", tau=10.0, s=1.0)(values)
    diff = values - values.mean()
    phi = 1.0 / (1.0 + np.exp(-10 * diff)) - 0.5
    np.testing.assert_allclose(f, 10**phi)
    assert f[1] == 1.0 and f[0] < 1.0 < f[2]
    h = create_assign("sigmoid", s=1.0, s_below=0.0)(values)
    assert h[0] == 1.0 and h[2] == f[2]


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"s1": 0.0}, "s1=0.0 must be > 0"),
        ({"s1": -1}, "s1=-1.0 must be > 0"),
        ({"s1": 1.6, "s2": 1.5}, "s1=1.6 must be <= s2=1.5"),
        ({"s1": float("nan")}, "s1=nan must be a finite number"),
        ({"s2": "big"}, "s2='big' must be a finite number"),
        ({"s1": True}, "s1=True must be a finite number"),
    ],
)
def test_linear_validation_names_the_value(options, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        create_assign("linear", **options)


def test_unknown_name_lists_what_is_accepted():
    with pytest.raises(ConfigError) as err:
        create_assign("cubic")
    assert "assign='cubic'" in str(err.value) and "linear" in str(err.value) and "tb_sqrt" in str(err.value)


def test_unknown_option_lists_accepted_options():
    with pytest.raises(ConfigError, match=r"assign='sqrt' does not take \['s1'\]; it accepts no options"):
        create_assign("sqrt", s1=0.5)
    with pytest.raises(ConfigError, match=r"does not take \['tau'\]; it accepts \['s1', 's2'\]"):
        create_assign("linear", tau=3)
    with pytest.raises(ConfigError, match="tau > 0"):
        create_assign("sigmoid", tau=0)


def test_callables_pass_through_and_take_no_options():
    fn = lambda v: np.ones_like(v)  # noqa: E731
    assert create_assign(fn) is fn
    with pytest.raises(ConfigError, match="only to named assign functions"):
        create_assign(fn, s1=0.5)


def test_register_assign_as_decorator():
    @register_assign("test_constant")
    def constant(value: float = 2.0):
        return lambda v: np.full_like(v, value)

    try:
        assert assign_options("test_constant") == ("value",)
        np.testing.assert_array_equal(create_assign("test_constant", value=3.0)(np.zeros(2)), [3.0, 3.0])
    finally:
        ASSIGN_FUNCTIONS.pop("test_constant")


def test_metrics_registry():
    class Record:
        alpha, alpha_weighted, lambda_max, log_spectral_norm, stable_rank = 3.0, 4.0, 10.0, 1.0, 5.0

    assert get_metric("alpha")[1](Record) == 3.0
    assert get_metric("alphahat") [0] == "alpha_weighted" and get_metric("alphahat")[1](Record) == 4.0
    assert get_metric("spectral_norm")[1](Record) == 10.0
    name, fn = get_metric(lambda r: r.alpha * 2)
    assert fn(Record) == 6.0
    with pytest.raises(ConfigError, match=r"metric='beta' is not a known metric; accepted: \[.*'alpha'"):
        get_metric("beta")
    register_metric("test_double_alpha", lambda r: 2 * r.alpha)
    assert get_metric("test_double_alpha")[1](Record) == 6.0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(1.01, 20.0, allow_nan=False), min_size=1, max_size=40),
    st.floats(0.05, 1.0),
    st.floats(0.0, 3.0),
)
def test_linear_factors_are_bounded_and_monotone(values, s1, extra):
    s2 = s1 + extra
    v = np.array(values)
    f = create_assign("linear", s1=s1, s2=s2)(v)
    assert np.all(np.isfinite(f))
    assert np.all(f >= s1 - 1e-12) and np.all(f <= s2 + 1e-12)
    order = np.argsort(v, kind="stable")
    assert np.all(np.diff(f[order]) >= -1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(1.01, 20.0, allow_nan=False), min_size=1, max_size=40))
def test_every_builtin_gives_finite_positive_factors_for_alphas(values):
    v = np.array(values)
    for name in ("linear", "sqrt", "log2", "step", "sigmoid"):
        f = create_assign(name)(v)
        assert f.shape == v.shape and np.all(np.isfinite(f)) and np.all(f > 0), name
