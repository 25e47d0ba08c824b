"""The record of every rebalance (per layer: alpha, metric, factors, the values set) and the
checks a saved scheduler state must pass before it is loaded.

A state belongs to a scheduler when it balances the same layers (same names, same weight shapes)
on an optimizer with the same number of parameter groups, the same targets, and holds only
finite factors > 0 and finite untuned values >= 0. States of version 1 (0.1) lack the shapes and
are checked on everything else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .errors import ConfigError

__all__ = ["LayerBalance", "Rebalance", "STATE_VERSION", "TARGET_STATE_KEYS", "check_state", "upgrade_config"]

STATE_VERSION = 2

#: state keys of each target: (factors by layer, untuned values by group name)
TARGET_STATE_KEYS = {"lr": ("factors", "untuned_lr"), "weight_decay": ("weight_decay_factors", "untuned_weight_decay")}

# Per-group lists in torch schedulers' states (compared with the number of groups).
_PER_GROUP_STATE = ("base_lrs", "_last_lr", "min_lrs", "max_lrs", "base_momentums", "max_momentums")

# Options added after version 1, with the values version 1 always had.
_CONFIG_DEFAULTS = {
    "balance": ["lr"], "wd_assign": "linear", "wd_s1": None, "wd_s2": None, "wd_assign_options": {}, "normalize": "none",
}


@dataclass
class LayerBalance:
    """One layer at one rebalance.

    Attributes:
        layer: module name.
        alpha: its power-law exponent (NaN when the fit failed; the mean over its parts for a
            split q/k/v projection).
        metric: the scheduled metric's value (equals ``alpha`` for ``metric="alpha"``).
        factor: its learning-rate factor (1.0 when the metric is not finite, or when the rate
            is not balanced).
        lr: the rate set for it at this rebalance (untuned rate x factor).
        reason: why it kept factor 1, or None.
        weight_decay_factor: its weight-decay factor (None when weight decay is not balanced).
        weight_decay: the weight decay set for it (untuned x factor; None when not balanced).
    """

    layer: str
    alpha: float
    metric: float
    factor: float
    lr: float
    reason: str | None = None
    weight_decay_factor: float | None = None
    weight_decay: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; the weight-decay ones only when weight decay is balanced."""
        d = asdict(self)
        if self.weight_decay_factor is None:
            del d["weight_decay_factor"], d["weight_decay"]
        return d


@dataclass
class Rebalance:
    """One rebalance: the scheduler step whose weights were measured (0 = construction), every
    layer, and ``lag_steps``: optimizer updates made with the old factors between that
    measurement's snapshot and its factors taking effect (0 in the synchronous mode)."""

    step: int
    layers: list[LayerBalance] = field(default_factory=list)
    lag_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "layers": [x.to_dict() for x in self.layers], "lag_steps": self.lag_steps}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Rebalance":
        return cls(int(d["step"]), [LayerBalance(**x) for x in d["layers"]], int(d.get("lag_steps", 0)))

    @classmethod
    def of(
        cls, step: int, names: Sequence[str], result: Any, untuned: dict[str, dict[str, float]], lag_steps: int
    ) -> "Rebalance":
        """The record of one rebalance.

        Args:
            step: the scheduler step measured.
            names: the balanced layers.
            result: the rule's :class:`tempbalance.rule.Evaluation` (alphas, values, factors by
                target name, reasons).
            untuned: ``{target name: {layer: untuned value}}``; for ``"lr"`` when the rate is not
                balanced, the rate now set (its factor is then 1).
            lag_steps: see :class:`Rebalance`.
        """
        lr_f, wd_f = result.factors.get("lr"), result.factors.get("weight_decay")
        wd = untuned.get("weight_decay")
        return cls(step, [
            LayerBalance(
                name, float(result.alphas[i]), float(result.values[i]),
                1.0 if lr_f is None else float(lr_f[i]),
                untuned["lr"][name] * (1.0 if lr_f is None else float(lr_f[i])),
                result.reasons[i],
                None if wd_f is None else float(wd_f[i]),
                None if wd is None else wd[name] * float(wd_f[i]),
            )
            for i, name in enumerate(names)
        ], lag_steps)


def upgrade_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """A saved options dict with the options added since version 1 filled in."""
    return {**_CONFIG_DEFAULTS, **(config or {})}


def _names(names: Sequence[str]) -> str:
    shown = list(names)[:6]
    return ", ".join(shown) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")


def _check_layers(saved: Sequence[str], layers: Sequence[str], what: str) -> None:
    missing, extra = [n for n in layers if n not in saved], [n for n in saved if n not in layers]
    if missing or extra:
        raise ConfigError(
            f"this TempBalance state belongs to another model or layer selection: {what} "
            + "; ".join(
                part for part in (
                    f"lacks balanced layers {_names(missing)}" if missing else "",
                    f"has layers this scheduler does not balance: {_names(extra)}" if extra else "",
                ) if part
            )
        )


def _check_values(values: Any, key: str, low_open: bool) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"TempBalance state: {key!r} must be a dict, got {type(values).__name__}")
    for name, value in values.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (value <= 0 if low_open else value < 0):
            rule = "finite and > 0" if low_open else "finite and >= 0"
            raise ConfigError(f"TempBalance state: {key}[{name!r}] = {value!r}; every value must be {rule}")


def _check_base_lists(state: Any, groups: int, where: str = "base_scheduler") -> None:
    if not isinstance(state, dict):
        return
    for key in _PER_GROUP_STATE:
        values = state.get(key)
        if isinstance(values, list) and len(values) != groups:
            raise ConfigError(
                f"this TempBalance state belongs to an optimizer with {len(values)} parameter groups "
                f"({where}.{key}), this one has {groups}"
            )
    for i, child in enumerate(state.get("_schedulers") or []):
        _check_base_lists(child, groups, f"{where}._schedulers[{i}]")


def check_state(state: Any, layers: dict[str, tuple[int, ...]], groups: int, balance: Sequence[str]) -> int:
    """Check that ``state`` (a TempBalance ``state_dict``) belongs to this scheduler.

    Args:
        state: the state to check.
        layers: ``{balanced layer: weight shape}`` of this scheduler's plan, in order.
        groups: number of parameter groups of its optimizer.
        balance: the targets it balances (``"lr"``, ``"weight_decay"``).

    Returns:
        The state's version (1 or 2).

    Raises:
        ConfigError: naming the first mismatch or bad value.
    """
    version = state.get("version") if isinstance(state, dict) else None
    if version not in (1, STATE_VERSION):
        raise ConfigError(f"not a TempBalance state_dict (version 1 or {STATE_VERSION} expected, got {version!r})")
    saved_balance = list(state.get("balance", ["lr"]))
    if saved_balance != list(balance):
        raise ConfigError(f"this TempBalance state balances {saved_balance}, this scheduler {list(balance)}")
    plan = state.get("plan") or {}
    factors_key = TARGET_STATE_KEYS[balance[0]][0] if balance else "factors"
    saved_layers = list(plan.get("layers", state.get(factors_key, {})))
    _check_layers(saved_layers, list(layers), "it")
    for name, shape in (plan.get("shapes") or {}).items():
        if tuple(shape) != tuple(layers[name]):
            raise ConfigError(
                f"this TempBalance state belongs to another model: layer {name!r} has weight shape "
                f"{tuple(shape)} there, {tuple(layers[name])} here"
            )
    if "groups" in plan and plan["groups"] != groups:
        raise ConfigError(
            f"this TempBalance state belongs to an optimizer with {plan['groups']} parameter groups, this one has {groups}"
        )
    _check_base_lists(state.get("base_scheduler"), groups)
    for target in balance:
        factors_key, untuned_key = TARGET_STATE_KEYS[target]
        _check_values(state.get(factors_key, {}), factors_key, low_open=True)
        _check_values(state.get(untuned_key, {}), untuned_key, low_open=False)
    for entry in state.get("history", []):
        _check_layers([x["layer"] for x in entry.get("layers", [])], list(layers), f"its history (step {entry.get('step')})")
    return int(version)
