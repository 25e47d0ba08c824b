"""The end-to-end demo: CAL vs TempBalance on the offline mnist1d set with a 1-D CNN, a few seeds,
then the report (table, accuracy curves, alpha / rate heat maps) and the final per-layer alphas.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TempBalanceError
from .checkpoint import load_checkpoint
from .report import write_report
from .sweep import expand_sweep, run_sweep

__all__ = ["DEMO_SEEDS", "run_demo", "format_demo"]

log = logging.getLogger(__name__)

DEMO_SEEDS = (43, 37, 13, 51, 71)


def run_demo(
    out: str | Path = "runs/demo",
    *,
    seeds: int = 3,
    epochs: int = 15,
    lr: float = 0.2,
    train_fraction: float = 1.0,
    threads: int | None = None,
    progress: bool = True,
    plots: bool = True,
) -> dict[str, Any]:
    """Train ``cal`` and ``tb`` (cnn1d on mnist1d, batch 128, wd 5e-4, cosine) for ``seeds`` seeds.

    Finished runs under ``out`` are reused (delete ``out`` to start afresh).

    Args:
        out: output directory (runs in ``out/mnist1d-cnn1d/<method>/seed<seed>``, report in ``out``).
        seeds: how many of :data:`DEMO_SEEDS` (1-5), default 3.
        epochs: epochs per run, default 15.
        lr: initial learning rate of both methods, default 0.2 (the probe's best for CAL).
        train_fraction: share of the 4000 training series used, default 1.
        threads: torch CPU threads; default None: leave them as the environment sets them
            (``OMP_NUM_THREADS``, else torch's default).
        progress: show progress on stderr: tqdm bars on a terminal, else one log line per epoch.
        plots: write the PNG plots.

    Returns:
        ``{"report": write_report's dict, "alphas": {method: {layer: mean final alpha}},
        "factors": {layer: mean final TB rate / global rate}, "seconds": wall time}``.
    """
    if not (isinstance(seeds, int) and 1 <= seeds <= len(DEMO_SEEDS)):
        raise ConfigError(f"seeds={seeds!r} must be an integer from 1 to {len(DEMO_SEEDS)}")
    started = time.perf_counter()
    spec = {
        "name": "demo",
        "seeds": list(DEMO_SEEDS[:seeds]),
        "base": {
            "dataset": "mnist1d",
            "model": "cnn1d",
            "epochs": epochs,
            "lr": lr,
            "batch_size": 128,
            "weight_decay": 5e-4,
            "train_fraction": train_fraction,
            "device": "cpu",
            "num_threads": threads,
            "progress": progress,
        },
        "settings": [{"name": "mnist1d-cnn1d", "methods": ["cal", "tb"]}],
    }
    runs = expand_sweep(spec, out=out)
    summaries = run_sweep(runs)
    left = [s for s in summaries if s["status"] in ("failed", "skipped", "stale")]
    if left:
        raise TempBalanceError(
            "the demo's runs did not all finish: "
            + "; ".join(f"{s['out']}: {s['status']} ({s.get('error') or s.get('reason')})" for s in left)
            + f"; delete {out} to start afresh"
        )
    if any(summary["status"] != "finished" for summary in summaries) or len(summaries) < len(runs):
        raise KeyboardInterrupt  # a run was stopped by SIGINT/SIGTERM; its checkpoint is kept
    report = write_report(out, plots=plots)
    return {
        "report": report,
        "alphas": _final_alphas(runs),
        "factors": _final_factors(out),
        "seconds": time.perf_counter() - started,
    }


def _final_alphas(runs: list[Any]) -> dict[str, dict[str, float]]:
    """Mean over seeds of every layer's alpha (median Hill fit) on each method's final weights."""
    from .. import analyze
    from .models import create_model

    per_method: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        state = load_checkpoint(run.out)
        model = create_model("cnn1d", 10, 1, run.config.width)
        model.load_state_dict(state["model"])
        for record in analyze(model, fit="median"):
            if record.ok:
                per_method.setdefault(run.method, {}).setdefault(record.name, []).append(float(record.alpha))
    return {method: {name: statistics.fmean(v) for name, v in layers.items()} for method, layers in per_method.items()}


def _final_factors(out: str | Path) -> dict[str, float]:
    """Mean over TB seeds of each balanced layer's last-epoch rate divided by the global rate."""
    from .report import collect_runs

    factors: dict[str, list[float]] = {}
    for run in collect_runs(out):
        if run.method != "tb" or not run.finished or not run.metrics:
            continue
        last = run.metrics[-1]
        for name, rate in (last.get("layer_lr") or {}).items():
            if last["lr"] > 0:
                factors.setdefault(name, []).append(rate / last["lr"])
    return {name: statistics.fmean(values) for name, values in factors.items()}


def format_demo(result: dict[str, Any]) -> str:
    """The demo's printed output: the results table, per-layer alphas, TB's factors, files."""
    alphas = result["alphas"]
    methods = sorted(alphas)
    layers = list(next(iter(alphas.values()), {}))
    lines = [result["report"]["markdown"].split("\n", 2)[-1].rstrip(), ""]
    lines.append("Per-layer alpha of the final weights (mean over seeds; first and last layer are not balanced):")
    lines.append("| layer | " + " | ".join(methods) + " | TB lr factor (last epoch) |")
    lines.append("|---|" + "---|" * len(methods) + "---|")
    for layer in layers:
        cells = [f"{alphas[m].get(layer, float('nan')):.3f}" for m in methods]
        factor = result["factors"].get(layer)
        lines.append(f"| {layer} | " + " | ".join(cells) + f" | {'—' if factor is None else f'{factor:.3f}'} |")
    pngs = [path for path in result["report"]["files"] if path.endswith(".png")]
    lines += ["", f"Report: {result['report']['files'][0]}; {len(pngs)} plots; {result['seconds']:.0f} s in all."]
    return "\n".join(lines)
