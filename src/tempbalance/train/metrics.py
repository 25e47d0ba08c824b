"""Per-epoch metrics of a run: ``metrics.jsonl``, ``metrics.csv`` and (when installed) TensorBoard.

Rows are plain dicts; per-layer values sit in nested ``alpha`` / ``layer_lr`` / ``layer_wd`` dicts (flattened
in the CSV).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from .checkpoint import write_text_atomic

__all__ = ["MetricsWriter", "read_metrics", "flatten_row"]

log = logging.getLogger(__name__)

NESTED_KEYS = ("alpha", "layer_lr", "layer_wd")


def flatten_row(row: dict[str, Any]) -> dict[str, Any]:
    """``{"alpha": {"conv2": 3.1}}`` -> ``{"alpha/conv2": 3.1}``; scalar keys are kept."""
    flat = {key: value for key, value in row.items() if key not in NESTED_KEYS}
    for key in NESTED_KEYS:
        for name, value in (row.get(key) or {}).items():
            flat[f"{key}/{name}"] = value
    return flat


class MetricsWriter:
    """Writes every epoch's row of a run under ``directory``.

    :meth:`write` takes the full list of rows so far and rewrites both files (a resumed run
    therefore never keeps rows of epochs that it redoes); TensorBoard gets the newest row only.
    """

    def __init__(self, directory: str | os.PathLike, tensorboard: bool = True):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._tb = self._open_tensorboard() if tensorboard else None

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.debug("tensorboard is not installed; metrics go to metrics.jsonl and metrics.csv only")
            return None
        return SummaryWriter(str(self.directory / "tensorboard"))

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` and ``metrics.csv`` from ``rows``; log the last to TensorBoard."""
        write_text_atomic(self.directory / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        flat = [flatten_row(row) for row in rows]
        columns: list[str] = []
        for row in flat:
            columns += [key for key in row if key not in columns]
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
        write_text_atomic(self.directory / "metrics.csv", table.getvalue())
        if self._tb is not None and rows:
            last = flatten_row(rows[-1])
            for key, value in last.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._tb.add_scalar(key, value, global_step=int(rows[-1]["epoch"]))
            self._tb.flush()

    def close(self) -> None:
        """Close the TensorBoard writer, if any."""
        if self._tb is not None:
            self._tb.close()


def read_metrics(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``directory/metrics.jsonl`` ([] when missing)."""
    path = Path(directory) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in _lines(path)]


def _lines(path: Path) -> Iterable[str]:
    with open(path) as handle:
        for line in handle:
            if line.strip():
                yield line
