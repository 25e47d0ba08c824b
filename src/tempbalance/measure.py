"""The measurement of the balanced layers, behind one interface: ``submit`` (measure the weights
as they are now), ``ready``, ``wait`` (the result), ``close``.

:class:`SynchronousMeasurement` measures inside ``submit`` (split across ranks under
``torch.distributed``); :class:`tempbalance.background.ThreadMeasurement` measures a snapshot
on a worker thread.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol, Sequence

from .analysis import AnalysisOptions, LayerRecord
from .distributed import distributed_analyze_layers
from .layers import LayerRef
from .regroup import hookable_optimizer

__all__ = ["Measurement", "SynchronousMeasurement", "create_measurement", "MeasurementRuns"]

logger = logging.getLogger(__name__)

Result = tuple[int, list[LayerRecord]]


class Measurement(Protocol):
    """At most one measurement in flight, labelled with the scheduler step it measures."""

    @property
    def pending(self) -> int | None:
        """The label submitted and not yet collected, else None."""

    def submit(self, label: int) -> None:
        """Measure the layers' weights as they are now (the result is collected with :meth:`wait`)."""

    def ready(self) -> bool:
        """True when a submitted measurement has finished (collecting it will not block)."""

    def wait(self) -> Result | None:
        """``(label, records)`` of the submitted measurement (blocking until done), or None."""

    def close(self, wait: bool = True) -> None:
        """Drop any pending result and release what the measurement holds (a thread: joined
        with ``wait``)."""


class SynchronousMeasurement:
    """Measures in :meth:`submit`, on the calling thread; under ``torch.distributed`` every rank
    measures its share of the layers and all get every result (see
    :func:`tempbalance.distributed_analyze_layers`)."""

    def __init__(self, refs: Sequence[LayerRef], options: AnalysisOptions) -> None:
        self._refs = list(refs)
        self._options = options
        self._result: Result | None = None

    @property
    def pending(self) -> int | None:
        return None if self._result is None else self._result[0]

    def submit(self, label: int) -> None:
        self._result = (label, distributed_analyze_layers(self._refs, self._options))

    def ready(self) -> bool:
        return self._result is not None

    def wait(self) -> Result | None:
        result, self._result = self._result, None
        return result

    def close(self, wait: bool = True) -> None:
        self._result = None


def create_measurement(refs: Sequence[LayerRef], options: AnalysisOptions, asynchronous: bool) -> Measurement:
    """A :class:`~tempbalance.background.ThreadMeasurement` when ``asynchronous``, else a
    :class:`SynchronousMeasurement`."""
    if asynchronous:
        from .background import ThreadMeasurement

        return ThreadMeasurement(refs, options)
    return SynchronousMeasurement(refs, options)


class MeasurementRuns:
    """When measurements are taken and when their results land, for one scheduler.

    A due step :meth:`start`\\ s one (a pending one is collected first); a synchronous result
    lands at once, an asynchronous one before the first optimizer step after it finished (a
    step pre-hook) or at the next step. A loaded state's unfinished measurement is redone at
    the next optimizer step, from the weights loaded by then (:meth:`resume`).

    Args:
        refs: the matrices to measure.
        options: the measurement settings.
        asynchronous: measure on a worker thread.
        optimizer: the optimizer whose steps the results must precede.
        land: ``land(label, records, lag_steps)``, called on the training thread with each
            result (``lag_steps``: optimizer updates between the snapshot and now).
    """

    def __init__(self, refs: Sequence[LayerRef], options: AnalysisOptions, asynchronous: bool, optimizer: Any,
                 land: Callable[[int, list[LayerRecord], int], None]) -> None:
        self._now = SynchronousMeasurement(refs, options)
        self._current: Measurement = create_measurement(refs, options, True) if asynchronous else self._now
        self._optimizer = optimizer
        self._land = land
        self._resume: int | None = None
        self._optimizer_steps = 0
        self._submitted_at = 0
        self._hook: Any = None
        if asynchronous and refs:
            self._register_hook()

    @property
    def pending(self) -> int | None:
        """The label of a measurement submitted or to be redone and not landed yet, else None."""
        return self._resume if self._resume is not None else self._current.pending

    def start(self, label: int) -> None:
        """A due measurement of the weights as they are now (a pending one lands first)."""
        self._resume = None
        self.collect(block=True)
        self._submit(label)
        if self._current is self._now:
            self.collect()

    def between(self) -> None:
        """A step that is not due: start a resumed measurement, land a finished one."""
        self._submit_resumed()
        self.collect()

    def now(self, label: int) -> None:
        """Measure synchronously now and land it (a pending measurement lands first)."""
        self.collect(block=True)
        self._now.submit(label)
        self._land(*self._now.wait(), 0)

    def collect(self, block: bool = False) -> bool:
        """Land the submitted measurement when done (waiting for it with ``block``); True if one landed."""
        if self._current.pending is None or not (block or self._current.ready()):
            return False
        label, records = self._current.wait()
        self._land(label, records, self._optimizer_steps - self._submitted_at)
        return True

    def resume(self, label: int | None) -> None:
        """After loading a state: drop what is in flight; redo ``label``'s measurement (if any)
        at the next optimizer step."""
        if self._current.pending is not None:
            self._current.close(wait=False)
        self._resume = label
        if label is not None:
            self._register_hook()

    def close(self) -> None:
        """Stop the worker (a pending result is dropped) and remove the hook; later measurements
        are synchronous."""
        self._current.close()
        self._current = self._now
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _submit(self, label: int) -> None:
        self._submitted_at = self._optimizer_steps
        self._current.submit(label)

    def _submit_resumed(self) -> None:
        if self._resume is not None:
            label, self._resume = self._resume, None
            self._submit(label)

    def _register_hook(self) -> None:
        if self._hook is not None:
            return
        target = hookable_optimizer(self._optimizer)
        if target is None:
            logger.info("TempBalance: %s takes no step pre-hooks; measurements are applied at the next step() instead",
                        type(self._optimizer).__name__)
            return
        self._hook = target.register_step_pre_hook(self._before_optimizer_step)

    def _before_optimizer_step(self, *_: Any) -> None:
        self._submit_resumed()
        self.collect()
        self._optimizer_steps += 1
