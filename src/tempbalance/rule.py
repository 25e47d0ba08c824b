"""The rule: one measurement of the balanced layers -> one factor per layer for each target.

Each layer's metric (alpha by default; the mean over its parts for a split q/k/v projection) goes
through the target's assignment function, optionally normalised to mean 1. A layer whose metric
is not finite, or that gets a factor that is not finite and > 0, keeps factor 1, with the
reason recorded: a rate or a weight decay is never NaN. (A factor must be finite and > 0.)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .assign import assign_options, check_normalize, check_range, create_assign, get_metric, normalize_factors, takes_names
from .errors import ConfigError
from .targets import Target

__all__ = ["Assignment", "build_assignment", "Evaluation", "BalanceRule"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Assignment:
    """How one target's factors come from the metric values.

    Attributes:
        target: what the factors are applied to.
        fn: ``fn(values)`` or ``fn(values, names=...)`` -> factors.
        named: ``fn`` takes the layer names (keyword ``names``).
        normalize: ``"none"`` or ``"mean"`` (see :data:`tempbalance.assign.NORMALIZE`).
    """

    target: Target
    fn: Callable[..., Any]
    named: bool
    normalize: str = "none"

    def __call__(self, values: np.ndarray, names: Sequence[str]) -> np.ndarray:
        raw = self.fn(values, names=list(names)) if self.named else self.fn(values)
        raw = np.asarray(raw, dtype=np.float64).reshape(-1)
        if raw.shape[0] != values.shape[0]:
            raise ValueError(f"the assign function returned {raw.shape[0]} factors for {values.shape[0]} layers")
        return normalize_factors(raw, self.normalize)


def build_assignment(
    target: Target, assign: Any, s1: Any, s2: Any, extra: Any, normalize: Any = None, names: tuple[str, str] = ("s1", "s2")
) -> Assignment:
    """An :class:`Assignment` from the scheduler's options.

    ``s1`` / ``s2`` (named ``names`` in messages) are validated whatever the function, and given
    to the functions that take them (``"linear"``, ``"step"``); ``extra`` holds the function's
    other options.
    """
    if not isinstance(extra, dict):
        raise ConfigError(f"{'assign_options' if names[0] == 's1' else 'wd_assign_options'}={extra!r} must be a dict")
    options = dict(extra)
    given = {k: v for k, v in (("s1", s1), ("s2", s2)) if v is not None}
    if given:
        bounds = {**{k: v for k, v in extra.items() if k in ("s1", "s2")}, **given}
        check_range(bounds.get("s1", 0.5), bounds.get("s2", 1.5), names)
        for key in given:
            if key in options:
                raise ConfigError(f"{names[key == 's2']} given both directly and in the assign options")
        accepted = assign_options(assign) if isinstance(assign, str) else ()
        options.update({k: v for k, v in given.items() if k in accepted})
        ignored = sorted(set(given) - set(accepted))
        if ignored:
            logger.debug("TempBalance: %s not used by assign=%r", ignored, assign)
    fn = create_assign(assign, **options)
    return Assignment(target, fn, takes_names(fn), check_normalize(normalize))


@dataclass
class Evaluation:
    """The rule applied to one measurement (arrays in layer order).

    Attributes:
        alphas: each layer's alpha (mean over its parts).
        values: each layer's metric value.
        factors: ``{target name: factors}``.
        reasons: why a layer keeps factor 1 (None when it does not).
    """

    alphas: np.ndarray
    values: np.ndarray
    factors: dict[str, np.ndarray]
    reasons: list[str | None]


def _nanmean(values: Sequence[float]) -> float:
    finite = [float(v) for v in values if not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else float("nan")


class BalanceRule:
    """Metric -> factors for every balanced target.

    Args:
        metric: a metric name (see :func:`tempbalance.assign.get_metric`) or ``fn(record) -> float``.
        assignments: one :class:`Assignment` per target.
    """

    def __init__(self, metric: Any, assignments: Sequence[Assignment]) -> None:
        self.metric_name, self._metric = get_metric(metric)
        self.assignments = list(assignments)

    def _layer_value(self, parts: Sequence[Any]) -> tuple[float, float, str | None]:
        """(alpha, metric, failure reason) of one layer from the records of its parts."""
        if len(parts) == 1:
            (r,) = parts
            return float(r.alpha), float(self._metric(r)), r.reason
        reason = next((r.reason for r in parts if r.reason is not None), None)
        return _nanmean([r.alpha for r in parts]), _nanmean([float(self._metric(r)) for r in parts]), reason

    def evaluate(self, records_by_layer: Sequence[Sequence[Any]], names: Sequence[str]) -> Evaluation:
        """Apply the rule to the records of each layer (one list per layer, in ``names`` order)."""
        measured = [self._layer_value(parts) for parts in records_by_layer]
        alphas = np.array([m[0] for m in measured], dtype=np.float64)
        values = np.array([m[1] for m in measured], dtype=np.float64)
        ok = np.isfinite(values)
        reasons: list[str | None] = [
            None if ok[i] else (measured[i][2] or f"{self.metric_name} is not finite") for i in range(len(measured))
        ]
        kept = [name for name, good in zip(names, ok) if good]
        factors: dict[str, np.ndarray] = {}
        for assignment in self.assignments:
            out = np.ones(len(measured), dtype=np.float64)
            if ok.any():
                out[ok] = assignment(values[ok].copy(), kept)
            bad = ~np.isfinite(out) | (out <= 0)
            for i in np.flatnonzero(bad):
                what = "factor" if assignment.target.name == "lr" else f"{assignment.target.label} factor"
                reasons[i] = f"assign function gave {what} {out[i]!r}"
                out[i] = 1.0
            factors[assignment.target.name] = out
        return Evaluation(alphas, values, factors, reasons)
