"""Grids of training runs (settings x methods x seeds) read from a TOML or JSON file.

A run is finished when its ``summary.json`` exists (skipped); a half-done run is resumed.
"""

from __future__ import annotations

import json
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import ConfigError, TempBalanceError
from .config import TrainConfig
from .loop import SUMMARY_NAME, run_training

__all__ = ["SweepRun", "load_sweep", "expand_sweep", "parse_override", "run_status", "run_sweep"]

log = logging.getLogger(__name__)

TOP_LEVEL_KEYS = ("name", "description", "out", "seeds", "base", "methods", "settings")
SETTING_KEYS = ("name", "methods")


@dataclass
class SweepRun:
    """One run of a sweep: where it belongs (setting, method, seed) and its full config."""

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

    Run directories are ``out/<setting>/<method>/seed<seed>``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {str(path)!r} does not exist")
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
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key, parsed


def _method_table(methods: Any, where: str) -> dict[str, dict[str, Any]]:
    if isinstance(methods, list):
        return {str(name): {} for name in methods}
    if isinstance(methods, dict):
        for name, overrides in methods.items():
            if not isinstance(overrides, dict):
                raise ConfigError(f"{where}: method {name!r} must map to a table of settings, got {overrides!r}")
        return methods
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
                merged = {**base, **values, **method_values, "method": method, "seed": seed, "tag": name}
                merged.update(extra)
                merged["out"] = str(root / name / method / f"seed{seed}")
                merged["resume"] = True
                config = TrainConfig.from_dict(merged)
                runs.append(SweepRun(name, method, seed, config.validate()))
    return runs


def run_status(run: SweepRun) -> str:
    """``"done"`` (summary.json exists), ``"partial"`` (a checkpoint exists) or ``"new"``."""
    if (run.out / SUMMARY_NAME).exists():
        return "done"
    if (run.out / "checkpoint.pt").exists() or (run.out / "checkpoint.prev.pt").exists():
        return "partial"
    return "new"


def run_sweep(runs: list[SweepRun]) -> list[dict[str, Any]]:
    """Run every unfinished run in order (resuming half-done ones); stop early if one is interrupted.

    A run that fails (diverges, or its directory holds a run with other settings) is logged and
    reported with ``status`` ``"failed"`` and ``error``; the sweep goes on.

    Returns the summaries of all runs reached (finished ones read from their ``summary.json``).
    """
    summaries = []
    for number, run in enumerate(runs, 1):
        status = run_status(run)
        if status == "done":
            log.info("[%d/%d] %s: done, skipped", number, len(runs), run.out)
            summaries.append(json.loads((run.out / SUMMARY_NAME).read_text()))
            continue
        log.info("[%d/%d] %s: %s", number, len(runs), run.out, "resuming" if status == "partial" else "starting")
        try:
            summary = run_training(run.config)
        except TempBalanceError as exc:  # e.g. a diverged run: record it, go on with the others
            log.error("[%d/%d] %s failed: %s", number, len(runs), run.out, exc)
            summary = {"status": "failed", "error": str(exc), "method": run.method, "seed": run.seed}
        summaries.append(summary)
        if summary["status"] == "interrupted":
            log.warning("sweep interrupted; rerun the same command to continue")
            break
    return summaries
