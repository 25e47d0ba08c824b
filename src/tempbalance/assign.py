"""Metric -> learning-rate factor: TempBalance's assignment ("temperature") functions and the
per-layer metrics they read, each kept in a registry.

An assignment function maps the metric values of the balanced layers (a 1-D float64 array, in
layer order) to one learning-rate factor per layer; the layer's rate is the untuned rate times
its factor. Factories in :data:`ASSIGN_FUNCTIONS` build them from keyword options.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import numpy as np

from .errors import ConfigError

__all__ = [
    "AssignFn",
    "ASSIGN_FUNCTIONS",
    "ASSIGN_ALIASES",
    "METRICS",
    "METRIC_ALIASES",
    "register_assign",
    "register_metric",
    "create_assign",
    "assign_options",
    "get_metric",
    "check_range",
    "check_normalize",
    "NORMALIZE",
    "normalize_factors",
    "takes_names",
    "linear",
    "sqrt",
    "log2",
    "step",
    "sigmoid",
]

AssignFn = Callable[[np.ndarray], np.ndarray]
"""``fn(values) -> factors``: 1-D float64 metric values to factors of the same length. A function
that also takes a keyword argument ``names`` gets the layer names of the values (in the same
order) from :class:`tempbalance.TempBalance`, e.g. to average them per block."""

NORMALIZE = ("none", "mean")
"""``normalize=`` of the scheduler: ``"none"`` (or None, default): the factors as the assignment
function gives them; ``"mean"``: divided by their mean, so that the average balanced factor is 1
(the balance is kept, the shift of the average rate removed)."""

ASSIGN_FUNCTIONS: dict[str, Callable[..., AssignFn]] = {}
ASSIGN_ALIASES = {
    "tb_linear_map": "linear",
    "tb_sqrt": "sqrt",
    "tb_log2": "log2",
    "tb_step": "step",
    "tb_sigmoid": "sigmoid",
}


def register_assign(name: str, factory: Callable[..., AssignFn] | None = None):
    """Register an assignment-function factory under ``name`` (usable as a decorator).

    A factory takes keyword options (validated by itself, raising ``ConfigError``) and returns
    ``fn(values: np.ndarray) -> np.ndarray``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"assign function names are non-empty strings, got {name!r}")

    def decorate(fn: Callable[..., AssignFn]) -> Callable[..., AssignFn]:
        if not callable(fn):
            raise TypeError(f"register_assign({name!r}) expects a callable factory, got {fn!r}")
        ASSIGN_FUNCTIONS[name] = fn
        return fn

    return decorate(factory) if factory is not None else decorate


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    return float(value)


def check_range(s1: Any, s2: Any, names: tuple[str, str] = ("s1", "s2")) -> tuple[float, float]:
    """Validate a factor range ``0 < s1 <= s2`` (finite); the error names the values as ``names``.

    Raises:
        ConfigError: naming the bad value and the rule.
    """
    low, high = names
    s1, s2 = _number(low, s1), _number(high, s2)
    if s1 <= 0:
        raise ConfigError(f"{low}={s1!r} must be > 0 (it is the smallest factor)")
    if s1 > s2:
        raise ConfigError(f"{low}={s1!r} must be <= {high}={s2!r} ({low} is the smallest factor, {high} the largest)")
    return s1, s2


def _ratios(s1: Any, s2: Any) -> tuple[float, float]:
    return check_range(s1, s2)


def _all_equal(values: np.ndarray) -> bool:
    return values.size == 0 or bool(values.max() == values.min())


@register_assign("linear")
def linear(s1: float = 0.5, s2: float = 1.5) -> AssignFn:
    """The published TempBalance map ("tb_linear_map"): the smallest metric gets ``s1``, the
    largest ``s2``, linear in between: ``s1 + (s2 - s1) * (v - min) / (max - min)``.
    All values equal: every factor is 1, clipped to ``[s1, s2]`` (the reference's 0/0 would be
    NaN)."""
    s1, s2 = _ratios(s1, s2)
    tie = min(max(1.0, s1), s2)

    def assign(values: np.ndarray) -> np.ndarray:
        if _all_equal(values):
            return np.full_like(values, tie)
        lo, hi = values.min(), values.max()
        return s1 + (s2 - s1) * (values - lo) / (hi - lo)

    return assign


@register_assign("sqrt")
def sqrt() -> AssignFn:
    """"tb_sqrt": ``n * sqrt(v_i) / sum_j sqrt(v_j)`` (mean factor 1). Needs every value >= 0
    and one > 0; otherwise every factor is NaN (the scheduler then keeps factor 1)."""

    def assign(values: np.ndarray) -> np.ndarray:
        if values.size == 0 or values.min() < 0 or values.max() <= 0:
            return np.full_like(values, np.nan)
        r = np.sqrt(values)
        return values.size * r / r.sum()

    return assign


@register_assign("log2")
def log2() -> AssignFn:
    """"tb_log2": ``n * log2(v_i) / sum_j log2(v_j)`` (mean factor 1). Needs every value > 1
    (true of alpha); otherwise every factor is NaN (the scheduler then keeps factor 1)."""

    def assign(values: np.ndarray) -> np.ndarray:
        if values.size == 0 or values.min() <= 1:
            return np.full_like(values, np.nan)
        r = np.log2(values)
        return values.size * r / r.sum()

    return assign


@register_assign("step")
def step(s1: float = 0.5, s2: float = 1.5, endpoint: bool = False) -> AssignFn:
    """"tb_step": factors by rank. The layer of rank ``r`` (0 = smallest metric) of ``n`` gets
    ``s1 + (s2 - s1) * r / n`` as in the reference (so ``s2`` itself is never reached), or
    ``s1 + (s2 - s1) * r / (n - 1)`` with ``endpoint=True``. Ties share their mean rank; all
    values equal: every factor is 1, clipped to ``[s1, s2]``."""
    s1, s2 = _ratios(s1, s2)
    tie = min(max(1.0, s1), s2)
    if not isinstance(endpoint, bool):
        raise ConfigError(f"endpoint={endpoint!r} must be True or False")

    def assign(values: np.ndarray) -> np.ndarray:
        n = values.size
        if _all_equal(values):
            return np.full_like(values, tie)
        order = np.argsort(values, kind="stable")
        ranks = np.empty(n, dtype=np.float64)
        ranks[order] = np.arange(n, dtype=np.float64)
        for v in np.unique(values):  # ties: mean rank
            tied = values == v
            if tied.sum() > 1:
                ranks[tied] = ranks[tied].mean()
        denom = (n - 1) if endpoint else n
        return s1 + (s2 - s1) * ranks / denom

    return assign


@register_assign("sigmoid")
def sigmoid(tau: float = 10.0, s: float = 1.0, s_below: float | None = None) -> AssignFn:
    """Model Balancing's "TB_Sigmoid" (arXiv 2410.12178): ``factor = 10 ** phi`` with
    ``phi = s * (sigmoid(tau * (v - mean(v))) - 0.5)``; ``s_below`` (default ``s``) scales the
    values below the mean. Factors lie in ``(10 ** (-s_below / 2), 10 ** (s / 2))``."""
    tau = _number("tau", tau)
    s = _number("s", s)
    s_below = s if s_below is None else _number("s_below", s_below)
    if tau <= 0 or s < 0 or s_below < 0:
        raise ConfigError(f"sigmoid needs tau > 0, s >= 0, s_below >= 0; got tau={tau}, s={s}, s_below={s_below}")

    def assign(values: np.ndarray) -> np.ndarray:
        if values.size == 0:
            return values.copy()
        diff = values - values.mean()
        centred = 1.0 / (1.0 + np.exp(-tau * diff)) - 0.5
        phi = np.where(diff > 0, s * centred, s_below * centred)
        return np.power(10.0, phi)

    return assign


def normalize_factors(factors: np.ndarray, normalize: str | None) -> np.ndarray:
    """Apply ``normalize`` (see :data:`NORMALIZE`) to 1-D factors. With ``"mean"``, the finite
    factors > 0 are divided by their mean (the others are left for the caller to reject)."""
    if normalize in (None, "none") or factors.size == 0:
        return factors
    valid = np.isfinite(factors) & (factors > 0)
    if not valid.any():
        return factors
    out = factors.copy()
    out[valid] = factors[valid] / factors[valid].mean()
    return out


def check_normalize(normalize: Any) -> str:
    """``normalize`` as one of :data:`NORMALIZE` (None is ``"none"``); else ConfigError."""
    value = "none" if normalize is None else normalize
    if value not in NORMALIZE:
        raise ConfigError(f"normalize={normalize!r} is not one of {NORMALIZE} (or None)")
    return value


def takes_names(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` accepts a keyword argument ``names`` (the layer names of its values)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    p = parameters.get("names")
    return p is not None and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)


def _resolve(name: str) -> str:
    key = ASSIGN_ALIASES.get(name, name)
    if key not in ASSIGN_FUNCTIONS:
        accepted = sorted(ASSIGN_FUNCTIONS) + sorted(ASSIGN_ALIASES)
        raise ConfigError(f"assign={name!r} is not a known assignment function; accepted: {accepted}, or a callable")
    return key


def assign_options(name: str) -> tuple[str, ...]:
    """The keyword options the named assignment function accepts."""
    factory = ASSIGN_FUNCTIONS[_resolve(name)]
    return tuple(
        p.name for p in inspect.signature(factory).parameters.values() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    )


def create_assign(assign: str | Callable[[np.ndarray], Any] = "linear", **options: Any) -> AssignFn:
    """Build an assignment function.

    Args:
        assign: a registered name (``"linear"`` (default), ``"sqrt"``, ``"log2"``, ``"step"``,
            ``"sigmoid"``, or the reference's ``"tb_linear_map"``, ``"tb_sqrt"``, ...) or a callable
            ``fn(values: np.ndarray) -> sequence of factors`` (used as is; options not allowed).
        **options: the factory's options (``s1``, ``s2``, ``endpoint``, ``tau``, ``s``, ...).

    Raises:
        ConfigError: unknown name, an option the function does not take, or a bad value.
    """
    if callable(assign) and not isinstance(assign, str):
        if options:
            raise ConfigError(f"options {sorted(options)} apply only to named assign functions, not to a callable")
        return assign  # type: ignore[return-value]
    if not isinstance(assign, str):
        raise ConfigError(f"assign={assign!r} must be a name or a callable")
    key = _resolve(assign)
    accepted = assign_options(key)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"assign={assign!r} does not take {unknown}; it accepts {list(accepted) or 'no options'}")
    return ASSIGN_FUNCTIONS[key](**options)


# --- metrics ------------------------------------------------------------------------------

MetricFn = Callable[[Any], float]
"""``fn(record) -> float``: one number from a :class:`tempbalance.LayerRecord`."""

METRICS: dict[str, MetricFn] = {
    "alpha": lambda r: r.alpha,
    "alpha_weighted": lambda r: r.alpha_weighted,
    "spectral_norm": lambda r: r.lambda_max,
    "log_spectral_norm": lambda r: r.log_spectral_norm,
    "stable_rank": lambda r: r.stable_rank,
}
METRIC_ALIASES = {"alphahat": "alpha_weighted", "lambda_max": "spectral_norm"}


def register_metric(name: str, fn: MetricFn) -> None:
    """Make ``fn(record) -> float`` schedulable as ``metric=name``."""
    if not isinstance(name, str) or not name or not callable(fn):
        raise TypeError("register_metric(name, fn) expects a non-empty name and a callable")
    METRICS[name] = fn


def get_metric(metric: str | MetricFn) -> tuple[str, MetricFn]:
    """``(name, fn)`` for a registered metric name or alias, or for a callable ``fn(record)``."""
    if callable(metric) and not isinstance(metric, str):
        return getattr(metric, "__name__", "custom"), metric
    key = METRIC_ALIASES.get(metric, metric) if isinstance(metric, str) else metric
    if key not in METRICS:
        accepted = sorted(METRICS) + sorted(METRIC_ALIASES)
        raise ConfigError(f"metric={metric!r} is not a known metric; accepted: {accepted}, or a callable fn(record)")
    return key, METRICS[key]
