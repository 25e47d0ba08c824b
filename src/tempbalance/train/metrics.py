"""Per-epoch metrics of a run: ``metrics.jsonl``, ``metrics.csv`` and (when installed) TensorBoard.

Rows are plain dicts; per-layer values sit in nested ``alpha`` / ``layer_lr`` / ``layer_wd`` dicts (flattened
in the CSV). ``metrics.jsonl`` is strict JSON: a non-finite number is written as ``null``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from ..atomic import json_safe, write_atomic
from ..errors import TempBalanceError
from .rundir import METRICS_CSV_NAME, METRICS_NAME, TENSORBOARD_DIR

__all__ = ["MetricsWriter", "MetricsError", "read_metrics", "flatten_row", "REQUIRED_COLUMNS"]

log = logging.getLogger(__name__)

NESTED_KEYS = ("alpha", "layer_lr", "layer_wd")
# What every row holds (numbers; the report needs them).
REQUIRED_COLUMNS = ("epoch", "test_acc")


class MetricsError(TempBalanceError):
    """A ``metrics.jsonl`` that cannot be read: the message names the file, the line and why."""


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
        except Exception as error:  # noqa: BLE001 - a broken install (protobuf, numpy) must not stop training
            return self._tensorboard_failed("importing", error)
        try:
            return SummaryWriter(str(self.directory / TENSORBOARD_DIR))
        except Exception as error:  # noqa: BLE001
            return self._tensorboard_failed("opening", error)

    def _tensorboard_failed(self, doing: str, error: Exception) -> None:
        """Disable TensorBoard for this run with one warning (the JSONL and CSV files go on)."""
        log.warning("TensorBoard disabled: %s it failed (%s: %s); metrics go to metrics.jsonl and metrics.csv only",
                    doing, type(error).__name__, error)
        writer, self._tb = getattr(self, "_tb", None), None
        if writer is not None and doing != "closing":
            with contextlib.suppress(Exception):
                writer.close()

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` and ``metrics.csv`` from ``rows``; log the last to TensorBoard.

        Raises:
            WriteError: a file could not be written (e.g. the disk is full); it names the file.
        """
        clean = [json_safe(row) for row in rows]
        text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in clean)
        write_atomic(self.directory / METRICS_NAME, text)
        flat = [flatten_row(row) for row in clean]
        columns: list[str] = []
        for row in flat:
            columns += [key for key in row if key not in columns]
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
        write_atomic(self.directory / METRICS_CSV_NAME, table.getvalue())
        if self._tb is not None and clean:
            try:
                last = flatten_row(clean[-1])
                for key, value in last.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                        self._tb.add_scalar(key, value, global_step=int(clean[-1]["epoch"]))
                self._tb.flush()
            except Exception as error:  # noqa: BLE001 - a full disk or a broken writer must not stop training
                self._tensorboard_failed("writing", error)

    def close(self) -> None:
        """Close the TensorBoard writer, if any."""
        if self._tb is not None:
            try:
                self._tb.close()
            except Exception as error:  # noqa: BLE001
                self._tensorboard_failed("closing", error)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``directory/metrics.jsonl`` ([] when missing); ``null`` reads as None.

    Raises:
        MetricsError: a line that is not a JSON object, or a row without a number in one of
            :data:`REQUIRED_COLUMNS`; the message names the file and the line.
    """
    path = Path(directory) / METRICS_NAME
    if not path.exists():
        return []
    rows = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise MetricsError(f"{path} cannot be read ({exc})") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, parse_constant=lambda name: None)  # old files: NaN/Infinity -> None
        except json.JSONDecodeError as exc:
            raise MetricsError(f"{path}:{number}: not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise MetricsError(f"{path}:{number}: a row must be a JSON object, got {type(row).__name__}")
        bad = [key for key in REQUIRED_COLUMNS if not _number(row.get(key))]
        if bad:
            raise MetricsError(f"{path}:{number}: no number in {', '.join(bad)}")
        rows.append(row)
    return rows
