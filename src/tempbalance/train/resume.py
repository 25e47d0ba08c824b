"""Opening a run directory for training: take its lock, refuse to replace a run unless asked
(``resume`` continues it, ``overwrite`` starts over), and check that a resumed run continues the
same experiment (settings that only change the arithmetic are restored or warned about).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, spell
from .checkpoint import CHECKPOINT_NAME, read_newest_checkpoint
from .config import NUMERICS_FIELDS, TrainConfig
from .rundir import CONFIG_NAME, SUMMARY_NAME, inspect_run, recorded_settings, remove_run, remove_stale_temporaries
from .runlock import RunLock

__all__ = ["OpenedRun", "open_run"]

log = logging.getLogger(__name__)


@dataclass
class OpenedRun:
    """What training a run directory starts from.

    Attributes:
        finished: the summary of a run that is already finished (nothing to train), else None.
        state: the checkpoint to continue from, None for a fresh start.
        keep_previous: False when ``checkpoint.pt`` is bad (the resume fell back to
            ``checkpoint.prev.pt``): the next save then keeps ``checkpoint.prev.pt``.
        recorded: the run's own settings (None for a fresh start); checkpoints keep its values of
            the fields that change only the arithmetic.
        environment: the thread count and device the run was started with (None: a fresh start).
        threads: the thread count to use (the run's own when not given), None to leave as is.
        changed: the settings that change the arithmetic and differ from the run's (warned about).
    """

    finished: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    keep_previous: bool = True
    recorded: dict[str, Any] | None = None
    environment: dict[str, Any] | None = None
    threads: int | None = None
    changed: list[str] = field(default_factory=list)


def _config_json(out: Path) -> dict[str, Any] | None:
    try:
        value = json.loads((out / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _check_same_experiment(recorded: dict[str, Any], config: TrainConfig, out: Path) -> None:
    changed = config.differences(recorded)
    if changed:
        raise ConfigError(
            f"cannot resume {out}: settings differ from the run's ({'; '.join(changed)}); "
            f"use the same settings, start over ({spell('overwrite')}) or choose another output directory"
        )


def _numerics(opened: OpenedRun, config: TrainConfig, device: torch.device, out: Path) -> None:
    """Restore the run's thread count when none is given; warn once about explicit changes of
    threads, device, compile or deterministic (the result is then not bit-identical)."""
    recorded, environment = opened.recorded or {}, opened.environment or {}
    run_threads = recorded.get("num_threads") or environment.get("threads")
    changed = []
    if config.num_threads is None:
        if run_threads and run_threads != torch.get_num_threads():
            log.info("%s: using %d thread(s) as the run did (this process would use %d)", out, run_threads,
                     torch.get_num_threads())
            opened.threads = int(run_threads)
    elif run_threads and config.num_threads != run_threads:
        changed.append(f"num_threads {run_threads} -> {config.num_threads}")
    defaults = TrainConfig().to_dict()
    for name in sorted(NUMERICS_FIELDS - {"num_threads", "device"}):
        before = recorded.get(name, defaults[name])
        if before != getattr(config, name):
            changed.append(f"{name} {before} -> {getattr(config, name)}")
    if environment.get("device") and environment["device"] != str(device):
        changed.append(f"device {environment['device']} -> {device}")
    if changed:
        log.warning(
            "resuming %s with %s: the result will no longer be bit-identical to an uninterrupted run "
            "(%s keeps the run's original settings)", out, ", ".join(changed), CONFIG_NAME,
        )
    opened.changed = changed


def _start_fresh(config: TrainConfig, out: Path, present: list[str]) -> OpenedRun:
    if config.overwrite:
        removed = remove_run(out)
        if removed:
            log.info("%s: removed the earlier run (%s) to start over", out, ", ".join(removed))
    elif present:
        raise ConfigError(
            f"{out} already holds a run ({', '.join(present)}); pass {spell('resume')} to continue it or "
            f"{spell('overwrite')} to start over, or choose another output directory"
        )
    return OpenedRun()


def open_run(config: TrainConfig, out: Path | None, device: torch.device, locks: contextlib.ExitStack) -> OpenedRun:
    """Lock ``out`` (held until ``locks`` closes) and decide how training starts there.

    Raises:
        RunLockedError: another process trains this directory.
        ConfigError: a run exists without ``resume``/``overwrite``, or with other settings.
        CheckpointError: ``resume`` but the checkpoint files cannot be read.
    """
    if out is None:
        return OpenedRun()
    locks.enter_context(RunLock(out))
    remove_stale_temporaries(out)
    files = inspect_run(out)
    if not config.resume:
        return _start_fresh(config, out, files.present)
    if files.finished:
        _check_same_experiment(_config_json(out) or recorded_settings(out) or {}, config, out)
        log.info("%s is already finished", out)
        return OpenedRun(finished=files.summary)
    found = read_newest_checkpoint(out)
    recorded = found[0]["config"] if found is not None else _config_json(out)
    if recorded is not None:
        _check_same_experiment(recorded, config, out)
    disagreement = files.disagreement()
    if disagreement:
        log.warning("%s: %s; continuing from the checkpoint", out, disagreement)
        (out / SUMMARY_NAME).unlink()
    if found is None:
        if files.present:
            log.info("%s has no checkpoint yet (%s): starting the run from the beginning", out,
                     ", ".join(files.present))
            remove_run(out)
        return OpenedRun()
    state, source = found
    written = _config_json(out) or {}
    environment = state.get("environment") or {  # checkpoints before this release: config.json's record
        "threads": (written.get("environment") or {}).get("threads"), "device": written.get("device"),
    }
    opened = OpenedRun(state=state, keep_previous=source.name == CHECKPOINT_NAME, recorded=recorded,
                       environment=environment)
    _numerics(opened, config, device, out)
    return opened
