"""Hugging Face ``transformers.Trainer`` integration: an optimizer and a balancing scheduler.

``create_optimizer_and_scheduler`` returns the pair for ``Trainer(optimizers=...)``: HF's own
optimizer and schedule (from the ``TrainingArguments``) with TempBalance's factors on top.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

try:
    from transformers import Trainer, TrainingArguments
    from transformers.optimization import get_scheduler
except ImportError as exc:
    raise ImportError(
        "tempbalance.integrations.transformers needs transformers: pip install 'tempbalance[transformers]'"
    ) from exc

from ..errors import ConfigError
from ..groups import SELECTION_KEYS

__all__ = ["create_optimizer_and_scheduler"]

logger = logging.getLogger(__name__)

# Schedules the Trainer steps with an evaluation metric (it recognises them by their own class).
_METRIC_SCHEDULES = ("reduce_lr_on_plateau", "greedy")


def create_optimizer_and_scheduler(
    model: nn.Module,
    args: TrainingArguments,
    num_training_steps: int,
    *,
    interval: int = 100,
    warmup: int = 0,
    no_decay_norm_bias: bool = True,
    **tempbalance_options: Any,
) -> tuple[torch.optim.Optimizer, Any]:
    """The ``(optimizer, scheduler)`` pair for ``Trainer(optimizers=...)``, rebalancing every ``interval`` steps.

    The optimizer is the one ``args.optim`` names (AdamW by default) with the learning rate,
    betas and epsilon of ``args``, built on :func:`tempbalance.param_groups` (weight decay
    ``args.weight_decay``; biases and norm weights without decay, as the Trainer does). The
    scheduler is a :class:`tempbalance.TempBalance` wrapping HF's schedule
    (``args.lr_scheduler_type``, warm-up from ``args.warmup_steps`` / ``warmup_ratio``): every
    optimizer step a group's rate is ``schedule(step) * factor`` of its layer, the factor
    recomputed from the spectra every ``interval`` optimizer steps.

    The Trainer calls ``scheduler.step()`` after each optimizer step and saves
    ``scheduler.state_dict()`` in each checkpoint (``scheduler.pt``), so
    ``trainer.train(resume_from_checkpoint=...)`` restores the factors, the history and the
    schedule. The logged ``learning_rate`` is the first group's rate.

    Args:
        model: the model the Trainer trains (before any wrapping).
        args: the Trainer's arguments.
        num_training_steps: optimizer steps of the whole run (``args.max_steps``, or
            ``ceil(len(train_dataloader) / gradient_accumulation_steps) * num_train_epochs``).
        interval: rebalance every ``interval`` optimizer steps. Default 100.
        warmup: optimizer steps of plain training before the first rebalance. Default 0.
        no_decay_norm_bias: exclude biases and norm parameters from weight decay. Default True.
        **tempbalance_options: passed to :class:`tempbalance.TempBalance` (``balance``
            (``"weight_decay"``: AlphaDecay on ``args.weight_decay``), ``assign``, ``s1``, ``s2``,
            ``wd_s1``, ``wd_s2``, ``metric``, ``fit``, ..., or ``**model_balancing(model)`` from
            :mod:`tempbalance.transformer_layers`); the layer-selection options
            (``remove_first``, ``remove_last``, ``eigs_thresh``, ``norm_follows``, ``types``,
            ``conv_mode``) also go to :func:`tempbalance.param_groups`.
    """
    from .. import TempBalance, param_groups

    if not (isinstance(num_training_steps, int) and num_training_steps >= 1):
        raise ConfigError(f"num_training_steps={num_training_steps!r} must be an integer >= 1")
    if not (isinstance(interval, int) and interval >= 1):
        raise ConfigError(f"interval={interval!r} must be an integer >= 1 (optimizer steps between rebalances)")
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if schedule in _METRIC_SCHEDULES:
        raise ConfigError(
            f"lr_scheduler_type={schedule!r} is driven by an evaluation metric, which the Trainer passes only to its "
            "own scheduler classes; use a step schedule (linear, cosine, constant_with_warmup, ...) with TempBalance"
        )
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    selection = {k: v for k, v in tempbalance_options.items() if k in SELECTION_KEYS}
    groups = param_groups(model, weight_decay=args.weight_decay, no_decay_norm_bias=no_decay_norm_bias, **selection)
    optimizer = optimizer_cls(groups, **optimizer_kwargs)
    base = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    balancer = TempBalance(model, optimizer, base, interval=interval, warmup=warmup, **tempbalance_options)
    logger.info("TempBalance for Trainer: %d balanced layers, rebalanced every %d steps", len(balancer.factors), interval)
    return optimizer, balancer
