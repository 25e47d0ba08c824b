"""Hugging Face ``accelerate`` integration: TempBalance on prepared objects, in its checkpoints.

``attach`` builds the balancer on the model and optimizer that ``accelerator.prepare`` returned
and registers it, so ``accelerator.save_state`` / ``load_state`` carry its factors and history.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

try:
    from accelerate import Accelerator
except ImportError as exc:
    raise ImportError(
        "tempbalance.integrations.accelerate needs accelerate: pip install 'tempbalance[transformers]'"
    ) from exc

from ..errors import ConfigError

__all__ = ["attach", "register"]

logger = logging.getLogger(__name__)


def register(accelerator: Accelerator, balancer: Any) -> Any:
    """Register ``balancer`` for ``accelerator.save_state`` / ``load_state`` (once) and return it.

    A balancer passed through ``accelerator.prepare`` as a scheduler is already saved with
    the schedulers and is not registered twice.
    """
    if not (hasattr(balancer, "state_dict") and hasattr(balancer, "load_state_dict")):
        raise ConfigError(f"register() needs an object with state_dict/load_state_dict, got {type(balancer).__name__}")
    prepared = [getattr(s, "scheduler", s) for s in getattr(accelerator, "_schedulers", [])]
    registered = getattr(accelerator, "_custom_objects", [])
    if any(obj is balancer for obj in prepared + registered):
        return balancer
    accelerator.register_for_checkpointing(balancer)
    return balancer


def attach(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    base_scheduler: Any = None,
    **tempbalance_options: Any,
) -> Any:
    """A :class:`tempbalance.TempBalance` for objects returned by ``accelerator.prepare``.

    Works with the prepared (possibly DDP-wrapped) model and the ``AcceleratedOptimizer``;
    ``base_scheduler`` may be a raw or a prepared scheduler (a prepared one keeps accelerate's
    rules: no step while gradients accumulate, ``num_processes`` steps per step without
    ``split_batches``). Call ``balancer.step()`` where you would step the base scheduler; the
    balancer's ``interval`` counts those calls. Every process computes the same factors from
    the same weights. The balancer is registered for checkpointing (see :func:`register`):
    create it, in the same order, before ``accelerator.load_state``.

    Args:
        accelerator: the ``Accelerator``.
        model: the prepared model.
        optimizer: the prepared optimizer, built on :func:`tempbalance.param_groups`.
        base_scheduler: the schedule the factors ride on (or None: a constant base rate).
        **tempbalance_options: passed to :class:`tempbalance.TempBalance` (``balance``,
            ``interval``, ``warmup``, ``assign``, ``s1``, ``s2``, ``wd_s1``, ``wd_s2``, ...).
    """
    from .. import TempBalance

    balancer = TempBalance(model, optimizer, base_scheduler, **tempbalance_options)
    register(accelerator, balancer)
    logger.info("TempBalance attached to accelerate: %d balanced layers", len(balancer.factors))
    return balancer
