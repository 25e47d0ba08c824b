"""``TempBalance``: a learning-rate scheduler that gives each layer a factor, from its weight
spectrum, on top of any global schedule (torch's LRScheduler contract).

Each balanced parameter group keeps its *untuned* rate (``group["tb_untuned_lr"]``, what the
base schedule alone would set) apart from its *factor* (``group["tb_factor"]``), and its
``group["lr"]`` is always their product. A step puts the untuned rates back, steps the base
scheduler on them, re-measures the layers when due, and applies the factors again: a
recursive base schedule (CosineAnnealingLR) never sees a factor, and one that recomputes from
``base_lrs`` (LambdaLR, OneCycleLR) never erases one.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from .analysis import AnalysisOptions, LayerRecord
from .assign import assign_options as _assign_option_names
from .assign import create_assign, get_metric
from .background import BackgroundMeasurement
from .distributed import distributed_analyze_layers
from .errors import ConfigError
from .groups import BalancePlan, LayerSelection, plan_balance

__all__ = ["TempBalance", "LayerBalance", "Rebalance"]

logger = logging.getLogger(__name__)

LAYER_KEY = "tb_layer"  # group -> balanced layer name (set by param_groups)
FACTOR_KEY = "tb_factor"  # the layer's current factor
UNTUNED_KEY = "tb_untuned_lr"  # the rate the base schedule alone would set

# Per-parameter-group lists kept by torch's schedulers, re-indexed when groups are split.
_PER_GROUP_ATTRS = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs", "base_momentums", "max_momentums")

_ANALYSIS_KEYS = tuple(f.name for f in fields(AnalysisOptions) if f.name not in ("fit", "conv_mode", "keep_eigenvalues"))


@dataclass
class LayerBalance:
    """One layer at one rebalance.

    Attributes:
        layer: module name.
        alpha: its power-law exponent (NaN when the fit failed).
        metric: the scheduled metric's value (equals ``alpha`` for ``metric="alpha"``).
        factor: its learning-rate factor (1.0 when the metric is not finite).
        lr: the rate set for it at this rebalance (untuned rate x factor).
        reason: why it kept factor 1, or None.
    """

    layer: str
    alpha: float
    metric: float
    factor: float
    lr: float
    reason: str | None = None


@dataclass
class Rebalance:
    """One rebalance: the scheduler step whose weights were measured (0 = construction), every
    layer, and ``lag_steps``: optimizer updates made with the old factors between that
    measurement's snapshot and its factors taking effect (0 in the synchronous mode)."""

    step: int
    layers: list[LayerBalance] = field(default_factory=list)
    lag_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "layers": [asdict(x) for x in self.layers], "lag_steps": self.lag_steps}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Rebalance":
        return cls(int(d["step"]), [LayerBalance(**x) for x in d["layers"]], int(d.get("lag_steps", 0)))


def _lr_value(lr: Any) -> float:
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


def _set_lr(group: dict[str, Any], value: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


def _optimizer_chain(optimizer: Any) -> list[Any]:
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


def _state_is_empty(optimizer: Any) -> bool:
    return all(len(getattr(o, "state", {}) or {}) == 0 for o in _optimizer_chain(optimizer))


def _hookable_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer of the chain that takes step pre-hooks (the one that updates
    the parameters, so its hook runs before every parameter update), or None."""
    for candidate in reversed(_optimizer_chain(optimizer)):
        if callable(getattr(candidate, "register_step_pre_hook", None)):
            return candidate
    return None


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _scheduler_tree(scheduler: Any) -> list[Any]:
    out = [scheduler]
    for child in getattr(scheduler, "_schedulers", None) or []:
        out.extend(_scheduler_tree(child))
    return out


class TempBalance(LRScheduler):
    """Layer-wise learning rates from heavy-tailed weight spectra, on top of any schedule.

    Typical use (the three added lines marked)::

        optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1,       # (1)
                                    momentum=0.9, weight_decay=5e-4)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        scheduler = tempbalance.TempBalance(model, optimizer, cosine)              # (2)
        for epoch in range(epochs):
            train_one_epoch(model, optimizer)
            scheduler.step()                                                       # (3)

    Each balanced layer ``i`` gets ``lr_i = untuned_lr * factor_i``; the factors come from one
    metric per layer (default: the median-Hill power-law exponent alpha) through an assignment
    function (default: the published linear map, smallest alpha -> ``s1``, largest -> ``s2``).
    The factors are recomputed on construction (unless ``warmup``) and then every ``interval``
    calls of :meth:`step`.

    Args:
        model: the model being trained (DDP / torch.compile wrappers are unwrapped).
        optimizer: any optimizer (or wrapper with ``param_groups``, e.g. timm's Lookahead)
            built from :func:`tempbalance.param_groups`. One built from ``model.parameters()``
            whose state is still empty is split into per-layer groups here (each keeping its
            group's options, and the base scheduler's per-group lists re-indexed); construct
            TempBalance before loading such an optimizer's checkpoint.
        base_scheduler: the global schedule (any ``torch.optim.lr_scheduler`` scheduler, incl.
            SequentialLR, OneCycleLR, CosineAnnealingWarmRestarts, ReduceLROnPlateau), already
            constructed on ``optimizer``. Step only TempBalance, never the base scheduler
            itself. None: the untuned rate is the optimizer's own (or set with
            :meth:`set_untuned_lr`).
        assign: ``"linear"`` (default; the reference's ``"tb_linear_map"``), ``"sqrt"``,
            ``"log2"``, ``"step"``, ``"sigmoid"``, or ``fn(values: np.ndarray) -> factors``.
        s1, s2: smallest / largest factor of ``"linear"`` and ``"step"`` (default 0.5 / 1.5);
            ``s1 > 0``, ``s1 <= s2``. Always checked; ignored by functions that do not take
            them (``"sqrt"``, ``"log2"``, ``"sigmoid"``, a callable).
        assign_options: other options of the assignment function (``"step"``: ``endpoint``;
            ``"sigmoid"``: ``tau``, ``s``, ``s_below``).
        metric: ``"alpha"`` (default), ``"alpha_weighted"`` (alias ``"alphahat"``),
            ``"spectral_norm"``, any name added with :func:`tempbalance.assign.register_metric`,
            or ``fn(record) -> float``.
        interval: rebalance every ``interval`` calls of :meth:`step` (default 1: call ``step()``
            once per epoch, as the paper; for per-step LLM-style training call it every
            optimizer step and set e.g. ``interval=100``).
        warmup: calls of :meth:`step` with every factor 1 before the first rebalance (default
            0: rebalance on construction).
        remove_first, remove_last, eigs_thresh, norm_follows, types, conv_mode: which layers
            are balanced; see :class:`tempbalance.groups.LayerSelection`. Use the same values as
            for :func:`tempbalance.param_groups`.
        fit: power-law fit, ``"median"`` (default, the reference), ``"ks"``, ``"fix-finger"``.
        asynchronous: measure off the training path (default False). A due :meth:`step` copies
            the balanced weights to host memory and returns; one worker thread measures the copy,
            and the new factors take effect before the first optimizer step after it finishes
            (a step pre-hook on the optimizer). A measurement still running when the next one is
            due is waited for. The construction-time measurement stays synchronous. Single
            process only (under torch.distributed the synchronous mode already splits the work
            across ranks). Rates then depend on the worker's timing, so runs are not bit-for-bit
            repeatable; ``history[i].lag_steps`` records each delay.
        **analysis_options: ``xmin_pos``, ``hill``, ``filter_zeros``, ``zero_threshold``,
            ``precision`` (default ``"float64"`` here: the min-max map stretches alpha spreads
            of a few hundredths to the full factor range, so round-off would show in the
            rates), ``conv_norm``; see :class:`tempbalance.AnalysisOptions`.

    Attributes:
        history: one :class:`Rebalance` per rebalance (alpha, metric, factor, rate per layer).
        plan: the balanced layers and the parameters that follow each.
        last_records: the analysis records of the last rebalance.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        base_scheduler: Any = None,
        *,
        assign: str | Callable[[np.ndarray], Any] = "linear",
        s1: float | None = None,
        s2: float | None = None,
        assign_options: dict[str, Any] | None = None,
        metric: str | Callable[[LayerRecord], float] = "alpha",
        interval: int = 1,
        warmup: int = 0,
        remove_first: bool = True,
        remove_last: bool = True,
        eigs_thresh: int = 50,
        norm_follows: str | None = "order",
        types: Iterable[type] | None = None,
        conv_mode: str = "per_position",
        fit: str = "median",
        asynchronous: bool = False,
        **analysis_options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"TempBalance expects the model (an nn.Module) first, got {type(model).__name__}")
        if not isinstance(getattr(optimizer, "param_groups", None), list):
            raise TypeError(f"TempBalance expects an optimizer with param_groups, got {type(optimizer).__name__}")
        for key, value in (("interval", interval), ("warmup", warmup)):
            low = 1 if key == "interval" else 0
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ConfigError(f"{key}={value!r} must be an integer >= {low}")
        interval, warmup = int(interval), int(warmup)
        if not isinstance(asynchronous, bool):
            raise ConfigError(f"asynchronous={asynchronous!r} must be True or False")
        if asynchronous and _world_size() > 1:
            raise ConfigError(
                f"asynchronous=True is for a single process (world size is {_world_size()}); under "
                "torch.distributed use the synchronous mode, which splits the measurement across ranks"
            )
        unknown = sorted(set(analysis_options) - set(_ANALYSIS_KEYS))
        if unknown:
            raise TypeError(f"TempBalance got unknown option(s) {unknown}; analysis options accepted: {list(_ANALYSIS_KEYS)}")
        analysis_options.setdefault("precision", "float64")
        try:
            self._analysis = AnalysisOptions(fit=fit, conv_mode=conv_mode, **analysis_options)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self._selection = LayerSelection(
            remove_first=remove_first,
            remove_last=remove_last,
            eigs_thresh=eigs_thresh,
            norm_follows=norm_follows,
            types=types,
            conv_mode=conv_mode,
        )
        self._assign = self._build_assign(assign, s1, s2, assign_options or {})
        self.metric_name, self._metric = get_metric(metric)
        self.interval = interval
        self.warmup = warmup
        self.model = model
        self.optimizer = optimizer
        self.base_scheduler = base_scheduler
        self._config = {
            "assign": assign if isinstance(assign, str) else getattr(assign, "__name__", "custom"),
            "s1": s1, "s2": s2, "assign_options": dict(assign_options or {}),
            "metric": self.metric_name, "interval": interval, "warmup": warmup,
        }
        self._check_base_scheduler()

        self.plan: BalancePlan = plan_balance(model, self._selection)
        self._layer_index = {name: i for i, name in enumerate(self.plan.names)}
        if not self.plan.layers:
            logger.warning(
                "TempBalance: no layer of %s qualifies for balancing (%s); every rate stays untuned",
                type(model).__name__, self.plan.skipped,
            )
        if self.plan.layers and not any(LAYER_KEY in g for g in optimizer.param_groups):
            self._split_groups()
        self._check_groups()

        self.history: list[Rebalance] = []
        self.last_records: list[LayerRecord] = []
        self._reported: set[str] = set()
        self._warned_external = False
        self._background: BackgroundMeasurement | None = None
        self._resume_pending: int | None = None  # a measurement to redo at the next optimizer step
        self._optimizer_steps = 0  # optimizer updates so far, counted by the step pre-hook
        self._started_at = 0  # self._optimizer_steps when the pending snapshot was taken
        self._hook: Any = None
        for group in self._balanced_groups():
            self._init_group(group)
        self.base_lrs = [g.get("initial_lr", _lr_value(g["lr"])) for g in optimizer.param_groups]
        self.last_epoch = 0
        self._step_count = 1
        if self._due(0):
            self.rebalance()
        self._apply()
        if asynchronous and self.plan.layers:
            self._background = BackgroundMeasurement([layer.ref for layer in self.plan.layers], self._analysis)
            self._register_hook()

    # --- construction helpers ---------------------------------------------------------------

    @staticmethod
    def _build_assign(assign: Any, s1: Any, s2: Any, extra: dict[str, Any]) -> Callable[[np.ndarray], Any]:
        if not isinstance(extra, dict):
            raise ConfigError(f"assign_options={extra!r} must be a dict")
        options = dict(extra)
        given = {k: v for k, v in (("s1", s1), ("s2", s2)) if v is not None}
        if given:
            # s1 / s2 are validated whatever the function; only those that take them get them.
            create_assign("linear", **{**{k: v for k, v in extra.items() if k in ("s1", "s2")}, **given})
            for key in given:
                if key in options:
                    raise ConfigError(f"{key} given both directly and in assign_options")
            if isinstance(assign, str):
                accepted = _assign_option_names(assign)
                options.update({k: v for k, v in given.items() if k in accepted})
                ignored = sorted(set(given) - set(accepted))
            else:
                ignored = sorted(given)
            if ignored:
                logger.debug("TempBalance: %s not used by assign=%r", ignored, assign)
        return create_assign(assign, **options)

    def _check_base_scheduler(self) -> None:
        base = self.base_scheduler
        if base is None:
            return
        if isinstance(base, TempBalance):
            raise ConfigError("base_scheduler is itself a TempBalance")
        if not callable(getattr(base, "step", None)):
            raise ConfigError(f"base_scheduler={base!r} has no step() method")
        base_opt = getattr(base, "optimizer", None)
        if base_opt is not None and base_opt is not self.optimizer:
            if getattr(base_opt, "param_groups", None) is not self.optimizer.param_groups:
                raise ConfigError("base_scheduler drives a different optimizer than the one given to TempBalance")

    def _split_groups(self) -> None:
        """Drop-in mode: split each group into per-layer groups (same options)."""
        opt = self.optimizer
        if not _state_is_empty(opt):
            raise ConfigError(
                "the optimizer has no per-layer parameter groups and its state is not empty (it has "
                "stepped or loaded a checkpoint), so TempBalance cannot split its groups safely. Build it "
                "from tempbalance.param_groups(model, ...) instead of model.parameters(), e.g. "
                "torch.optim.SGD(tempbalance.param_groups(model), lr=0.1, momentum=0.9), or construct "
                "TempBalance before the first step and before loading the optimizer's state."
            )
        owner = self.plan.owner_by_param()
        old = list(opt.param_groups)
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
            for layer in [*self.plan.names, None]:
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
                new.append(ng)
                source.append(gi)
        for o in _optimizer_chain(opt):
            if isinstance(getattr(o, "param_groups", None), list):
                o.param_groups[:] = new
        if self.base_scheduler is not None:
            for sched in _scheduler_tree(self.base_scheduler):
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

    def _check_groups(self) -> None:
        expected = self.plan.owner_by_param()
        problems: list[str] = []
        names: dict[str, int] = {}
        for group in self.optimizer.param_groups:
            layer = group.get(LAYER_KEY)
            if layer is not None:
                name = group.get("name", layer)
                names[name] = names.get(name, 0) + 1
                if layer not in self._layer_index:
                    problems.append(f"group {name!r} is tagged for layer {layer!r}, which these options do not balance")
                    continue
            for p in group["params"]:
                want = expected.get(id(p))
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
                f"{shown}. Build the groups with tempbalance.param_groups(model, ...) using the same remove_first, "
                "remove_last, eigs_thresh, norm_follows, types and conv_mode."
            )

    def _balanced_groups(self) -> list[dict[str, Any]]:
        return [g for g in self.optimizer.param_groups if LAYER_KEY in g]

    @staticmethod
    def _init_group(group: dict[str, Any]) -> None:
        lr = _lr_value(group["lr"])
        untuned, factor = group.get(UNTUNED_KEY), group.get(FACTOR_KEY)
        if untuned is None or factor is None or not math.isclose(lr, untuned * factor, rel_tol=1e-6, abs_tol=0.0):
            group[UNTUNED_KEY], group[FACTOR_KEY] = lr, 1.0

    # --- the schedule -----------------------------------------------------------------------

    def _due(self, count: int) -> bool:
        return count >= self.warmup and (count - self.warmup) % self.interval == 0

    def _check_external(self) -> None:
        for group in self._balanced_groups():
            if UNTUNED_KEY not in group or FACTOR_KEY not in group:
                self._init_group(group)
                continue
            lr = _lr_value(group["lr"])
            want = group[UNTUNED_KEY] * group[FACTOR_KEY]
            if not math.isclose(lr, want, rel_tol=1e-6, abs_tol=0.0):
                if not self._warned_external:
                    logger.warning(
                        "TempBalance: the rate of group %r was changed outside TempBalance (expected %.6g, found "
                        "%.6g); taking it as the new untuned rate. Pass your scheduler as base_scheduler= and "
                        "step only TempBalance, or set rates with set_untuned_lr().",
                        group.get("name"), want, lr,
                    )
                    self._warned_external = True
                group[UNTUNED_KEY] = lr

    def step(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Advance the base schedule one step and rebalance when due.

        Positional / keyword arguments go to the base scheduler's ``step`` (e.g. the metric of
        ``ReduceLROnPlateau``).
        """
        self._check_external()
        if self.base_scheduler is not None:
            for group in self._balanced_groups():
                _set_lr(group, group[UNTUNED_KEY])
            try:
                self.base_scheduler.step(*args, **kwargs)
            finally:
                for group in self._balanced_groups():
                    group[UNTUNED_KEY] = _lr_value(group["lr"])
                    _set_lr(group, group[UNTUNED_KEY] * group[FACTOR_KEY])
        elif args or kwargs:
            raise TypeError("TempBalance.step() takes arguments only to pass them to a base_scheduler")
        self.last_epoch += 1
        self._step_count += 1
        if self._due(self.last_epoch):
            self._resume_pending = None  # superseded by this measurement
            if self._background is not None:
                self._finish(self._background.wait())
                self._start_background(self.last_epoch)
            else:
                self.rebalance()
        else:
            self._start_resumed()
            if self._background is not None:
                self._finish(self._background.poll())
        self._apply()

    # --- asynchronous mode ------------------------------------------------------------------

    def _register_hook(self) -> None:
        if self._hook is not None:
            return
        target = _hookable_optimizer(self.optimizer)
        if target is None:
            logger.info(
                "TempBalance: %s takes no step pre-hooks; measurements are applied at the next step() instead",
                type(self.optimizer).__name__,
            )
            return
        self._hook = target.register_step_pre_hook(self._before_optimizer_step)

    def _before_optimizer_step(self, *_: Any) -> None:
        """Optimizer step pre-hook: apply a finished measurement, or start the one a resumed
        state left pending (the weights are still those of the saved step)."""
        self._start_resumed()
        if self._background is not None:
            self._finish(self._background.poll())
        self._optimizer_steps += 1

    def _start_resumed(self) -> None:
        """Redo the measurement a loaded state left pending (synchronously without a worker)."""
        if self._resume_pending is None:
            return
        label, self._resume_pending = self._resume_pending, None
        if self._background is None:
            self._set_factors(self._measure(), label)
            self._apply()
        else:
            self._start_background(label)

    def _start_background(self, label: int) -> None:
        assert self._background is not None
        self._started_at = self._optimizer_steps
        self._background.start(label)

    def _finish(self, result: tuple[int, list[LayerRecord]] | None) -> None:
        if result is None:
            return
        label, records = result
        self._set_factors(records, label, lag_steps=self._optimizer_steps - self._started_at)
        self._apply()

    def wait(self) -> Rebalance | None:
        """Block until a pending asynchronous measurement is done and apply it; returns its
        :class:`Rebalance` (None when nothing was pending, and always in the synchronous mode)."""
        if self._background is None or self._background.pending is None:
            return None
        self._finish(self._background.wait())
        return self.history[-1]

    def rebalance(self) -> Rebalance | None:
        """Measure the balanced layers now and set new factors (also called by :meth:`step`).

        Always synchronous: in the asynchronous mode a pending measurement is applied first.
        Returns the new :class:`Rebalance` record (None when no layer is balanced).
        """
        if not self.plan.layers:
            return None
        self.wait()
        entry = self._set_factors(self._measure(), self.last_epoch)
        self._apply()
        return entry

    def _measure(self) -> list[LayerRecord]:
        return distributed_analyze_layers([layer.ref for layer in self.plan.layers], self._analysis)

    def _set_factors(self, records: list[LayerRecord], step: int, lag_steps: int = 0) -> Rebalance:
        """New factors from one measurement of the balanced layers; appends to :attr:`history`."""
        self.last_records = records
        values = np.array([float(self._metric(r)) for r in records], dtype=np.float64)
        ok = np.isfinite(values)
        factors = np.ones(len(records), dtype=np.float64)
        reasons: list[str | None] = [None] * len(records)
        for i, r in enumerate(records):
            if not ok[i]:
                reasons[i] = r.reason or f"{self.metric_name} is not finite"
        if ok.any():
            raw = np.asarray(self._assign(values[ok].copy()), dtype=np.float64).reshape(-1)
            if raw.shape[0] != int(ok.sum()):
                raise ValueError(f"the assign function returned {raw.shape[0]} factors for {int(ok.sum())} layers")
            factors[ok] = raw
        bad = ~np.isfinite(factors) | (factors < 0)
        for i in np.flatnonzero(bad):
            reasons[i] = f"assign function gave factor {factors[i]!r}"
            factors[i] = 1.0
        for name, reason in zip(self.plan.names, reasons):
            if reason is not None and name not in self._reported:
                logger.warning("TempBalance: layer %s keeps factor 1 (%s)", name, reason)
                self._reported.add(name)

        by_layer = dict(zip(self.plan.names, factors.tolist()))
        untuned: dict[str, float] = {}
        for group in self._balanced_groups():
            layer = group[LAYER_KEY]
            group[FACTOR_KEY] = by_layer[layer]
            untuned.setdefault(layer, group[UNTUNED_KEY])
        entry = Rebalance(
            step,
            [
                LayerBalance(
                    name, float(r.alpha), float(values[i]), by_layer[name],
                    untuned.get(name, float("nan")) * by_layer[name], reasons[i],
                )
                for i, (name, r) in enumerate(zip(self.plan.names, records))
            ],
            lag_steps,
        )
        self.history.append(entry)
        return entry

    def _apply(self) -> None:
        for group in self._balanced_groups():
            _set_lr(group, group[UNTUNED_KEY] * group[FACTOR_KEY])
        self._last_lr = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in self.optimizer.param_groups]

    def set_untuned_lr(self, lr: float) -> None:
        """Set the untuned rate of every group (for loops that compute their own schedule,
        nanoGPT style: call this instead of writing ``group["lr"]``); factors are kept."""
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ConfigError(f"lr={lr!r} must be a finite number >= 0")
        for group in self.optimizer.param_groups:
            if LAYER_KEY in group:
                group[UNTUNED_KEY] = float(lr)
                _set_lr(group, float(lr) * group.get(FACTOR_KEY, 1.0))
            else:
                _set_lr(group, float(lr))
        self._last_lr = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in self.optimizer.param_groups]

    # --- LRScheduler contract ---------------------------------------------------------------

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """The rates now set, one per parameter group (same as :meth:`get_last_lr`)."""
        return [_lr_value(g["lr"]) for g in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:  # type: ignore[override]
        """The rates set by the last :meth:`step` (or construction), one per parameter group."""
        return list(self._last_lr)

    @property
    def factors(self) -> dict[str, float]:
        """``{layer name: current factor}`` of the balanced layers."""
        out: dict[str, float] = {}
        for group in self._balanced_groups():
            out.setdefault(group[LAYER_KEY], float(group.get(FACTOR_KEY, 1.0)))
        return out

    @property
    def layers(self) -> list[str]:
        """Names of the balanced layers, in module order."""
        return self.plan.names

    def history_rows(self) -> list[dict[str, Any]]:
        """The history flattened: one dict per (rebalance, layer) with ``step``, ``layer``,
        ``alpha``, ``metric``, ``factor``, ``lr``, ``reason`` (ready for csv.DictWriter)."""
        return [{"step": h.step, **asdict(x)} for h in self.history for x in h.layers]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step count, factors, untuned rates, history, and the
        base scheduler's own state. Save it with the optimizer's and the model's state."""
        return {
            "version": 1,
            "last_epoch": self.last_epoch,
            "step_count": self._step_count,
            "factors": self.factors,
            "untuned_lr": {g.get("name", g[LAYER_KEY]): g[UNTUNED_KEY] for g in self._balanced_groups()},
            "history": [h.to_dict() for h in self.history],
            "reported": sorted(self._reported),
            "base_scheduler": None if self.base_scheduler is None else self.base_scheduler.state_dict(),
            "config": dict(self._config),
            "pending": self._pending_step(),
        }

    def _pending_step(self) -> int | None:
        if self._resume_pending is not None:
            return self._resume_pending
        return None if self._background is None else self._background.pending

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (order relative to the optimizer's load does not matter).

        A measurement that was still running when the state was saved (asynchronous mode) is
        redone from the model's weights at the first optimizer step after loading: the weights
        saved with the state, when it was saved before the next optimizer step (as a per-epoch
        checkpoint is).
        """
        if not isinstance(state_dict, dict) or state_dict.get("version") != 1:
            raise ConfigError("not a TempBalance state_dict (missing version 1)")
        if state_dict.get("config") and state_dict["config"] != self._config:
            logger.warning("TempBalance: loading a state saved with other options %s (now %s)", state_dict["config"], self._config)
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("step_count", self.last_epoch + 1))
        self.history = [Rebalance.from_dict(h) for h in state_dict.get("history", [])]
        self._reported = set(state_dict.get("reported", []))
        base_state = state_dict.get("base_scheduler")
        if self.base_scheduler is not None and base_state is not None:
            self.base_scheduler.load_state_dict(base_state)
        factors, untuned = state_dict.get("factors", {}), state_dict.get("untuned_lr", {})
        for group in self._balanced_groups():
            name = group.get("name", group[LAYER_KEY])
            if name in untuned:
                group[UNTUNED_KEY] = float(untuned[name])
            if group[LAYER_KEY] in factors:
                group[FACTOR_KEY] = float(factors[group[LAYER_KEY]])
        if self._background is not None and self._background.pending is not None:
            self._background.close()
        pending = state_dict.get("pending")
        self._resume_pending = None if pending is None else int(pending)
        if self._resume_pending is not None:
            self._register_hook()
        self._apply()

    def __repr__(self) -> str:
        return (
            f"TempBalance({len(self.plan.layers)} layers, assign={self._config['assign']!r}, "
            f"metric={self.metric_name!r}, interval={self.interval}, warmup={self.warmup}, step={self.last_epoch})"
        )
