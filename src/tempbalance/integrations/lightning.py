"""Lightning integration: a ``Callback`` that runs TempBalance for a ``LightningModule``.

The callback wraps the module's LR scheduler in :class:`tempbalance.TempBalance`, so Lightning
steps (and checkpoints) the balancer in its place; the callback keeps its own ``state_dict``.
"""

from __future__ import annotations

import logging
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.types import LRSchedulerConfig
except ImportError:  # the standalone package has the same API
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.utilities.types import LRSchedulerConfig  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            "tempbalance.integrations.lightning needs Lightning: pip install 'tempbalance[lightning]'"
        ) from exc

from ..errors import ConfigError

__all__ = ["TempBalanceCallback"]

logger = logging.getLogger(__name__)

UNITS = ("epoch", "step")


class TempBalanceCallback(pl.Callback):
    """Balance per-layer learning rates during ``Trainer.fit`` with :class:`tempbalance.TempBalance`.

    ``configure_optimizers`` must build its optimizer from :func:`tempbalance.param_groups`
    (one optimizer; at most one LR scheduler, not ``ReduceLROnPlateau``). At the start of
    ``fit`` the callback wraps that scheduler in a ``TempBalance`` and puts it in the
    scheduler's place, so Lightning steps it at the scheduler's own ``interval`` /
    ``frequency``; the balancer steps the base scheduler and re-applies the layer factors on
    top (the factors never compound and are never overwritten). Without a scheduler the
    callback adds one entry stepped every ``unit``.

    Checkpoints: Lightning saves the balancer with the schedulers, and the callback saves it
    under its own key too, so ``trainer.fit(model, ckpt_path=...)`` restores the factors,
    the history and the base schedule.

    Args:
        interval: rebalance every ``interval`` scheduler steps (epochs or optimizer steps).
            Default 1.
        unit: ``"epoch"`` or ``"step"``. Default: the configured scheduler's ``interval``, or
            ``"epoch"`` without a scheduler. Giving a unit that differs from the scheduler's
            is an error (the base schedule would change speed).
        warmup: scheduler steps of plain training before the first rebalance. Default 0.
        **tempbalance_options: passed to :class:`tempbalance.TempBalance` (``balance``
            (``"lr"``, ``"weight_decay"`` for AlphaDecay, or both), ``fit``, ``metric``,
            ``assign``, ``s1``, ``s2``, ``wd_s1``, ``wd_s2``, ``normalize``, ``split_qkv``,
            analysis options); give the layer selection to :func:`tempbalance.param_groups`.

    Attributes:
        balancer: the ``TempBalance`` object once ``fit`` has started (else None).
    """

    def __init__(self, *, interval: int = 1, unit: str | None = None, warmup: int = 0, **tempbalance_options: Any):
        super().__init__()
        if unit is not None and unit not in UNITS:
            raise ConfigError(f"unit={unit!r} is not one of {UNITS}")
        if not (isinstance(interval, int) and interval >= 1):
            raise ConfigError(f"interval={interval!r} must be an integer >= 1")
        if not (isinstance(warmup, int) and warmup >= 0):
            raise ConfigError(f"warmup={warmup!r} must be an integer >= 0")
        self.interval = interval
        self.unit = unit
        self.warmup = warmup
        self.tempbalance_options = dict(tempbalance_options)
        self.balancer: Any = None
        self._pending_state: dict[str, Any] | None = None

    # -- Lightning hooks -------------------------------------------------------------
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        from .. import TempBalance

        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ConfigError(
                f"TempBalanceCallback supports exactly one optimizer, got {len(optimizers)}; "
                "return a single optimizer built from tempbalance.param_groups(model)"
            )
        configs = trainer.lr_scheduler_configs
        if len(configs) > 1:
            raise ConfigError(f"TempBalanceCallback supports at most one LR scheduler, got {len(configs)}")
        config = configs[0] if configs else None
        if config is not None and isinstance(config.scheduler, TempBalance):
            self.balancer = config.scheduler  # a second fit() on the same trainer
            return
        if config is not None:
            if config.reduce_on_plateau:
                raise ConfigError("TempBalanceCallback cannot wrap ReduceLROnPlateau; use a step-based scheduler")
            if self.unit is not None and self.unit != config.interval:
                raise ConfigError(
                    f"unit={self.unit!r} differs from the LR scheduler's interval={config.interval!r}; "
                    "leave unit=None (follow the scheduler) or configure the scheduler with the same interval"
                )
        self.balancer = TempBalance(
            pl_module,
            optimizers[0],
            config.scheduler if config is not None else None,
            interval=self.interval,
            warmup=self.warmup,
            **self.tempbalance_options,
        )
        if config is not None:
            config.scheduler = self.balancer
        else:
            configs.append(LRSchedulerConfig(self.balancer, name="tempbalance", interval=self.unit or "epoch"))
        if self._pending_state is not None:
            self.balancer.load_state_dict(self._pending_state)
            self._pending_state = None
        logger.info("TempBalance attached: %d balanced layers", len(self.balancer.factors))

    # -- checkpointing ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The balancer's state (factors, history, base schedule); empty before ``fit``."""
        if self.balancer is not None:
            return {"tempbalance": self.balancer.state_dict()}
        return {"tempbalance": self._pending_state} if self._pending_state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the balancer now, or when ``fit`` creates it."""
        state = state_dict.get("tempbalance")
        if state is None:
            return
        if self.balancer is not None:
            self.balancer.load_state_dict(state)
        else:
            self._pending_state = state
