"""A plan bound to an optimizer: the plan from the selection the groups record, and for the
drop-in mode the surgery that splits an optimizer's groups into one group per balanced layer
(each keeping its group's options) and re-indexes the base scheduler's per-group lists; the
optimizer chain of wrappers (Lookahead, ...) that share those groups.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .groups import LAYER_KEY, SELECTION_KEY, audit_groups, group_selection
from .plan import BalancePlan, LayerSelection, plan_balance

__all__ = [
    "NOT_IN_OPTIMIZER", "check_base_scheduler", "optimizer_chain", "hookable_optimizer", "scheduler_tree",
    "split_groups", "plan_for_optimizer",
]

NOT_IN_OPTIMIZER = ("error", "skip")

logger = logging.getLogger(__name__)

# Per-parameter-group lists kept by torch's schedulers, re-indexed when groups are split.
_PER_GROUP_ATTRS = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs", "base_momentums", "max_momentums")


def optimizer_chain(optimizer: Any) -> list[Any]:
    """The optimizer and the optimizers it wraps (timm / torch-optimizer Lookahead, ...)."""
    chain, seen = [optimizer], {id(optimizer)}
    current = optimizer
    while True:
        inner = None
        for attr in ("_base_optimizer", "base_optimizer", "optimizer", "_optimizer"):
            candidate = getattr(current, attr, None)
            if candidate is not None and hasattr(candidate, "param_groups") and id(candidate) not in seen:
                inner = candidate
                break
        if inner is None:
            return chain
        chain.append(inner)
        seen.add(id(inner))
        current = inner


def hookable_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer of the chain that takes step pre-hooks (the one that updates
    the parameters, so its hook runs before every parameter update), or None."""
    for candidate in reversed(optimizer_chain(optimizer)):
        if callable(getattr(candidate, "register_step_pre_hook", None)):
            return candidate
    return None


def scheduler_tree(scheduler: Any) -> list[Any]:
    """A scheduler and every scheduler it drives (SequentialLR, ChainedScheduler), depth first."""
    out = [scheduler]
    for child in getattr(scheduler, "_schedulers", None) or []:
        out.extend(scheduler_tree(child))
    return out


def _state_is_empty(optimizer: Any) -> bool:
    return all(len(getattr(o, "state", {}) or {}) == 0 for o in optimizer_chain(optimizer))


def _new_groups(old: list[dict[str, Any]], plan: BalancePlan) -> tuple[list[dict[str, Any]], list[int]]:
    """The split groups, and for each the index of the group it came from."""
    owner = plan.owner_by_param()
    recorded = plan.selection.to_plain()
    multi = len(old) > 1
    new: list[dict[str, Any]] = []
    source: list[int] = []
    for gi, group in enumerate(old):
        options = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        params = list(group["params"])
        pnames = group.get("param_names")
        buckets: dict[str | None, list[int]] = {}
        for i, p in enumerate(params):
            buckets.setdefault(owner.get(id(p)), []).append(i)
        gname = group.get("name")
        for layer in [*plan.names, None]:
            idx = buckets.get(layer)
            if not idx:
                continue
            ng = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
            ng["params"] = [params[i] for i in idx]
            if pnames is not None:
                ng["param_names"] = [pnames[i] for i in idx]
            if layer is None:
                ng["name"] = gname if gname is not None else ("rest" if not multi else f"rest.group{gi}")
            else:
                ng["name"] = layer if not multi else f"{layer}.{gname if gname is not None else f'group{gi}'}"
                ng[LAYER_KEY] = layer
            ng[SELECTION_KEY] = dict(recorded)
            new.append(ng)
            source.append(gi)
    return new, source


def split_groups(optimizer: Any, plan: BalancePlan, base_scheduler: Any = None) -> None:
    """Split each of ``optimizer``'s groups into per-layer groups with the same options, in every
    optimizer of its chain, and re-index the per-group lists of ``base_scheduler`` (and of the
    schedulers it drives) to the new groups.

    Raises:
        ConfigError: the optimizer has state already (it stepped or loaded a checkpoint), or a
            scheduler list cannot be re-indexed.
    """
    if not _state_is_empty(optimizer):
        raise ConfigError(
            "the optimizer has no per-layer parameter groups and its state is not empty (it has "
            "stepped or loaded a checkpoint), so TempBalance cannot split its groups safely. Build it "
            "from tempbalance.param_groups(model, ...) instead of model.parameters(), e.g. "
            "torch.optim.SGD(tempbalance.param_groups(model), lr=0.1, momentum=0.9), or construct "
            "TempBalance before the first step and before loading the optimizer's state."
        )
    old = list(optimizer.param_groups)
    new, source = _new_groups(old, plan)
    for o in optimizer_chain(optimizer):
        if isinstance(getattr(o, "param_groups", None), list):
            o.param_groups[:] = new
    for sched in scheduler_tree(base_scheduler) if base_scheduler is not None else []:
        for attr in _PER_GROUP_ATTRS:
            values = getattr(sched, attr, None)
            if isinstance(values, list) and len(values) == len(old):
                setattr(sched, attr, [values[i] for i in source])
            elif isinstance(values, list):
                raise ConfigError(
                    f"cannot re-index {type(sched).__name__}.{attr} (length {len(values)}, optimizer had "
                    f"{len(old)} groups) after splitting groups; build the optimizer from tempbalance.param_groups(model)"
                )
    logger.info("TempBalance: split %d parameter group(s) into %d (one per balanced layer)", len(old), len(new))


def check_base_scheduler(base: Any, optimizer: Any) -> None:
    """A base scheduler must have ``step()`` and drive ``optimizer`` (or a wrapper sharing its groups)."""
    if base is None:
        return
    if not callable(getattr(base, "step", None)):
        raise ConfigError(f"base_scheduler={base!r} has no step() method")
    base_opt = getattr(base, "optimizer", None)
    shared = base_opt is optimizer or getattr(base_opt, "param_groups", None) is optimizer.param_groups
    if base_opt is not None and not shared:
        raise ConfigError("base_scheduler drives a different optimizer than the one given to TempBalance")


def plan_for_optimizer(
    model: nn.Module, optimizer: Any, base_scheduler: Any, given: dict[str, Any], *, split_qkv: bool = False,
    not_in_optimizer: str = "error",
) -> BalancePlan:
    """The balancing plan of ``model`` on ``optimizer``, its groups made to match it.

    The layer selection is the one the groups record (:func:`tempbalance.param_groups`); the
    non-None options in ``given`` must equal it. Without a recorded selection, ``given`` (over the
    defaults) is used. A plain optimizer (no group tagged for a layer) is split here
    (:func:`split_groups`).

    Args:
        not_in_optimizer: ``"error"``: a balanced layer with no parameter in the optimizer is
            refused; ``"skip"``: it is left out of the plan, with a warning.

    Raises:
        ConfigError: options that differ from the recorded ones, groups that do not match the
            plan, layers not in the optimizer (``"error"``), weights on the ``meta`` device.
    """
    if not_in_optimizer not in NOT_IN_OPTIMIZER:
        raise ConfigError(f"not_in_optimizer={not_in_optimizer!r} is not one of {NOT_IN_OPTIMIZER}")
    explicit = {k: v for k, v in given.items() if v is not None}
    recorded = group_selection(optimizer.param_groups, model)
    selection = recorded if recorded is not None else LayerSelection(**explicit)
    for key, value in explicit.items():
        if getattr(LayerSelection(**{key: value}), key) != getattr(selection, key):
            raise ConfigError(
                f"{key}={value!r} differs from the {key}={getattr(selection, key)!r} the optimizer's groups were "
                "built with (tempbalance.param_groups); give the layer selection to param_groups only"
            )
    plan = plan_balance(model, selection, split_qkv=split_qkv)
    if not plan.layers:
        logger.warning("TempBalance: no layer of %s qualifies for balancing (%s); every rate stays untuned",
                       type(model).__name__, plan.skipped)
    elif not any(LAYER_KEY in g for g in optimizer.param_groups):
        split_groups(optimizer, plan, base_scheduler)
    absent = audit_groups(optimizer.param_groups, plan)
    if absent and not_in_optimizer == "error":
        raise ConfigError(f"balanced layers {absent} have no parameter in the optimizer; add them, or pass "
                          "not_in_optimizer='skip' to leave them out of the balance")
    if absent:
        logger.warning("TempBalance: layers %s have no parameter in the optimizer; left out of the balance", absent)
        plan = plan.without(absent, "not in the optimizer")
    on_meta = [layer.name for layer in plan.layers if layer.ref.weight.device.type == "meta"]
    if on_meta:
        raise ConfigError(f"the weights of {on_meta} are on the meta device (not materialised); TempBalance measures "
                          "them: move the model to a real device and load its weights first (model.to_empty(...))")
    return plan
