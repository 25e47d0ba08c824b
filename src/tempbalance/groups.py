"""Optimizer parameter groups for balancing: one group per balanced layer (its parameters and its
norm layers'), the rest apart; the plan's options recorded in the groups, and the audit of an
optimizer's groups against a plan.

Plan types and norm-layer functions are re-exported here for older imports.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Iterable

from torch import nn

from .errors import ConfigError
from .layers import unwrap_model
from .norms import is_norm_type, norm_features, register_norm_type
from .plan import (
    NORM_FOLLOWS,
    SELECTION_KEYS,
    BalancedLayer,
    BalancePlan,
    LayerSelection,
    output_features,
    plan_balance,
)

__all__ = [
    "NORM_FOLLOWS",
    "SELECTION_KEYS",
    "LAYER_KEY",
    "SELECTION_KEY",
    "LayerSelection",
    "BalancedLayer",
    "BalancePlan",
    "register_norm_type",
    "norm_features",
    "output_features",
    "plan_balance",
    "param_groups",
    "group_selection",
    "audit_groups",
]

logger = logging.getLogger(__name__)

LAYER_KEY = "tb_layer"  # group -> the balanced layer whose factors it takes
SELECTION_KEY = "tb_selection"  # group -> the LayerSelection it was built with (plain values)

_NON_NEGATIVE_OPTIONS = ("lr", "weight_decay", "momentum", "dampening", "eps")


def _is_no_decay(p: nn.Parameter, norm_ids: set[int]) -> bool:
    return p.ndim <= 1 or id(p) in norm_ids


def param_groups(
    model: nn.Module,
    *,
    no_decay_norm_bias: bool = False,
    remove_first: bool = True,
    remove_last: bool = True,
    eigs_thresh: int = 50,
    norm_follows: str | None = "order",
    types: Iterable[type] | None = None,
    conv_mode: str = "per_position",
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for TempBalance: one group per balanced layer, the rest apart.

    Pass the result to any optimizer in place of ``model.parameters()``::

        optimizer = torch.optim.SGD(tempbalance.param_groups(model, weight_decay=5e-4),
                                    lr=0.1, momentum=0.9)

    The layer selection is given here only: every group records it (``"tb_selection"``, plain
    values) and :class:`tempbalance.TempBalance` reads it back.

    Args:
        model: the model (wrappers are unwrapped; every parameter appears exactly once, as in
            ``model.parameters()``, frozen ones included).
        no_decay_norm_bias: put biases, norm parameters and every other parameter with fewer
            than two dimensions in separate groups with ``weight_decay=0.0``.
        remove_first: leave the first analysable layer at the global rate (the selection options
            are those of :class:`LayerSelection`).
        remove_last: leave the last analysable layer at the global rate.
        eigs_thresh: balance only layers with at least this many eigenvalues.
        norm_follows: which layer a norm layer follows: ``"order"``, ``"name"`` or None.
        types: the module types considered (default: every analysable type).
        conv_mode: ``"per_position"`` or ``"flatten"`` conv matrices.
        **group_options: options copied into every group (``lr``, ``weight_decay``,
            ``momentum``, ...); they override the optimizer's defaults.

    Returns:
        A list of dicts. Each balanced layer's group has ``"name"`` and ``"tb_layer"`` set to
        the layer's module name (its no-decay group, if any, is named ``"<layer>.no_decay"``);
        the remaining parameters form the group ``"rest"`` (and ``"rest.no_decay"``). Empty
        groups are left out.
    """
    if not isinstance(no_decay_norm_bias, bool):
        raise ConfigError(f"no_decay_norm_bias={no_decay_norm_bias!r} must be True or False")
    for key in ("params", "name", LAYER_KEY, SELECTION_KEY):
        if key in group_options:
            raise ConfigError(f"param_groups() sets {key!r} itself; do not pass it as a group option")
    for key in _NON_NEGATIVE_OPTIONS:
        value = group_options.get(key)
        if isinstance(value, numbers.Real) and not (math.isfinite(value) and value >= 0):
            # torch validates these only in an optimizer's defaults, never in per-group options
            raise ConfigError(f"{key}={value!r} must be a finite number >= 0")
    selection = LayerSelection(
        remove_first=remove_first, remove_last=remove_last, eigs_thresh=eigs_thresh,
        norm_follows=norm_follows, types=types, conv_mode=conv_mode,
    )
    plan = plan_balance(model, selection)
    recorded = selection.to_plain()
    groups: list[dict[str, Any]] = []
    no_decay_options = {**group_options, "weight_decay": 0.0}

    def add(params: list[nn.Parameter], name: str, layer: str | None, options: dict[str, Any]) -> None:
        if not params:
            return
        group: dict[str, Any] = {"params": params, "name": name, **options}
        if layer is not None:
            group[LAYER_KEY] = layer
        group[SELECTION_KEY] = dict(recorded)
        groups.append(group)

    claimed: set[int] = set()
    for layer in plan.layers:
        claimed.update(id(p) for p in layer.params)
        if no_decay_norm_bias:
            norm_ids = {id(p) for p in layer.norm_params}
            add([p for p in layer.params if not _is_no_decay(p, norm_ids)], layer.name, layer.name, group_options)
            add([p for p in layer.params if _is_no_decay(p, norm_ids)], f"{layer.name}.no_decay", layer.name, no_decay_options)
        else:
            add(list(layer.params), layer.name, layer.name, group_options)

    unwrapped = unwrap_model(model)
    norm_ids = {id(p) for module in unwrapped.modules() if is_norm_type(module) for p in module.parameters(recurse=False)}
    rest = [p for p in unwrapped.parameters() if id(p) not in claimed]
    if no_decay_norm_bias:
        add([p for p in rest if not _is_no_decay(p, norm_ids)], "rest", None, group_options)
        add([p for p in rest if _is_no_decay(p, norm_ids)], "rest.no_decay", None, no_decay_options)
    else:
        add(rest, "rest", None, group_options)
    if not plan.layers:
        logger.warning("param_groups: no layer of %s qualifies for balancing; %s", type(unwrapped).__name__, plan.skipped)
    return groups


def group_selection(groups: list[dict[str, Any]], model: nn.Module) -> LayerSelection | None:
    """The :class:`LayerSelection` recorded in ``groups`` by :func:`param_groups`, or None.

    Raises:
        ConfigError: the groups record different selections.
    """
    recorded = [g[SELECTION_KEY] for g in groups if isinstance(g.get(SELECTION_KEY), dict)]
    if not recorded:
        return None
    if any(r != recorded[0] for r in recorded):
        raise ConfigError("the optimizer's parameter groups were built with different layer selections; "
                          "build them with one call of tempbalance.param_groups(model, ...)")
    return LayerSelection.from_plain(recorded[0], model)


def audit_groups(groups: list[dict[str, Any]], plan: BalancePlan) -> list[str]:
    """Check that every parameter sits in a group tagged for the layer that owns it.

    Returns:
        The plan's layers none of whose parameters is in any group (not in the optimizer).

    Raises:
        ConfigError: a group tagged for a layer the plan does not balance, a parameter in a
            group of another layer, or repeated group names (all problems listed).
    """
    expected = plan.owner_by_param()
    balanced = set(plan.names)
    problems: list[str] = []
    names: dict[str, int] = {}
    present: set[str] = set()
    for group in groups:
        layer = group.get(LAYER_KEY)
        if layer is not None:
            name = group.get("name", layer)
            names[name] = names.get(name, 0) + 1
            if layer not in balanced:
                problems.append(f"group {name!r} is tagged for layer {layer!r}, which these options do not balance")
                continue
        for p in group["params"]:
            want = expected.get(id(p))
            if want is not None:
                present.add(want)
            if want != layer:
                problems.append(f"a parameter of {want or 'the unbalanced rest'} sits in a group for {layer or 'the rest'}")
                break
    dupes = sorted(n for n, c in names.items() if c > 1)
    if dupes:
        problems.append(f"balanced groups need distinct 'name's; repeated: {dupes}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise ConfigError(
            "the optimizer's parameter groups do not match the layers TempBalance balances with these options: "
            f"{shown}. Build the groups with tempbalance.param_groups(model, ...) and give the layer selection "
            "(remove_first, remove_last, eigs_thresh, norm_follows, types, conv_mode) there only."
        )
    return [name for name in plan.names if name not in present]
