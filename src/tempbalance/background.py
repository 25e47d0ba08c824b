"""Layer measurements off the training path: a CPU snapshot of the weights, measured by one
worker thread while training goes on (the asynchronous mode of :class:`tempbalance.TempBalance`).

The snapshot is taken on the calling thread (a copy to host memory; on an accelerator this waits
for the queued kernels that write the weights, as any ``.item()`` does), so later optimizer steps
never change what is measured. The worker then runs :func:`tempbalance.analysis.analyze_layers`
on the copies, in the precision the options ask for, with torch's CPU threads.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import torch

from .analysis import AnalysisOptions, LayerRecord, analyze_layers
from .layers import LayerRef

__all__ = ["ThreadMeasurement", "snapshot_refs"]

logger = logging.getLogger(__name__)


def snapshot_refs(refs: Sequence[LayerRef]) -> list[LayerRef]:
    """The same layers with each weight replaced by a detached CPU copy (tied weights copied once).

    The copies keep the weights' dtype; ``module`` is still the live module (matrix functions read
    only its configuration, e.g. a convolution's ``groups``).
    """
    copies: dict[int, torch.Tensor] = {}
    out = []
    for ref in refs:
        key = id(ref.weight)
        if key not in copies:
            copies[key] = ref.weight.detach().to("cpu", copy=True)
        out.append(dataclasses.replace(ref, weight=copies[key]))
    return out


class ThreadMeasurement:
    """At most one measurement in flight, on one worker thread (a
    :class:`tempbalance.measure.Measurement`).

    Args:
        refs: the layers to measure (the live model's).
        options: the measurement settings.

    :meth:`submit` with a label (the scheduler's step) snapshots the weights and starts the
    worker; :meth:`ready` tells from the training thread whether it finished, :meth:`wait`
    blocks for the result. An exception in the worker is raised again by :meth:`wait`.
    """

    def __init__(self, refs: Sequence[LayerRef], options: AnalysisOptions) -> None:
        self._refs = list(refs)
        self._options = options
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future[list[LayerRecord]] | None = None
        self._label: int | None = None

    @property
    def pending(self) -> int | None:
        """The label of the measurement in flight (or finished but not collected), else None."""
        return self._label

    def submit(self, label: int) -> None:
        """Snapshot the weights now and measure them on the worker thread.

        Raises:
            RuntimeError: a measurement is still pending (collect it first).
        """
        if self._future is not None:
            raise RuntimeError(f"a measurement (step {self._label}) is still pending; collect it with wait() first")
        snapshot = snapshot_refs(self._refs)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tempbalance-measure")
        self._future = self._executor.submit(analyze_layers, snapshot, self._options)
        self._label = label
        logger.debug("TempBalance: background measurement of step %d started (%d layers)", label, len(snapshot))

    def ready(self) -> bool:
        """True when the pending measurement has finished (:meth:`wait` will not block)."""
        return self._future is not None and self._future.done()

    def wait(self) -> tuple[int, list[LayerRecord]] | None:
        """Block until the pending measurement finishes; ``(label, records)``, or None if none."""
        if self._future is None:
            return None
        return self._collect()

    def _collect(self) -> tuple[int, list[LayerRecord]]:
        future, label = self._future, self._label
        self._future, self._label = None, None
        assert future is not None and label is not None
        return label, future.result()

    def close(self, wait: bool = True) -> None:
        """Drop any pending result and stop the worker thread; with ``wait``, return once it has
        ended (after the measurement it is running, if any)."""
        self._future, self._label = None, None
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=True)
            self._executor = None
