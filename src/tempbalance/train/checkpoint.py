"""Atomic checkpoints of a training run and the random-number state they carry.

Each save goes through :func:`tempbalance.atomic.write_atomic`; the previous good file is kept as
``checkpoint.prev.pt``. Reading tries ``checkpoint.pt`` then ``checkpoint.prev.pt``: any file that
cannot be read, or is not a complete training checkpoint, falls back to the other.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import write_atomic
from ..errors import TempBalanceError

__all__ = [
    "CheckpointError",
    "CHECKPOINT_NAME",
    "PREVIOUS_NAME",
    "REQUIRED_KEYS",
    "save_checkpoint",
    "load_checkpoint",
    "read_newest_checkpoint",
    "checkpoint_epoch",
    "peek_checkpoint",
    "rng_state",
    "set_rng_state",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
# What every training checkpoint holds; a file without one of them is foreign or damaged.
REQUIRED_KEYS = ("epoch", "config", "model", "optimizer", "scheduler", "rng", "metrics")


class CheckpointError(TempBalanceError):
    """No readable checkpoint: the message names the files tried and why they failed."""


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike, *, keep_previous: bool = True) -> Path:
    """Write ``state`` to ``directory/checkpoint.pt`` atomically; return its path.

    The data go to a temporary file unique to this process, are flushed and fsynced; then the
    current ``checkpoint.pt`` becomes ``checkpoint.prev.pt`` and the temporary is renamed into
    place, so a crash at any moment leaves at least one complete checkpoint.

    Args:
        keep_previous: rotate the current ``checkpoint.pt`` into ``checkpoint.prev.pt``. Pass False
            when the current file is known to be bad (a resume fell back to ``checkpoint.prev.pt``):
            the good ``checkpoint.prev.pt`` then stays, and the bad file is replaced.

    Raises:
        WriteError: the disk is full (or another OS error); nothing was renamed, no temporary is left.
    """
    directory = Path(directory)
    target = directory / CHECKPOINT_NAME

    def keep_current() -> None:
        if keep_previous and target.exists():
            os.replace(target, directory / PREVIOUS_NAME)

    return write_atomic(target, lambda handle: torch.save(state, handle), before_replace=keep_current)


def _read(path: Path, mmap: bool = False) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a tempbalance training checkpoint (a {type(state).__name__})")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a tempbalance training checkpoint (no {', '.join(missing)})")
    epoch, metrics = state["epoch"], state["metrics"]
    if not isinstance(epoch, int) or epoch < 0 or not isinstance(metrics, list) or len(metrics) != epoch:
        raise CheckpointError(f"{path} is damaged (epoch {epoch!r} but {len(metrics)} metric rows)")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path} is damaged (its config is not a mapping)")
    return state


def read_newest_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint of a run directory and the file it came from.

    Tries ``checkpoint.pt``, then ``checkpoint.prev.pt`` (logging a warning that names the file
    that failed and why). A file that cannot be unpickled, is not a dict, lacks one of
    :data:`REQUIRED_KEYS` or whose metrics do not match its epoch counts as unreadable. Returns
    None when neither file exists. Checkpoints are unpickled: load only your own runs.

    Raises:
        CheckpointError: files exist but none can be read (the message names each and why).
    """
    directory = Path(directory)
    existing = [path for path in (directory / CHECKPOINT_NAME, directory / PREVIOUS_NAME) if path.exists()]
    if not existing:
        return None
    problems = []
    for path in existing:
        try:
            state = _read(path)
        except Exception as exc:  # noqa: BLE001 - a truncated file raises many kinds of errors
            if isinstance(exc, CheckpointError):
                problems.append(str(exc))
            else:
                problems.append(f"{path} is unreadable ({type(exc).__name__}: {exc})")
            continue
        if problems:
            log.warning("%s; using %s (epoch %d)", "; ".join(problems), path, state["epoch"])
        return state, path
    raise CheckpointError("no readable checkpoint: " + "; ".join(problems))


def load_checkpoint(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The newest readable checkpoint of a run directory (see :func:`read_newest_checkpoint`), or None."""
    found = read_newest_checkpoint(directory)
    return None if found is None else found[0]


def peek_checkpoint(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The newest readable checkpoint of ``directory`` with its tensors memory-mapped, not read
    (milliseconds for any size: for its ``epoch`` and ``config``); None when there is none."""
    for path in (Path(directory) / CHECKPOINT_NAME, Path(directory) / PREVIOUS_NAME):
        if path.is_file():
            try:
                return _read(path, mmap=True)
            except Exception:  # noqa: BLE001 - damaged: try the other one
                continue
    return None


def checkpoint_epoch(directory: str | os.PathLike) -> int | None:
    """The epoch of ``directory/checkpoint.pt`` (memory-mapped, no tensor read); None when the
    file is missing or not a readable checkpoint."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        return int(_read(path, mmap=True)["epoch"])
    except Exception:  # noqa: BLE001 - damaged: the caller treats it as missing
        return None


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch CPU and (when present) CUDA random states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
