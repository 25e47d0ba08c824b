"""Tables and plots from a directory of finished runs: mean ± std of final and best test accuracy
per setting and method, paired differences against ``cal``, accuracy curves, alpha / rate / weight-decay
heat maps.

Only finished runs whose files agree enter the tables and the plots; unfinished runs are listed,
and a run whose files cannot be read is listed with the reason (one warning naming the file).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_atomic
from ..errors import ConfigError
from .metrics import MetricsError, read_metrics
from .rundir import CONFIG_NAME, inspect_run

__all__ = ["RunResult", "collect_runs", "method_label", "summarize", "to_markdown", "write_report", "BASELINE"]

log = logging.getLogger(__name__)

BASELINE = "cal"
CSV_COLUMNS = (
    "setting",
    "method",
    "n_seeds",
    "final_mean",
    "final_std",
    "best_mean",
    "best_std",
    "diff_vs_cal_mean",
    "diff_vs_cal_std",
    "n_pairs",
    "seeds",
)


@dataclass
class RunResult:
    """One run directory: its config, per-epoch metrics and summary (None while unfinished).

    ``problem`` says why the run cannot be used (an unreadable file, files that disagree); such a
    run is listed in the report but left out of its tables and plots.
    """

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    setting: str = ""
    method: str = ""
    seed: int = 0
    problem: str | None = None

    @property
    def finished(self) -> bool:
        return self.problem is None and self.summary is not None and self.summary.get("status") == "finished"

    @property
    def final_acc(self) -> float:
        return float(self.metrics[-1]["test_acc"])

    @property
    def best_acc(self) -> float:
        return max(float(row["test_acc"]) for row in self.metrics)


def _read_run(directory: Path) -> RunResult | None:
    """The run in ``directory`` (None when its config.json is not a run's); a problem is recorded
    on the result and logged once, naming the file."""
    config_path = directory / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("skipping %s: %s is not valid JSON (%s)", directory, config_path, exc)
        return RunResult(directory, {}, [], None, "?", "?", 0, problem=f"{config_path} is not valid JSON")
    if not isinstance(config, dict) or "method" not in config:
        return None
    setting = config.get("tag") or f"{config.get('dataset')}/{config.get('model')}"
    seed = config.get("seed")
    run = RunResult(directory, config, [], None, setting, method_label(config), seed if isinstance(seed, int) else 0)
    if not isinstance(seed, int):
        run.problem = f"{config_path} has no integer seed"
    files = inspect_run(directory)
    run.summary = files.summary
    try:
        run.metrics = read_metrics(directory)
    except MetricsError as exc:
        run.problem = str(exc)
    if run.problem is None and files.problems:
        run.problem = "; ".join(files.problems)
    if run.problem is None and files.summary and files.summary.get("status") == "finished":
        if not run.metrics:
            run.problem = f"{directory / 'metrics.jsonl'} has no rows although the run finished"
        elif not files.finished:
            run.problem = f"its files disagree: {files.disagreement()}"
    if run.problem is not None:
        log.warning("leaving %s out of the report: %s", directory, run.problem)
    return run


def collect_runs(root: str | Path) -> list[RunResult]:
    """Every run directory under ``root`` (any depth; one with a ``config.json``), sorted by path.

    A run's setting is its ``tag`` (a sweep's setting name) or ``dataset/model``. A run whose files
    cannot be read, or disagree, is returned with its ``problem`` set.

    Raises:
        ConfigError: ``root`` does not exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"runs directory {str(root)!r} does not exist")
    runs = []
    for config_path in sorted(root.rglob(CONFIG_NAME)):
        run = _read_run(config_path.parent)
        if run is not None:
            runs.append(run)
    _label_variants(runs)
    return runs


def _label_variants(runs: list[RunResult]) -> None:
    """Runs of one (setting, method) whose settings differ beyond the seed are different
    experiments: append the differing settings to their method (``tb[s1=0.8,s2=1.2]``), so no
    row of the report averages them together."""
    from .config import TrainConfig

    groups: dict[tuple[str, str], list[RunResult]] = {}
    for run in runs:
        if run.problem is None:
            groups.setdefault((run.setting, run.method), []).append(run)
    for group in groups.values():
        values = [TrainConfig.experiment_settings(run.config) for run in group]
        compared = [key for key in values[0] if key not in ("seed", "method", "esd")]
        differing = [key for key in compared if len({json.dumps(v[key], sort_keys=True) for v in values}) > 1]
        if not differing:
            continue
        log.info("runs of %s / %s differ in %s: reported as separate rows", group[0].setting, group[0].method,
                 ", ".join(differing))
        for run, settings in zip(group, values):
            run.method += "[" + ",".join(f"{key}={settings[key]}" for key in differing) + "]"


def method_label(config: dict[str, Any]) -> str:
    """A run's method as the report names it: ``config["method"]``, with ``[esd=...]`` appended for a
    balancing method (``tb``, ``tb+snr``, ``tb+sgdp``) measured on a non-default spectrum."""
    method = str(config["method"])
    esd = config.get("esd", "full")
    if esd != "full" and "tb" in method.split("+"):
        return f"{method}[esd={esd}]"
    return method


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class _Group:
    runs: dict[int, RunResult] = field(default_factory=dict)


def summarize(runs: list[RunResult]) -> list[dict[str, Any]]:
    """One row per (setting, method) over finished runs, in first-seen order.

    Row keys: ``CSV_COLUMNS``. Accuracies in %; std is the sample std (None with one seed).
    ``diff_vs_cal_*`` is the mean / std over seeds shared with ``cal`` in the same setting of
    (method's final accuracy - cal's), None when no seed is shared or for ``cal`` itself.
    """
    groups: dict[tuple[str, str], _Group] = {}
    for run in runs:
        if run.finished and run.metrics:
            groups.setdefault((run.setting, run.method), _Group()).runs[run.seed] = run
    rows = []
    for (setting, method), group in groups.items():
        seeds = sorted(group.runs)
        final_mean, final_std = _mean_std([group.runs[s].final_acc for s in seeds])
        best_mean, best_std = _mean_std([group.runs[s].best_acc for s in seeds])
        baseline = groups.get((setting, BASELINE))
        diffs: list[float] = []
        if baseline is not None and method != BASELINE:
            diffs = [group.runs[s].final_acc - baseline.runs[s].final_acc for s in seeds if s in baseline.runs]
        diff_mean, diff_std = _mean_std(diffs)
        rows.append(
            {
                "setting": setting,
                "method": method,
                "n_seeds": len(seeds),
                "final_mean": final_mean,
                "final_std": final_std,
                "best_mean": best_mean,
                "best_std": best_std,
                "diff_vs_cal_mean": diff_mean,
                "diff_vs_cal_std": diff_std,
                "n_pairs": len(diffs),
                "seeds": " ".join(str(s) for s in seeds),
            }
        )
    return rows


def _pm(mean: float | None, std: float | None, signed: bool = False) -> str:
    if mean is None:
        return "—"
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text + (f" ± {std:.2f}" if std is not None else "")


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The summary rows as a Markdown table (accuracies in %)."""
    lines = [
        "| setting | method | seeds | final test acc (%) | best test acc (%) | final − cal (paired) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        diff = _pm(row["diff_vs_cal_mean"], row["diff_vs_cal_std"], signed=True)
        if row["n_pairs"]:
            diff += f" (n={row['n_pairs']})"
        lines.append(
            f"| {row['setting']} | {row['method']} | {row['n_seeds']} | {_pm(row['final_mean'], row['final_std'])} "
            f"| {_pm(row['best_mean'], row['best_std'])} | {diff} |"
        )
    return "\n".join(lines) + "\n"


def _csv_text(rows: list[dict[str, Any]]) -> str:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("" if row[key] is None else row[key]) for key in CSV_COLUMNS})
    return table.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", text).strip("_") or "run"


def _plots(runs: list[RunResult], directory: Path) -> list[Path]:
    """Accuracy curves per setting; alpha, rate and factor heat maps (and weight-decay ones when it is balanced)
    of the lowest seed of each balanced method; finished runs only (the runs of the tables)."""
    from .. import plots

    written: list[Path] = []
    by_setting: dict[str, dict[str, list[RunResult]]] = {}
    for run in runs:
        if run.finished and run.metrics:
            by_setting.setdefault(run.setting, {}).setdefault(run.method, []).append(run)
    for setting, methods in by_setting.items():
        series = {}
        for method, group in methods.items():
            length = min(len(run.metrics) for run in group)
            curves = [[float(row["test_acc"]) for row in run.metrics[:length]] for run in group]
            epochs = [int(row["epoch"]) for row in group[0].metrics[:length]]
            means = [statistics.fmean(column) for column in zip(*curves)]
            stds = [statistics.stdev(column) for column in zip(*curves)] if len(curves) > 1 else None
            series[f"{method} (n={len(group)})"] = (epochs, means, stds)
        path = directory / f"{_slug(setting)}_test_acc.png"
        plots.plot_curves(series, path, xlabel="epoch", ylabel="test accuracy (%)", title=f"{setting}: test accuracy")
        written.append(path)
        for method, group in methods.items():
            run = min(group, key=lambda r: r.seed)
            written += _heatmaps(plots, run, directory / f"{_slug(setting)}_{_slug(method)}_seed{run.seed}")
    return written


def _heatmaps(plots: Any, run: RunResult, stem: Path) -> list[Path]:
    rows = [row for row in run.metrics if row.get("alpha")]
    if not rows:
        return []
    layers = list(rows[0]["alpha"])
    epochs = [str(row["epoch"]) for row in rows]
    maps = {
        "alpha": ("alpha", [[_number(row["alpha"].get(layer)) for row in rows] for layer in layers]),
        "lr": ("learning rate", [[_number(row.get("layer_lr", {}).get(layer)) for row in rows] for layer in layers]),
        "factor": (
            "learning-rate factor (rate / global rate)",
            [[_ratio(row.get("layer_lr", {}).get(layer), row.get("lr")) for row in rows] for layer in layers],
        ),
    }
    if any(row.get("layer_wd") for row in rows):
        base = run.config.get("weight_decay")
        maps["wd"] = ("weight decay", [[_number(row.get("layer_wd", {}).get(layer)) for row in rows] for layer in layers])
        maps["wd_factor"] = (
            "weight-decay factor (weight decay / global weight decay)",
            [[_ratio(row.get("layer_wd", {}).get(layer), base) for row in rows] for layer in layers],
        )
    written = []
    for suffix, (label, table) in maps.items():
        values = np.array(table, dtype=np.float64)
        path = stem.with_name(f"{stem.name}_{suffix}.png")
        plots.plot_heatmap(
            values, layers, epochs, path, title=f"{run.setting} {run.method} seed {run.seed}: per-layer {label}",
            cbar_label=label,
        )
        written.append(path)
    return written


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _ratio(value: Any, base: Any) -> float:
    base = _number(base)
    return _number(value) / base if base else math.nan


def write_report(root: str | Path, out: str | Path | None = None, plots: bool = True) -> dict[str, Any]:
    """Write ``report.md``, ``report.csv`` and ``plots/*.png`` for the runs under ``root``.

    Args:
        root: directory searched (recursively) for run directories.
        out: where the report goes (default: ``root``).
        plots: draw the PNG plots (needs matplotlib).

    Every file is replaced atomically (a failed write leaves the previous report).

    Returns:
        ``{"rows": summary rows, "markdown": text, "files": [paths written], "unfinished": [run dirs],
        "unusable": [run dirs whose files cannot be used]}``.
    """
    root = Path(root)
    out = Path(out) if out is not None else root
    runs = collect_runs(root)
    if not runs:
        raise ConfigError(f"no run directories (with config.json) under {str(root)!r}")
    rows = summarize(runs)
    unfinished = [str(run.path) for run in runs if run.problem is None and not run.finished]
    unusable = [(str(run.path), run.problem) for run in runs if run.problem is not None]
    markdown = f"# Results under {root}\n\n" + to_markdown(rows)
    if unfinished:
        markdown += f"\nUnfinished runs (not in the table or the plots): {len(unfinished)}\n\n" + "".join(
            f"- {path}\n" for path in unfinished
        )
    if unusable:
        markdown += f"\nRuns left out because their files cannot be used: {len(unusable)}\n\n" + "".join(
            f"- {path}: {problem}\n" for path, problem in unusable
        )
    files = [write_atomic(out / "report.md", markdown), write_atomic(out / "report.csv", _csv_text(rows))]
    if plots:
        try:
            files += _plots(runs, out / "plots")
        except ImportError as exc:
            log.warning("no plots (%s); the tables are written", exc)
    return {
        "rows": rows, "markdown": markdown, "files": [str(path) for path in files], "unfinished": unfinished,
        "unusable": [path for path, _ in unusable],
    }
