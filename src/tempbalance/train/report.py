"""Tables and plots from a directory of finished runs: mean ± std of final and best test accuracy
per setting and method, paired differences against ``cal``, accuracy curves, alpha / rate / weight-decay
heat maps.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .loop import SUMMARY_NAME
from .metrics import read_metrics

__all__ = ["RunResult", "collect_runs", "summarize", "to_markdown", "write_report", "BASELINE"]

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
    """One run directory: its config, per-epoch metrics and summary (None while unfinished)."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    setting: str = ""
    method: str = ""
    seed: int = 0

    @property
    def finished(self) -> bool:
        return self.summary is not None and self.summary.get("status") == "finished"

    @property
    def final_acc(self) -> float:
        return float(self.metrics[-1]["test_acc"])

    @property
    def best_acc(self) -> float:
        return max(float(row["test_acc"]) for row in self.metrics)


def collect_runs(root: str | Path) -> list[RunResult]:
    """Every run directory under ``root`` (any depth; one with a ``config.json``), sorted by path.

    A run's setting is its ``tag`` (a sweep's setting name) or ``dataset/model``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"runs directory {str(root)!r} does not exist")
    runs = []
    for config_path in sorted(root.rglob("config.json")):
        directory = config_path.parent
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError:
            log.warning("skipping %s: config.json is not valid JSON", directory)
            continue
        if "method" not in config:
            continue
        summary_path = directory / SUMMARY_NAME
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        setting = config.get("tag") or f"{config.get('dataset')}/{config.get('model')}"
        runs.append(
            RunResult(
                directory, config, read_metrics(directory), summary, setting, str(config["method"]), int(config["seed"])
            )
        )
    return runs


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


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ("" if row[key] is None else row[key]) for key in CSV_COLUMNS})


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", text).strip("_") or "run"


def _plots(runs: list[RunResult], directory: Path) -> list[Path]:
    """Accuracy curves per setting; alpha, rate and factor heat maps (and weight-decay ones when it is balanced)
    of the lowest seed of each balanced method."""
    from .. import plots

    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    by_setting: dict[str, dict[str, list[RunResult]]] = {}
    for run in runs:
        if run.metrics:
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

    Returns:
        ``{"rows": summary rows, "markdown": text, "files": [paths written], "unfinished": [run dirs]}``.
    """
    root = Path(root)
    out = Path(out) if out is not None else root
    runs = collect_runs(root)
    if not runs:
        raise FileNotFoundError(f"no run directories (with config.json) under {str(root)!r}")
    rows = summarize(runs)
    unfinished = [str(run.path) for run in runs if not run.finished]
    markdown = f"# Results under {root}\n\n" + to_markdown(rows)
    if unfinished:
        markdown += f"\nUnfinished runs (not in the table): {len(unfinished)}\n\n" + "".join(
            f"- {path}\n" for path in unfinished
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown)
    _write_csv(rows, out / "report.csv")
    files = [out / "report.md", out / "report.csv"]
    if plots:
        try:
            files += _plots(runs, out / "plots")
        except ImportError as exc:
            log.warning("no plots (%s); the tables are written", exc)
    return {"rows": rows, "markdown": markdown, "files": [str(path) for path in files], "unfinished": unfinished}
