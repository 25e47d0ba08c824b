"""Grids of training runs (settings x methods x seeds) read from a TOML or JSON file.

A finished run whose files agree and whose settings are the sweep's is skipped; a half-done run is
resumed; a run trained by another process right now (its lock is held) is left to it, so several
processes may run the same sweep at once. A run whose recorded settings differ is stale.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..atomic import WriteError
from ..errors import ConfigError, Placeholder, TempBalanceError, spell
from .config import TrainConfig, parse_value
from .data.loading import check_data_source
from .devices import resolve_device
from .distributed_run import detect_launch
from .loop import run_training
from .rundir import inspect_run, recorded_settings
from .runlock import RunLockedError, lock_holder

__all__ = [
    "SweepRun", "STATUSES", "load_sweep", "expand_sweep", "parse_override", "run_status", "check_runs", "run_sweep",
]

log = logging.getLogger(__name__)

TOP_LEVEL_KEYS = ("name", "description", "out", "seeds", "base", "methods", "settings")
SETTING_KEYS = ("name", "methods")
# Settings the sweep itself sets for every run (the run directory is named after them): not overridable.
SWEEP_OWNED = {
    "method": lambda: "the sweep file's methods choose it",
    "seed": lambda: f"{spell('seeds', Placeholder('[...]'))} chooses the seeds",
    "tag": lambda: "it is the setting's name",
    "resume": lambda: "a sweep always resumes half-done runs",
    "overwrite": lambda: f"{spell('rerun_stale')} retrains runs whose settings changed",
}
# What run_status returns.
STATUSES = ("new", "partial", "done", "stale", "running")


@dataclass
class SweepRun:
    """One run of a sweep: where it belongs (setting, method, seed) and its full config.

    ``method`` is the sweep's name of the method entry (the run directory's name); the training
    method is ``config.method`` (the same unless the entry sets ``method`` itself).
    """

    setting: str
    method: str
    seed: int
    config: TrainConfig

    @property
    def out(self) -> Path:
        """The run directory."""
        return Path(self.config.out)


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read a sweep file (``.toml`` or ``.json``) into a dict.

    The format (TOML shown)::

        name = "cifar10"                 # optional
        out = "runs/paper/cifar10"       # root of the run directories
        seeds = [43, 37, 13, 51, 71]
        methods = ["cal", "tb"]          # default methods: a list, or a table name -> overrides
        [base]                           # TrainConfig fields shared by every run
        dataset = "cifar10"
        epochs = 200
        [[settings]]                     # one block per setting (optional: default one setting)
        name = "resnet18"
        model = "resnet18"
        [settings.methods]               # this setting's methods and their own overrides
        cal = { lr = 0.1 }
        "tb+snr" = { lr = 0.1, snr_coef = 0.001, s1 = 0.6, s2 = 1.4 }
        "tb-farms" = { method = "tb", esd = "farms" }   # a named variant of a method

    Run directories are ``out/<setting>/<entry>/seed<seed>``, where an entry is a method name or
    a variant's own name (an entry with a ``method`` key: any name, the method it trains).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist")
    if path.suffix == ".toml":
        with open(path, "rb") as handle:
            try:
                spec = tomllib.load(handle)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    elif path.suffix == ".json":
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    else:
        raise ConfigError(f"sweep file {str(path)!r} must end in .toml or .json")
    spec.setdefault("name", path.stem)
    return spec


def parse_override(text: str) -> tuple[str, Any]:
    """``"epochs=2"`` -> ``("epochs", 2)``; the value is read as TOML (numbers, booleans,
    ``[lists]``, ``"strings"``), falling back to the raw text (so ``device=cpu`` works)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. epochs=2)")
    return key, parse_value(value)


def _method_table(methods: Any, where: str) -> dict[str, dict[str, Any]]:
    """Entry name -> its settings, ``method`` included (the entry's name unless it names one)."""
    if isinstance(methods, list):
        return {str(name): {"method": str(name)} for name in methods}
    if isinstance(methods, dict):
        table = {}
        for name, overrides in methods.items():
            if not isinstance(overrides, dict):
                raise ConfigError(f"{where}: method {name!r} must map to a table of settings, got {overrides!r}")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_-]*", str(name)):
                raise ConfigError(
                    f"{where}: method entry {name!r} must be a plain name (letters, digits, . + _ -): it names the "
                    "run directories"
                )
            table[str(name)] = {"method": str(name), **overrides}
        return table
    raise ConfigError(f"{where}: methods must be a list of names or a table name -> settings, got {methods!r}")


def _setting_name(setting: dict[str, Any]) -> str:
    if "name" in setting:
        return str(setting["name"])
    keys = [key for key in setting if key not in SETTING_KEYS]
    return "_".join(f"{key}-{setting[key]}" for key in keys) or "default"


def expand_sweep(
    spec: dict[str, Any], overrides: Iterable[str] | dict[str, Any] = (), out: str | Path | None = None
) -> list[SweepRun]:
    """Every run of a sweep, in order settings x methods x seeds, validated.

    Args:
        spec: what :func:`load_sweep` returned.
        overrides: ``key=value`` strings (or a dict) applied last to every run; ``seeds`` replaces
            the seed list, ``out`` the root directory, anything else is a :class:`TrainConfig` field.
        out: root directory (overrides the file's ``out``; default ``runs/<name>``).
    """
    unknown = sorted(set(spec) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {unknown}; accepted: {', '.join(TOP_LEVEL_KEYS)}")
    extra = dict(parse_override(item) for item in overrides) if not isinstance(overrides, dict) else dict(overrides)
    owned = sorted(set(extra) & set(SWEEP_OWNED))
    if owned:
        key = owned[0]
        raise ConfigError(
            f"cannot override {key!r} for every run of a sweep ({SWEEP_OWNED[key]()}); the sweep names its "
            "run directories after the setting, method and seed"
        )
    seeds = extra.pop("seeds", spec.get("seeds", [43]))
    if isinstance(seeds, int):
        seeds = [seeds]
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"seeds={seeds!r} must be a non-empty list of integers")
    root = Path(extra.pop("out", None) or out or spec.get("out") or Path("runs") / str(spec["name"]))
    base = dict(spec.get("base", {}))
    settings = spec.get("settings") or [{"name": "default"}]
    default_methods = spec.get("methods", ["cal"])
    runs: list[SweepRun] = []
    names: set[str] = set()
    for setting in settings:
        name = _setting_name(setting)
        if name in names:
            raise ConfigError(f"two settings are named {name!r}; give each setting a unique name")
        names.add(name)
        where = f"setting {name!r}"
        methods = _method_table(setting.get("methods", default_methods), where)
        values = {key: value for key, value in setting.items() if key not in SETTING_KEYS}
        for method, method_values in methods.items():
            for seed in seeds:
                merged = {**base, **values, **method_values, "seed": seed, "tag": name}
                merged.update(extra)
                merged["out"] = str(root / name / method / f"seed{seed}")
                merged["resume"] = True
                config = TrainConfig.from_dict(merged)
                runs.append(SweepRun(name, method, seed, config.validate()))
    return runs


def run_status(run: SweepRun) -> str:
    """Where a run stands, one of :data:`STATUSES`:

    - ``"running"``: another process holds its lock and trains it now;
    - ``"stale"``: its directory holds a run whose recorded settings differ from the run's now
      (e.g. other ``epochs``): skipped unless retrained with ``rerun_stale``;
    - ``"done"``: finished, and ``summary.json``, the last ``metrics.jsonl`` row and the final
      checkpoint agree;
    - ``"partial"``: a run with these settings to continue (a checkpoint, or files that disagree);
    - ``"new"``: nothing there yet.
    """
    if lock_holder(run.out) is not None:
        return "running"
    files = inspect_run(run.out)
    if not files.present:
        return "new"
    recorded = recorded_settings(run.out)
    if recorded is not None and run.config.differences(recorded):
        return "stale"
    return "done" if files.finished else "partial"


def check_runs(runs: list[SweepRun]) -> None:
    """Check, once before any run starts, that every device exists here and every data directory
    holds its data set (each distinct one once).

    Raises:
        ConfigError: naming the problem and how many of the runs it concerns.
    """
    checks: dict[tuple, list[SweepRun]] = {}
    for run in runs:
        if detect_launch() is None:
            checks.setdefault(("device", run.config.device), []).append(run)
        checks.setdefault(("data", run.config.dataset, run.config.data_dir, run.config.download), []).append(run)
    for key, concerned in checks.items():
        try:
            if key[0] == "device":
                resolve_device(key[1])
            else:
                check_data_source(*key[1:])
        except ConfigError as exc:
            share = "every run" if len(concerned) == len(runs) else f"{len(concerned)} of {len(runs)} runs"
            raise ConfigError(f"{exc} ({share} of the sweep, e.g. {concerned[0].out})") from None


def _label(run: SweepRun) -> str:
    return f"{run.setting} {run.method} seed {run.seed}"


def _record(run: SweepRun, status: str, **extra: Any) -> dict[str, Any]:
    return {"status": status, "setting": run.setting, "method": run.method, "seed": run.seed,
            "out": str(run.out), **extra}


def run_sweep(runs: list[SweepRun], *, rerun_stale: bool = False) -> list[dict[str, Any]]:
    """Run every unfinished run in order (resuming half-done ones); stop early if one is interrupted.

    Devices and data directories are checked for every run before the first one starts. A run
    another process is training (its lock is held) is skipped; so is a stale run (recorded
    settings differ from the sweep's), unless ``rerun_stale`` retrains it from scratch. A run that
    fails (diverges, say) is logged and the sweep goes on, except when the disk is full.

    Returns:
        One dict per run reached: the summary of finished ones (read from their ``summary.json``),
        else ``{"status": "failed" | "skipped" | "stale", "setting", "method", "seed", "out",
        "reason"}`` (``error`` for failures).

    Raises:
        ConfigError: a device or data directory that does not work for some of the runs.
    """
    check_runs(runs)
    summaries = []
    for number, run in enumerate(runs, 1):
        where = f"[{number}/{len(runs)}] {run.out}"
        status = run_status(run)
        if status == "done":
            log.info("%s: done, skipped", where)
            summaries.append(inspect_run(run.out).summary)
            continue
        if status == "running":
            reason = f"trained by another process ({lock_holder(run.out) or 'it just finished'})"
            log.info("%s: %s, skipped", where, reason)
            summaries.append(_record(run, "skipped", reason=reason))
            continue
        config = run.config
        if status == "stale":
            recorded = recorded_settings(run.out) or {}
            reason = f"its recorded settings differ ({'; '.join(config.differences(recorded))})"
            if not rerun_stale:
                log.warning("%s: stale, skipped: %s", where, reason)
                summaries.append(_record(run, "stale", reason=reason))
                continue
            log.info("%s: stale: %s; training it again from the start", where, reason)
            config = dataclasses.replace(config, resume=False, overwrite=True)
        else:
            log.info("%s: %s", where, "resuming" if status == "partial" else "starting")
        try:
            summary = run_training(config)
        except RunLockedError as exc:  # another process took it a moment ago
            log.info("%s: skipped: %s", where, exc)
            summary = _record(run, "skipped", reason=f"trained by another process ({exc.holder})")
        except TempBalanceError as exc:  # e.g. a diverged run: record it, go on with the others
            log.error("%s failed: %s", where, exc)
            summary = _record(run, "failed", error=str(exc))
            if isinstance(exc, WriteError) and exc.disk_full:
                summaries.append(summary)
                log.error("the disk is full: stopping the sweep; free some space and rerun the same command")
                break
        summaries.append(summary)
        if summary["status"] == "interrupted":
            log.warning("sweep interrupted; rerun the same command to continue")
            break
    return summaries
