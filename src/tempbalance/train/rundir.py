"""The files of one run directory: which exist, whether they agree, the settings they record,
and starting over. Shared by the training loop, sweeps and the report.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import remove_temporaries
from .checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME, checkpoint_epoch, peek_checkpoint

__all__ = [
    "CONFIG_NAME",
    "METRICS_NAME",
    "METRICS_CSV_NAME",
    "SUMMARY_NAME",
    "TENSORBOARD_DIR",
    "RUN_FILES",
    "RunFiles",
    "inspect_run",
    "recorded_settings",
    "remove_run",
    "remove_stale_temporaries",
]

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
METRICS_CSV_NAME = "metrics.csv"
SUMMARY_NAME = "summary.json"
TENSORBOARD_DIR = "tensorboard"
# Every file a run writes; any of them present means the directory holds a run.
RUN_FILES = (CONFIG_NAME, METRICS_NAME, METRICS_CSV_NAME, SUMMARY_NAME, CHECKPOINT_NAME, PREVIOUS_NAME)


def _read_json(path: Path) -> tuple[Any, str | None]:
    """(parsed value, None) or (None, why it cannot be read); (None, None) when missing."""
    if not path.is_file():
        return None, None
    try:
        return json.loads(path.read_text()), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path} is not valid JSON ({exc})"


def _last_metrics_epoch(path: Path) -> tuple[int | None, str | None]:
    """The ``epoch`` of the last row of ``metrics.jsonl`` (0 when empty), or why it is unreadable."""
    if not path.is_file():
        return None, None
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{path} cannot be read ({exc})"
    if not lines:
        return 0, None
    try:
        epoch = json.loads(lines[-1])["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return None, f"{path}:{len(lines)}: not a metrics row ({type(exc).__name__}: {exc})"
    if not isinstance(epoch, int):
        return None, f"{path}:{len(lines)}: epoch {epoch!r} is not an integer"
    return epoch, None


@dataclass
class RunFiles:
    """What a run directory holds.

    Attributes:
        present: the names of :data:`RUN_FILES` that exist.
        summary: ``summary.json`` (None when missing or unreadable).
        metrics_epoch: epoch of the last ``metrics.jsonl`` row (None when missing or unreadable).
        checkpoint_epoch: epoch of ``checkpoint.pt`` (None when missing or unreadable).
        problems: files that exist but cannot be read, each with the reason.
    """

    present: list[str] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    metrics_epoch: int | None = None
    checkpoint_epoch: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """A finished summary that the last metrics row and the checkpoint agree with (a run whose
        checkpoints were deleted counts when the summary and the metrics agree)."""
        if not self.summary or self.summary.get("status") != "finished" or self.problems:
            return False
        epochs = self.summary.get("epochs_done")
        return self.metrics_epoch == epochs and self.checkpoint_epoch in (None, epochs)

    def disagreement(self) -> str | None:
        """Why a finished summary is not to be trusted (it disagrees with the metrics or the
        checkpoint), or None."""
        if not self.summary or self.summary.get("status") != "finished" or self.finished:
            return None
        parts = [f"summary.json says {self.summary.get('epochs_done')} epochs"]
        if self.metrics_epoch is not None:
            parts.append(f"metrics.jsonl ends at epoch {self.metrics_epoch}")
        if self.checkpoint_epoch is not None:
            parts.append(f"checkpoint.pt holds epoch {self.checkpoint_epoch}")
        return ", ".join(parts + self.problems)


def inspect_run(directory: str | os.PathLike) -> RunFiles:
    """Read what ``directory`` holds, without loading any tensor (the checkpoint is memory-mapped)."""
    directory = Path(directory)
    files = RunFiles(present=[name for name in RUN_FILES if (directory / name).exists()])
    if not files.present:
        return files
    summary, problem = _read_json(directory / SUMMARY_NAME)
    files.summary = summary if isinstance(summary, dict) else None
    if problem or (summary is not None and not isinstance(summary, dict)):
        files.problems.append(problem or f"{directory / SUMMARY_NAME} is not a JSON object")
    files.metrics_epoch, problem = _last_metrics_epoch(directory / METRICS_NAME)
    if problem:
        files.problems.append(problem)
    files.checkpoint_epoch = checkpoint_epoch(directory)
    return files


def recorded_settings(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The training settings a run directory records: its newest readable checkpoint's config
    (read without its tensors), else ``config.json``; None when it holds neither."""
    directory = Path(directory)
    state = peek_checkpoint(directory)
    if state is not None:
        return dict(state["config"])
    config, _ = _read_json(directory / CONFIG_NAME)
    return config if isinstance(config, dict) else None


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files that killed writers left in ``directory`` (call only while holding
    the run's lock, so no other process is writing there)."""
    directory = Path(directory)
    removed = []
    for name in RUN_FILES:
        removed += remove_temporaries(directory / name)
    if removed:
        log.info("removed %d temporary file(s) left by an earlier process in %s", len(removed), directory)
    return removed


def remove_run(directory: str | os.PathLike) -> list[str]:
    """Delete a run's own files (:data:`RUN_FILES`, ``tensorboard/``) to start it over; other files
    in ``directory`` are left alone. Returns the names removed."""
    directory = Path(directory)
    removed = []
    for name in RUN_FILES:
        path = directory / name
        if path.exists():
            path.unlink()
            removed.append(name)
    if (directory / TENSORBOARD_DIR).is_dir():
        shutil.rmtree(directory / TENSORBOARD_DIR)
        removed.append(TENSORBOARD_DIR)
    remove_stale_temporaries(directory)
    return removed
