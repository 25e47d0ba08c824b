"""Atomic checkpoints of a training run and the random-number state they carry.

Write to a temporary file, fsync, keep the previous good file as ``checkpoint.prev.pt``, rename.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import TempBalanceError

__all__ = [
    "CheckpointError",
    "CHECKPOINT_NAME",
    "PREVIOUS_NAME",
    "save_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"


class CheckpointError(TempBalanceError):
    """No readable checkpoint: the message names the files tried and why they failed."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: temporary file in the same directory, fsync,
    rename. A crash leaves either the old file or the new one, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write ``state`` to ``directory/checkpoint.pt`` atomically; return its path.

    The data go to a temporary file in the same directory, are flushed and fsynced, the current
    ``checkpoint.pt`` (if any) becomes ``checkpoint.prev.pt``, and the temporary file is renamed
    into place, so a crash at any moment leaves at least one complete checkpoint.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_NAME
    tmp = directory / f".{CHECKPOINT_NAME}.tmp"
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    if target.exists():
        os.replace(target, directory / PREVIOUS_NAME)
    os.replace(tmp, target)
    _fsync_dir(directory)
    return target


def _read(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "epoch" not in state:
        raise CheckpointError(f"{path} is not a tempbalance training checkpoint")
    return state


def load_checkpoint(directory: str | os.PathLike) -> dict[str, Any] | None:
    """Read the newest readable checkpoint of a run directory.

    Tries ``checkpoint.pt``, then ``checkpoint.prev.pt`` (logging a warning that names the
    broken file). Returns None when the directory holds neither file. Checkpoints are
    unpickled: load only your own runs.

    Raises:
        CheckpointError: files exist but none can be read (the message names each and why).
    """
    directory = Path(directory)
    candidates = [directory / CHECKPOINT_NAME, directory / PREVIOUS_NAME]
    existing = [path for path in candidates if path.exists()]
    if not existing:
        return None
    problems = []
    for path in existing:
        try:
            state = _read(path)
        except Exception as exc:  # noqa: BLE001 - a truncated file raises many kinds of errors
            problems.append(f"{path} is unreadable ({type(exc).__name__}: {exc})")
            continue
        if problems:
            log.warning("%s; resuming from %s (epoch %d)", "; ".join(problems), path, state["epoch"])
        return state
    raise CheckpointError("no readable checkpoint: " + "; ".join(problems))


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
