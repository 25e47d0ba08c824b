"""What a balancing factor is written on top of: a group option (the learning rate, the weight
decay) whose *untuned* value is kept apart from the factor, so that ``option = untuned x factor``.

Each balanced group holds, per target, its untuned value and its factor. Before the base
scheduler steps, the untuned values are put back; after it, they are read again and the factors
applied: a recursive schedule never sees a factor and one that recomputes from ``base_lrs``
never erases one. A value found changed from outside is taken as the new untuned value.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import ConfigError
from .groups import LAYER_KEY
from .history import TARGET_STATE_KEYS

__all__ = ["Target", "LR", "WEIGHT_DECAY", "TARGETS", "resolve_balance", "BalancedGroups"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One group option that factors are applied to.

    Attributes:
        name: the option (``"lr"``, ``"weight_decay"``), also the name used in ``balance=``.
        label: how messages call it.
        untuned_key: the group key of the untuned value.
        factor_key: the group key of the factor.
    """

    name: str
    label: str
    untuned_key: str
    factor_key: str

    def read(self, group: dict[str, Any]) -> float:
        value = group[self.name]
        return float(value.item()) if isinstance(value, torch.Tensor) else float(value)

    def write(self, group: dict[str, Any], value: float) -> None:
        if isinstance(group[self.name], torch.Tensor):
            group[self.name].fill_(value)
        else:
            group[self.name] = value

    def expected(self, group: dict[str, Any]) -> float:
        return group[self.untuned_key] * group[self.factor_key]

    def consistent(self, group: dict[str, Any]) -> bool:
        """The option equals untuned x factor (to round-off), both keys present."""
        if self.untuned_key not in group or self.factor_key not in group:
            return False
        return math.isclose(self.read(group), group[self.untuned_key] * group[self.factor_key], rel_tol=1e-6, abs_tol=0.0)

    def init(self, group: dict[str, Any]) -> None:
        """Keep a consistent (untuned, factor) pair; otherwise the option is the untuned value, factor 1."""
        if not self.consistent(group):
            group[self.untuned_key], group[self.factor_key] = self.read(group), 1.0

    def apply(self, group: dict[str, Any]) -> None:
        """Set the option to untuned x factor (``write`` inlined: this runs for every group at every step)."""
        value, current = group[self.untuned_key] * group[self.factor_key], group[self.name]
        if isinstance(current, torch.Tensor):
            current.fill_(value)
        else:
            group[self.name] = value


LR = Target("lr", "learning rate", "tb_untuned_lr", "tb_factor")
WEIGHT_DECAY = Target("weight_decay", "weight decay", "tb_untuned_weight_decay", "tb_weight_decay_factor")
TARGETS = {t.name: t for t in (LR, WEIGHT_DECAY)}


def resolve_balance(balance: Any) -> tuple[Target, ...]:
    """``"lr"``, ``"weight_decay"`` or a sequence of them -> the targets, in the order above."""
    names = [balance] if isinstance(balance, str) else balance
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"balance={balance!r} must be 'lr', 'weight_decay' or a sequence of them")
    unknown = [n for n in names if n not in TARGETS]
    if unknown or len(set(names)) != len(names):
        raise ConfigError(f"balance={balance!r}: each of {list(TARGETS)} at most once")
    return tuple(t for t in TARGETS.values() if t.name in names)


class BalancedGroups:
    """The balanced groups of an optimizer (tagged ``tb_layer``) and the factors on them."""

    def __init__(self, optimizer: Any, targets: Sequence[Target]) -> None:
        self.optimizer = optimizer
        self.targets = tuple(targets)
        self._warned: set[str] = set()
        for target in self.targets:
            missing = [g.get("name") for g in self.groups() if target.name not in g]
            if missing:
                raise ConfigError(f"cannot balance {target.label}: groups {missing} have no {target.name!r} option")
        for group in self.groups():
            for target in self.targets:
                target.init(group)

    def groups(self) -> list[dict[str, Any]]:
        return [g for g in self.optimizer.param_groups if LAYER_KEY in g]

    def adopt_outside_changes(self) -> None:
        """Take an option changed from outside TempBalance as the group's new untuned value."""
        for group in self.groups():
            for target in self.targets:
                if target.consistent(group):
                    continue
                if target.untuned_key not in group or target.factor_key not in group:
                    target.init(group)
                else:
                    self._warn_once(target, group)
                    group[target.untuned_key] = target.read(group)

    def _warn_once(self, target: Target, group: dict[str, Any]) -> None:
        if target.name in self._warned:
            return
        self._warned.add(target.name)
        logger.warning(
            "TempBalance: the %s of group %r was changed outside TempBalance (expected %.6g, found %.6g); taking "
            "it as the new untuned value. Pass your scheduler as base_scheduler= and step only TempBalance, or "
            "set rates with set_untuned_lr().",
            target.label, group.get("name"), target.expected(group), target.read(group),
        )

    def restore_untuned(self) -> None:
        """Every option to its untuned value (for the base scheduler to step); undo with :meth:`recapture`."""
        for group in self.groups():
            for target in self.targets:
                target.write(group, group[target.untuned_key])

    def recapture(self) -> None:
        """The values now set (by the base scheduler) become the untuned ones; factors applied again."""
        for group in self.groups():
            for target in self.targets:
                group[target.untuned_key] = target.read(group)
                target.apply(group)

    def apply(self) -> None:
        for group in self.groups():
            for target in self.targets:
                target.apply(group)

    def set_factors(self, target: Target, by_layer: dict[str, float]) -> dict[str, float]:
        """Write ``{layer: factor}`` into the groups; returns ``{layer: untuned value}`` (first group)."""
        untuned: dict[str, float] = {}
        for group in self.groups():
            layer = group[LAYER_KEY]
            group[target.factor_key] = by_layer[layer]
            untuned.setdefault(layer, group[target.untuned_key])
        return untuned

    def set_untuned(self, target: Target, value: float) -> None:
        """Set the untuned value of every group of the optimizer (factors kept; a group that is
        not balanced, or a target that is not, just gets ``value``)."""
        for group in self.optimizer.param_groups:
            balanced = LAYER_KEY in group and target in self.targets
            if balanced:
                group[target.untuned_key] = value
            target.write(group, value * group.get(target.factor_key, 1.0) if balanced else value)

    def factors(self, target: Target) -> dict[str, float]:
        """``{layer: factor}`` (1.0 for a target that is not balanced)."""
        out: dict[str, float] = {}
        for group in self.groups():
            out.setdefault(group[LAYER_KEY], float(group.get(target.factor_key, 1.0)) if target in self.targets else 1.0)
        return out

    def values(self, target: Target) -> dict[str, float]:
        """``{layer: the option's value now}`` (of its first group)."""
        out: dict[str, float] = {}
        for group in self.groups():
            out.setdefault(group[LAYER_KEY], target.read(group))
        return out

    def state_dict(self) -> dict[str, dict[str, float]]:
        """Per balanced target: ``{layer: factor}`` and ``{group name: untuned value}``, under the
        keys of :data:`tempbalance.history.TARGET_STATE_KEYS`."""
        state: dict[str, dict[str, float]] = {}
        for target in self.targets:
            factors_key, untuned_key = TARGET_STATE_KEYS[target.name]
            state[factors_key] = self.factors(target)
            state[untuned_key] = {g.get("name", g[LAYER_KEY]): g[target.untuned_key] for g in self.groups()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put saved factors (by layer) and untuned values (by group name) back."""
        for target in self.targets:
            factors_key, untuned_key = TARGET_STATE_KEYS[target.name]
            factors, untuned = state.get(factors_key, {}), state.get(untuned_key, {})
            for group in self.groups():
                name = group.get("name", group[LAYER_KEY])
                if name in untuned:
                    group[target.untuned_key] = float(untuned[name])
                if group[LAYER_KEY] in factors:
                    group[target.factor_key] = float(factors[group[LAYER_KEY]])
