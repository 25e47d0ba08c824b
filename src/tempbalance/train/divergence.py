"""Divergence of a training run: a non-finite loss or weight stops the run before that epoch is
saved; a training loss that grows by orders of magnitude is warned about once.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable

import torch
from torch import nn

from ..errors import TempBalanceError, spell

__all__ = ["DivergenceError", "non_finite_tensors", "check_epoch", "LossWatch", "GROWTH_FACTOR"]

log = logging.getLogger(__name__)

# A training loss this many times the chance-level loss, or this many times the lowest earlier one
# while above chance level, counts as growing by orders of magnitude.
GROWTH_FACTOR = 100.0


class DivergenceError(TempBalanceError):
    """The run diverged (a non-finite loss or weight); nothing of that epoch was saved."""


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` holding a NaN or an infinity.

    One pass of sums (a NaN or an infinity makes a tensor's sum non-finite) and one device
    synchronisation for the whole model; only a tensor whose sum is not finite is then checked
    element by element (a huge but finite tensor can overflow its sum: it is not reported).
    """
    named = [(name, t.detach()) for name, t in [*model.named_parameters(), *model.named_buffers()]
             if t.is_floating_point() and t.numel()]
    if not named:
        return []
    sums = torch.stack([t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).double()
                        for _, t in named])
    suspects = torch.nonzero(~torch.isfinite(sums)).flatten().tolist()
    return [named[i][0] for i in suspects if not bool(torch.isfinite(named[i][1]).all())]


def _names(names: list[str], shown: int = 3) -> str:
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_epoch(
    epoch: int, losses: dict[str, float], model: nn.Module, *, lr: float, method: str, kept: str | None
) -> None:
    """Raise :class:`DivergenceError` when a loss of ``epoch`` (1-based) or a weight is not finite.

    Args:
        losses: e.g. ``{"train loss": 2.3, "test loss": nan}``.
        kept: what stays resumable, for the message (e.g. "the checkpoint of epoch 2 in runs/x"),
            None for a run without files.
    """
    bad = [f"{name} {value}" for name, value in losses.items() if not math.isfinite(value)]
    tensors = non_finite_tensors(model)
    if tensors:
        bad.append(f"non-finite weights in {_names(tensors)}")
    if bad:
        raise DivergenceError(
            f"training diverged in epoch {epoch}: {'; '.join(bad)} (method {method}, {spell('lr', lr)}); "
            + (f"nothing of epoch {epoch} was saved, {kept} stays the last one; " if kept else "")
            + f"lower the learning rate and start over ({spell('overwrite')})"
        )


class LossWatch:
    """Warns once when the training loss grows by orders of magnitude (the run is probably diverging).

    Args:
        num_classes: the chance-level loss is ``ln(num_classes)`` (a uniform guess).
        earlier: training losses of epochs already done (a resumed run).
        warned: the warning an earlier part of the run gave (then no other is given).
    """

    def __init__(self, num_classes: int, earlier: Iterable[float] = (), warned: str | None = None) -> None:
        self.chance = math.log(max(int(num_classes), 2))
        finite = [value for value in earlier if isinstance(value, (int, float)) and math.isfinite(value)]
        self.lowest = min(finite) if finite else math.inf
        self.warned = warned

    def observe(self, epoch: int, loss: float, lr: float) -> str | None:
        """Record ``epoch``'s training loss; return (and log) the warning the first time it is due."""
        above_chance = loss > GROWTH_FACTOR * self.chance
        grown = above_chance or (loss > self.chance and loss > GROWTH_FACTOR * self.lowest)
        reference = ("chance level", self.chance) if above_chance else ("its lowest", self.lowest)
        self.lowest = min(self.lowest, loss)
        if not grown or self.warned is not None:
            return None
        self.warned = (
            f"training loss {loss:.3g} in epoch {epoch} is orders of magnitude above {reference[0]} "
            f"({reference[1]:.3g}): the run is probably diverging; consider a lower learning rate than "
            f"{spell('lr', lr)}"
        )
        log.warning("%s", self.warned)
        return self.warned
