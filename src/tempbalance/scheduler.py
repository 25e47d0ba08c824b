"""``TempBalance``: per-layer factors from weight spectra on top of any schedule, for the
learning rate (TempBalance), the weight decay (AlphaDecay) or both (torch's LRScheduler contract).

A thin composition of the balancing core: the plan (:mod:`tempbalance.plan`), the optimizer's
groups and the targets the factors ride on (:mod:`tempbalance.targets`), the measurement
(:mod:`tempbalance.measure`), the rule (:mod:`tempbalance.rule`) and the history and its saved
state (:mod:`tempbalance.history`).
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import fields
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from .analysis import AnalysisOptions, LayerRecord
from .errors import ConfigError
from .history import STATE_VERSION, LayerBalance, Rebalance, check_state, upgrade_config
from .measure import MeasurementRuns
from .regroup import check_base_scheduler, plan_for_optimizer
from .rule import BalanceRule, build_assignment
from .targets import LR, WEIGHT_DECAY, BalancedGroups, resolve_balance

__all__ = ["TempBalance", "LayerBalance", "Rebalance"]

logger = logging.getLogger(__name__)

_ANALYSIS_KEYS = tuple(f.name for f in fields(AnalysisOptions) if f.name not in ("fit", "conv_mode", "keep_eigenvalues"))


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _label(fn: Any) -> str:
    return fn if isinstance(fn, str) else getattr(fn, "__name__", "custom")


def _analysis_options(fit: str, conv_mode: str, options: dict[str, Any]) -> AnalysisOptions:
    unknown = sorted(set(options) - set(_ANALYSIS_KEYS))
    if unknown:
        raise TypeError(f"TempBalance got unknown option(s) {unknown}; analysis options accepted: {list(_ANALYSIS_KEYS)}")
    try:
        return AnalysisOptions(fit=fit, conv_mode=conv_mode, **{"precision": "float64", **options})
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _count(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(f"{key}={value!r} must be an integer >= {low}")
    return int(value)


class TempBalance(LRScheduler):
    """Layer-wise learning rates (and/or weight decays) from heavy-tailed weight spectra, on top of any schedule.

    Typical use (the three added lines marked)::

        optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1,       # (1)
                                    momentum=0.9, weight_decay=5e-4)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        scheduler = tempbalance.TempBalance(model, optimizer, cosine)              # (2)
        for epoch in range(epochs):
            train_one_epoch(model, optimizer)
            scheduler.step()                                                       # (3)

    Each balanced layer ``i`` gets ``lr_i = untuned_lr * factor_i`` and/or ``weight_decay_i =
    untuned_weight_decay * wd_factor_i`` (AlphaDecay), the untuned values being what the schedule
    and the user set, each group's own. The factors come from one metric per layer (default: the
    median-Hill alpha) through each target's map (default: the published linear map, smallest
    alpha -> ``s1``, largest -> ``s2``), on construction (unless ``warmup``) and then every
    ``interval`` calls of :meth:`step`. A norm layer takes the factors of its layer.

    Args:
        model: the model (DDP / torch.compile wrappers are unwrapped), weights materialised.
        optimizer: a torch optimizer (or wrapper, e.g. timm's Lookahead) on
            :func:`tempbalance.param_groups`, which records the layer selection; or one on
            ``model.parameters()`` with no state yet, split here into per-layer groups.
        base_scheduler: the global schedule, constructed on ``optimizer`` (any torch scheduler);
            step only TempBalance.
        balance: ``"lr"`` (default), ``"weight_decay"`` or ``("lr", "weight_decay")``.
        assign: the rate's map: ``"linear"`` (default), ``"sqrt"``, ``"log2"``, ``"step"``,
            ``"sigmoid"``, the reference's names, ``fn(values)`` or ``fn(values, names=...)``.
        s1: the rate's smallest factor (``"linear"``, ``"step"``), default 0.5; ``0 < s1 <= s2``,
            always checked.
        s2: the rate's largest factor, default 1.5.
        assign_options: other options of the rate's map (``"step"``: ``endpoint``; ``"sigmoid"``:
            ``tau``, ``s``, ``s_below``).
        wd_assign: the weight decay's map, as ``assign`` (used when ``balance`` has ``"weight_decay"``).
        wd_s1: the weight decay's smallest factor, default 0.5.
        wd_s2: the weight decay's largest factor, default 1.5.
        wd_assign_options: other options of the weight decay's map.
        normalize: ``"mean"``: each target's factors divided by their mean; default None.
        metric: ``"alpha"`` (default), ``"alpha_weighted"``, ``"spectral_norm"``, ... or ``fn(record)``.
        interval: rebalance every ``interval`` calls of :meth:`step` (default 1).
        warmup: calls of :meth:`step` with every factor 1 before the first rebalance (default 0).
        remove_first: leave the first analysable layer at the global rate (the selection,
            :class:`tempbalance.LayerSelection`; default: the one the groups record, else the
            library's; given here too, each selection option must equal the recorded one).
        remove_last: leave the last analysable layer at the global rate.
        eigs_thresh: balance only layers with at least this many eigenvalues.
        norm_follows: which layer a norm layer follows: ``"order"``, ``"name"`` or None.
        types: the module types considered (default: every analysable type).
        conv_mode: ``"per_position"`` or ``"flatten"`` conv matrices.
        split_qkv: measure a fused q/k/v projection as its three matrices (metric: their mean).
        not_in_optimizer: ``"error"`` (default) or ``"skip"``: a balanced layer without a
            parameter in the optimizer is refused, or left out of the balance with a warning.
        fit: ``"median"`` (default), ``"ks"``, ``"fix-finger"``.
        asynchronous: measure a host copy of the weights on a worker thread; the factors land
            before the first optimizer step after it finishes (single process; not bit-for-bit
            repeatable; ``history[i].lag_steps``). Release it with :meth:`close` or ``with``.
        **analysis_options: fields of :class:`tempbalance.AnalysisOptions` (``precision`` is
            ``"float64"`` by default here).

    Attributes:
        history: one :class:`Rebalance` per rebalance.
        plan: the balanced layers, the parameters that follow each, the matrices measured.
        last_records: the analysis records of the last rebalance (one per measured matrix).
    """

    def __init__(
        self, model: nn.Module, optimizer: Any, base_scheduler: Any = None, *,
        balance: str | Iterable[str] = "lr",
        assign: str | Callable[..., Any] = "linear", s1: float | None = None, s2: float | None = None,
        assign_options: dict[str, Any] | None = None,
        wd_assign: str | Callable[..., Any] = "linear", wd_s1: float | None = None, wd_s2: float | None = None,
        wd_assign_options: dict[str, Any] | None = None,
        normalize: str | None = None, metric: str | Callable[[LayerRecord], float] = "alpha",
        interval: int = 1, warmup: int = 0,
        remove_first: bool | None = None, remove_last: bool | None = None, eigs_thresh: int | None = None,
        norm_follows: str | None = None, types: Iterable[type] | None = None, conv_mode: str | None = None,
        split_qkv: bool = False, not_in_optimizer: str = "error", fit: str = "median", asynchronous: bool = False,
        **analysis_options: Any,
    ) -> None:
        self._check_arguments(model, optimizer, base_scheduler, asynchronous)
        self.interval, self.warmup = _count("interval", interval, 1), _count("warmup", warmup, 0)
        self.model, self.base_scheduler = model, base_scheduler
        targets = resolve_balance(balance)
        metric, split_qkv = getattr(metric, "qkv_base_metric", metric), split_qkv or hasattr(metric, "qkv_base_metric")
        lr_map = build_assignment(LR, assign, s1, s2, assign_options or {}, normalize)
        wd_map = build_assignment(WEIGHT_DECAY, wd_assign, wd_s1, wd_s2, wd_assign_options or {}, normalize, ("wd_s1", "wd_s2"))
        self.rule = BalanceRule(metric, [m for m in (lr_map, wd_map) if m.target in targets])
        self.metric_name = self.rule.metric_name
        selection = {"remove_first": remove_first, "remove_last": remove_last, "eigs_thresh": eigs_thresh,
                     "norm_follows": norm_follows, "types": types, "conv_mode": conv_mode}
        self.plan = plan_for_optimizer(model, optimizer, base_scheduler, selection, split_qkv=split_qkv,
                                       not_in_optimizer=not_in_optimizer)
        analysis = _analysis_options(fit, self.plan.selection.conv_mode, analysis_options)
        self._groups = BalancedGroups(optimizer, targets)
        self._config = {
            "assign": _label(assign), "s1": s1, "s2": s2, "assign_options": dict(assign_options or {}),
            "metric": self.metric_name, "interval": self.interval, "warmup": self.warmup,
            "balance": [t.name for t in targets], "wd_assign": _label(wd_assign), "wd_s1": wd_s1, "wd_s2": wd_s2,
            "wd_assign_options": dict(wd_assign_options or {}), "normalize": lr_map.normalize,
        }
        self.history: list[Rebalance] = []
        self.last_records: list[LayerRecord] = []
        self._reported: set[str] = set()
        self._runs = MeasurementRuns(self.plan.refs, analysis, asynchronous, optimizer, self._land)
        super().__init__(optimizer)  # sets base_lrs and last_epoch, then calls _initial_step

    # --- construction ---------------------------------------------------------------------

    @staticmethod
    def _check_arguments(model: Any, optimizer: Any, base: Any, asynchronous: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"TempBalance expects the model (an nn.Module) first, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"TempBalance expects a torch optimizer (torch.optim.Optimizer), got {type(optimizer).__name__}")
        if not isinstance(asynchronous, bool):
            raise ConfigError(f"asynchronous={asynchronous!r} must be True or False")
        if asynchronous and _world_size() > 1:
            raise ConfigError(
                f"asynchronous=True is for a single process (world size is {_world_size()}); under "
                "torch.distributed use the synchronous mode, which splits the measurement across ranks"
            )
        if isinstance(base, TempBalance):
            raise ConfigError("base_scheduler is itself a TempBalance")
        check_base_scheduler(base, optimizer)

    def _initial_step(self) -> None:
        """Called by ``LRScheduler.__init__``: the construction-time rebalance (unless warmup)."""
        self.last_epoch, self._step_count = 0, 1
        if self._due(0) and self.plan.layers:
            self.rebalance()
        self._apply()

    # --- the schedule ---------------------------------------------------------------------

    def _due(self, count: int) -> bool:
        return count >= self.warmup and (count - self.warmup) % self.interval == 0

    def step(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Advance the base schedule one step and rebalance when due.

        Positional / keyword arguments go to the base scheduler's ``step`` (e.g. the metric of
        ``ReduceLROnPlateau``).
        """
        self._groups.adopt_outside_changes()
        if self.base_scheduler is not None:
            self._groups.restore_untuned()  # the base schedule never sees a factor
            try:
                self.base_scheduler.step(*args, **kwargs)
            finally:
                self._groups.recapture()
        elif args or kwargs:
            raise TypeError("TempBalance.step() takes arguments only to pass them to a base_scheduler")
        self.last_epoch += 1
        self._step_count += 1
        if self.plan.layers and self._due(self.last_epoch):
            self._runs.start(self.last_epoch)
        else:
            self._runs.between()
        self._apply()

    def wait(self) -> Rebalance | None:
        """Block until a pending asynchronous measurement is done and apply it; returns its
        :class:`Rebalance` (None when nothing was pending, and always in the synchronous mode)."""
        return self.history[-1] if self._runs.collect(block=True) else None

    def rebalance(self) -> Rebalance | None:
        """Measure the balanced layers now, synchronously (a pending measurement is applied
        first), and set new factors. Returns the new :class:`Rebalance` (None without layers)."""
        if not self.plan.layers:
            return None
        self._runs.now(self.last_epoch)
        return self.history[-1]

    def _land(self, step: int, records: list[LayerRecord], lag_steps: int) -> None:
        self._record(records, step, lag_steps)
        self._apply()

    def _record(self, records: list[LayerRecord], step: int, lag_steps: int) -> None:
        """New factors from one measurement; appends to :attr:`history`."""
        self.last_records = records
        names = self.plan.names
        result = self.rule.evaluate(self.plan.group_records(records), names)
        for name, reason in zip(names, result.reasons):
            if reason is not None and name not in self._reported:
                logger.warning("TempBalance: layer %s keeps factor 1 (%s)", name, reason)
                self._reported.add(name)
        values = {t.name: self._groups.set_factors(t, dict(zip(names, result.factors[t.name].tolist())))
                  for t in self._groups.targets}
        values.setdefault("lr", self._groups.values(LR))
        self.history.append(Rebalance.of(step, names, result, values, lag_steps))

    def _apply(self) -> None:
        self._groups.apply()
        self._last_lr = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in self.optimizer.param_groups]

    def set_untuned_lr(self, lr: float) -> None:
        """Set the untuned rate of every group (for loops that compute their own schedule,
        nanoGPT style: call this instead of writing ``group["lr"]``); factors are kept."""
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ConfigError(f"lr={lr!r} must be a finite number >= 0")
        self._groups.set_untuned(LR, float(lr))
        self._last_lr = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in self.optimizer.param_groups]

    def close(self) -> None:
        """Stop the worker thread (after the measurement it is running, whose result is dropped)
        and remove the optimizer hook. The scheduler stays usable; later measurements are
        synchronous."""
        self._runs.close()

    def __enter__(self) -> "TempBalance":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- LRScheduler contract, views, state -----------------------------------------------

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """The rates now set, one per parameter group (same as :meth:`get_last_lr`)."""
        return [LR.read(g) for g in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:  # type: ignore[override]
        """The rates set by the last :meth:`step` (or construction), one per parameter group."""
        return list(self._last_lr)

    @property
    def factors(self) -> dict[str, float]:
        """``{layer name: current learning-rate factor}`` of the balanced layers (1.0 unless balanced)."""
        return self._groups.factors(LR)

    @property
    def weight_decay_factors(self) -> dict[str, float]:
        """``{layer name: current weight-decay factor}`` of the balanced layers (1.0 unless balanced)."""
        return self._groups.factors(WEIGHT_DECAY)

    @property
    def balance(self) -> tuple[str, ...]:
        """The options balanced: ``("lr",)``, ``("weight_decay",)`` or both."""
        return tuple(t.name for t in self._groups.targets)

    @property
    def layers(self) -> list[str]:
        """Names of the balanced layers, in module order."""
        return self.plan.names

    def history_rows(self) -> list[dict[str, Any]]:
        """The history flattened: one dict per (rebalance, layer) with ``step``, ``layer``, ``alpha``,
        ``metric``, ``factor``, ``lr``, ``reason`` (and ``weight_decay_factor``, ``weight_decay``
        when balancing weight decay), ready for csv.DictWriter."""
        return [{"step": h.step, **x.to_dict()} for h in self.history for x in h.layers]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step count, factors, untuned values, history, the plan's
        signature and the base scheduler's own state. Save it with the optimizer's and the model's."""
        state: dict[str, Any] = {
            "version": STATE_VERSION, "last_epoch": self.last_epoch, "step_count": self._step_count,
            "balance": [t.name for t in self._groups.targets],
            "plan": {"layers": self.plan.names, "shapes": {x.name: list(x.shape) for x in self.plan.layers},
                     "groups": len(self.optimizer.param_groups)},
            "history": [h.to_dict() for h in self.history], "reported": sorted(self._reported),
            "base_scheduler": None if self.base_scheduler is None else self.base_scheduler.state_dict(),
            "config": dict(self._config),
            "pending": self._runs.pending,
        }
        return {**state, **self._groups.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (of this version or 0.1's; the order relative to the
        optimizer's load does not matter). A measurement that was still running when the state
        was saved is redone from the model's weights at the first optimizer step after loading.

        Raises:
            ConfigError: the state belongs to another model, layer selection, optimizer or set of
                targets, or holds a factor that is not finite and > 0 (nothing is changed).
        """
        check_state(state_dict, {x.name: x.shape for x in self.plan.layers}, len(self.optimizer.param_groups),
                    [t.name for t in self._groups.targets])
        if state_dict.get("config") and upgrade_config(state_dict["config"]) != upgrade_config(self._config):
            logger.warning("TempBalance: loading a state saved with other options %s (now %s)",
                           state_dict["config"], self._config)
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("step_count", self.last_epoch + 1))
        self.history = [Rebalance.from_dict(h) for h in state_dict.get("history", [])]
        self._reported = set(state_dict.get("reported", []))
        if self.base_scheduler is not None and state_dict.get("base_scheduler") is not None:
            self.base_scheduler.load_state_dict(state_dict["base_scheduler"])
        self._groups.load_state_dict(state_dict)
        pending = state_dict.get("pending")
        self._runs.resume(None if pending is None else int(pending))
        self._apply()

    def __repr__(self) -> str:
        return (
            f"TempBalance({len(self.plan.layers)} layers, balance={self._config['balance']}, "
            f"assign={self._config['assign']!r}, "
            f"metric={self.metric_name!r}, interval={self.interval}, warmup={self.warmup}, step={self.last_epoch})"
        )
