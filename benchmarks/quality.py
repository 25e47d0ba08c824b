"""Quality benchmark: does TempBalance beat the tuned baseline (CAL)? Paired seeds, error bars.

Each *cell* (data set, model, epochs, data fraction) first tunes CAL's learning rate and weight
decay on tuning seeds kept apart from the evaluation seeds (mean final test accuracy over them),
then trains every compared method with the tuned values on the evaluation seeds, each method of a
seed sharing the initial weights and batch order. It reports mean ± std of the final test accuracy,
the paired difference against CAL with a 95% t-interval, and how many seeds each method won.

Resumable: a finished run (``summary.json`` with status ``finished``) in the output directory is
reused, an unfinished one resumes from its checkpoint. Runs go to ``OUT/<cell>/...``.

Run (2 worker processes, 1 thread each):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality.py --jobs 2 [CELL ...] [--list] [--report-only]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pools

import argparse
import datetime
import json
import math
import multiprocessing
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy import stats  # noqa: E402

from _common import cpu_model  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "runs" / "bench" / "quality"
CIFAR_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10"
TUNE_SEEDS = (1001, 1002)
EVAL_SEEDS = tuple(range(10))
MORE_SEEDS = tuple(range(30))  # the cells whose 10-seed result was borderline (p <= 0.1)

@dataclass
class Cell:
    """One experimental setting.

    Attributes:
        base: TrainConfig fields shared by every run of the cell (dataset, model, epochs, ...).
        grid: (lr, weight_decay) pairs tried for CAL on ``tune_seeds``; empty = use ``fixed``.
        methods: label -> TrainConfig overrides (``method`` at least); ``cal`` is the baseline.
        tune_from: name of another cell whose tuned (lr, wd) this cell reuses instead of tuning.
        fixed: (lr, weight_decay) used when there is neither a grid nor ``tune_from``.
        seeds: evaluation seeds.
        tune_seeds: seeds of the tuning runs (kept apart from ``seeds``).
        pairs: extra paired comparisons (method, against) beyond "each method against CAL".
        note: one line for the report.
        in_all: part of the default selection (False for cells too slow for a 2-core CPU).
    """

    base: dict[str, Any]
    grid: tuple[tuple[float, float], ...] = ()
    methods: dict[str, dict[str, Any]] = field(default_factory=lambda: {"cal": {"method": "cal"}, "tb": {"method": "tb"}})
    tune_from: str | None = None
    fixed: tuple[float, float] = (0.1, 5e-4)
    seeds: tuple[int, ...] = EVAL_SEEDS
    tune_seeds: tuple[int, ...] = TUNE_SEEDS
    pairs: tuple[tuple[str, str], ...] = ()
    note: str = ""
    in_all: bool = True


GRID = tuple((lr, wd) for lr in (0.03, 0.1, 0.3) for wd in (5e-4, 5e-3))
GRID_FULL = tuple((lr, wd) for lr in (0.1, 0.3) for wd in (5e-4, 5e-3))  # the full-data cells cost more
CAL_TB = {"cal": {"method": "cal"}, "tb": {"method": "tb"}}
# AlphaDecay (per-layer weight decay from alpha, wd_s1/wd_s2 = 0.5/1.5) alone and with TB's rates,
# each compared with CAL (the table) and with TB (the pairs below each table).
ALPHADECAY = {"alphadecay": {"method": "alphadecay"}, "tb+alphadecay": {"method": "tb+alphadecay"}}
AD_PAIRS = (("alphadecay", "tb"), ("tb+alphadecay", "tb"))

CELLS: dict[str, Cell] = {
    "mnist1d": Cell(
        {"dataset": "mnist1d", "model": "cnn1d", "epochs": 10},
        GRID_FULL, {**CAL_TB, **ALPHADECAY}, pairs=AD_PAIRS,
        note="mnist1d 4000/1000, cnn1d, full training set; also AlphaDecay and TB+AlphaDecay",
    ),
    "digits": Cell(
        {"dataset": "digits", "model": "cnn-digits", "epochs": 15},
        GRID_FULL, {**CAL_TB, **ALPHADECAY}, seeds=MORE_SEEDS, pairs=AD_PAIRS,
        note="sklearn digits 1257/540, cnn-digits; 30 seeds (p = 0.07 at 10); also AlphaDecay and TB+AlphaDecay",
    ),
    "mnist1d-10pct": Cell(
        {"dataset": "mnist1d", "model": "cnn1d", "epochs": 30, "train_fraction": 0.1},
        GRID,
        {
            "cal": {"method": "cal"},
            "tb": {"method": "tb"},
            "tb-s0.8-1.2": {"method": "tb", "s1": 0.8, "s2": 1.2},
            "tb-sigmoid": {"method": "tb", "assign": "sigmoid"},
            "snr": {"method": "snr", "snr_coef": 0.001},
            "tb+snr": {"method": "tb+snr", "snr_coef": 0.001, "s1": 0.6, "s2": 1.4},
            "tb-async": {"method": "tb", "asynchronous": True},
            **ALPHADECAY,
        },
        pairs=(("tb-async", "tb"), *AD_PAIRS),
        note="mnist1d, 10% of the training set (400 samples), cnn1d; also s1/s2 = 0.8/1.2, the sigmoid map (tau 10, s 1), "
        "SNR, TB's asynchronous mode, AlphaDecay and TB+AlphaDecay",
    ),
    "mnist1d-5pct": Cell(
        {"dataset": "mnist1d", "model": "cnn1d", "epochs": 30, "train_fraction": 0.05},
        GRID, dict(CAL_TB), note="mnist1d, 5% of the training set (200 samples), cnn1d",
    ),
    "digits-10pct": Cell(
        {"dataset": "digits", "model": "cnn-digits", "epochs": 30, "train_fraction": 0.1},
        GRID, dict(CAL_TB), note="digits, 10% of the training set (~126 samples), cnn-digits",
    ),
    "mnist1d-10pct-wide": Cell(
        {"dataset": "mnist1d", "model": "cnn1d", "epochs": 30, "train_fraction": 0.1, "width": 2.0},
        (), dict(CAL_TB), tune_from="mnist1d-10pct", note="mnist1d 10%, cnn1d at width 2 (wider model)",
    ),
    "mnist1d-10pct-mlp": Cell(
        {"dataset": "mnist1d", "model": "mlp", "epochs": 30, "train_fraction": 0.1},
        GRID, {**CAL_TB, "tb-async": {"method": "tb", "asynchronous": True}}, seeds=MORE_SEEDS, pairs=(("tb-async", "tb"),),
        note="mnist1d 10%, the 5-layer 512-wide MLP (three balanced 512x512 layers); 30 seeds (p = 0.09 at 10); "
        "also TB's asynchronous mode",
    ),
    "mnist1d-10pct-deep": Cell(
        {"dataset": "mnist1d", "model": "cnn1d-deep", "epochs": 30, "train_fraction": 0.1},
        GRID, {**CAL_TB, **ALPHADECAY}, seeds=MORE_SEEDS, pairs=AD_PAIRS,
        note="mnist1d 10%, the 10-conv cnn1d-deep (9 balanced layers instead of 3; deeper model); 30 seeds (p = 0.10 at 10); "
        "also AlphaDecay and TB+AlphaDecay",
    ),
    "mnist1d-20pct": Cell(
        {"dataset": "mnist1d", "model": "cnn1d", "epochs": 20, "train_fraction": 0.2},
        GRID, dict(CAL_TB), note="mnist1d, 20% of the training set (800 samples), cnn1d",
    ),
    "cifar10-sub": Cell(
        {"dataset": "cifar10", "model": "resnet18", "width": 0.25, "epochs": 8, "train_fraction": 0.1,
         "data_dir": str(CIFAR_DIR)},
        (), {**CAL_TB, **ALPHADECAY}, fixed=(0.1, 5e-4), seeds=tuple(range(8)), in_all=False, pairs=AD_PAIRS,
        note="CIFAR-10, 10% of the training set (5000 images), full test set, ResNet18 width 0.25, 8 epochs; "
        "paper lr/wd (0.1, 5e-4), not tuned; about 10 minutes a run on one CPU thread here (1.5 h for the cell "
        "with 2 jobs), so not in the default selection; also AlphaDecay and TB+AlphaDecay",
    ),
}

# TB on FARMS spectra (issue 15), next to TB: paired against CAL and against TB; the report adds the
# per-layer factors of TB and TB-FARMS side by side.
FARMS_LABEL = "tb-farms"
FARMS_CELLS = ("cifar10-sub", "mnist1d", "mnist1d-10pct", "mnist1d-5pct", "mnist1d-10pct-wide", "mnist1d-10pct-mlp",
               "mnist1d-10pct-deep", "mnist1d-20pct")
for _name in FARMS_CELLS:
    CELLS[_name].methods[FARMS_LABEL] = {"method": "tb", "esd": "farms"}
    CELLS[_name].pairs += ((FARMS_LABEL, "tb"),)
# normalize="mean" (issue 15 item 5): TB's factors divided by their mean, so the average balanced rate
# is the untuned one; separates the balancing from the shift of the average rate.
MEAN_LABEL = "tb-mean"
CELLS["cifar10-sub"].methods[MEAN_LABEL] = {"method": "tb", "normalize": "mean"}
CELLS["cifar10-sub"].pairs += ((MEAN_LABEL, "tb"),)
CELLS["cifar10-long"] = Cell(
    {**CELLS["cifar10-sub"].base, "epochs": 30, "train_fraction": 0.05},
    (), {**CAL_TB, FARMS_LABEL: {"method": "tb", "esd": "farms"}}, fixed=(0.1, 5e-4), seeds=tuple(range(8)),
    pairs=((FARMS_LABEL, "tb"),), in_all=False,
    note="CIFAR-10, 5% of the training set (2500 images), full test set, ResNet18 width 0.25, 30 epochs (longer "
    "training, closer to the paper's regime); paper lr/wd, not tuned; CAL, TB, TB-FARMS; about 20 minutes a run on "
    "one CPU thread (the 10,000-image test pass each epoch dominates), so not in the default selection",
)


# --------------------------------------------------------------------------- running


def _run_dir(out: Path, cell: str, group: str, seed: int) -> Path:
    return out / cell / group / f"seed{seed}"


def _tune_group(lr: float, wd: float) -> str:
    return f"tune/lr{lr:g}_wd{wd:g}"


def _read_summary(directory: Path) -> dict[str, Any] | None:
    path = directory / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("status") == "finished" else None


def _train(job: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Worker: one run (or its finished summary when it exists). Returns (run dir, summary)."""
    directory, settings = job
    done = _read_summary(Path(directory))
    if done is not None:
        return directory, done
    from tempbalance.train import TrainConfig, run_training

    config = TrainConfig(**settings, out=directory, resume=True, progress=False, num_threads=1, device="cpu")
    started = time.perf_counter()
    summary = run_training(config)
    print(f"[{time.strftime('%H:%M:%S')}] {directory}: {summary['final_test_acc']:.2f}% "
          f"in {time.perf_counter() - started:.1f} s", flush=True)
    return directory, summary


def _run_all(jobs: list[tuple[str, dict[str, Any]]], workers: int) -> dict[str, dict[str, Any]]:
    todo = [job for job in jobs if _read_summary(Path(job[0])) is None]
    results = {job[0]: _read_summary(Path(job[0])) for job in jobs if job not in todo}
    if todo:
        print(f"{len(todo)} run(s) to do, {len(results)} reused", flush=True)
        if workers > 1:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for directory, summary in pool.imap_unordered(_train, todo):
                    results[directory] = summary
        else:
            for job in todo:
                directory, summary = _train(job)
                results[directory] = summary
    return results


def tune_jobs(out: Path, name: str, cell: Cell) -> list[tuple[str, dict[str, Any]]]:
    """The CAL runs of a cell's tuning grid on its tuning seeds."""
    return [
        (str(_run_dir(out, name, _tune_group(lr, wd), seed)),
         {**cell.base, "method": "cal", "lr": lr, "weight_decay": wd, "seed": seed, "tag": f"{name}/tune"})
        for lr, wd in cell.grid
        for seed in cell.tune_seeds
    ]


def tuned_values(out: Path, name: str) -> tuple[tuple[float, float], list[dict[str, Any]]]:
    """(lr, wd) of the cell (best mean final accuracy over the tuning seeds) and the tuning table rows.

    Raises:
        RuntimeError: a tuning run has not finished yet.
    """
    cell = CELLS[name]
    if cell.tune_from is not None:
        return tuned_values(out, cell.tune_from)
    if not cell.grid:
        return cell.fixed, []
    rows = []
    for lr, wd in cell.grid:
        accs = []
        for seed in cell.tune_seeds:
            summary = _read_summary(_run_dir(out, name, _tune_group(lr, wd), seed))
            if summary is None:
                raise RuntimeError(f"tuning run {name} lr={lr:g} wd={wd:g} seed={seed} has not finished")
            accs.append(float(summary["final_test_acc"]))
        rows.append({"lr": lr, "wd": wd, "accs": accs, "mean": statistics.fmean(accs)})
    best = max(rows, key=lambda row: (row["mean"], -abs(math.log(row["lr"] / 0.1))))
    return (best["lr"], best["wd"]), rows


def compare_jobs(
    out: Path, name: str, cell: Cell, lr: float, wd: float, methods: list[str] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The compared methods (all, or those named in ``methods``) on every evaluation seed, with the
    tuned (lr, wd), seed by seed so that a run cut short still leaves complete pairs."""
    labels = [label for label in cell.methods if methods is None or label in methods]
    return [
        (str(_run_dir(out, name, label, seed)),
         {**cell.base, "lr": lr, "weight_decay": wd, **cell.methods[label], "seed": seed, "tag": name})
        for seed in cell.seeds
        for label in labels
    ]


# --------------------------------------------------------------------------- statistics


def paired_stats(base: dict[int, float], other: dict[int, float]) -> dict[str, Any]:
    """Paired difference ``other - base`` over the seeds both have (scipy's paired t-test).

    Returns: n, mean, std, ci (low, high) of the mean at 95% (None with < 2 pairs), wins / ties /
    losses of ``other``, and the two-sided t-test p value (None with < 2 pairs or zero spread).
    """
    seeds = sorted(set(base) & set(other))
    diffs = [other[s] - base[s] for s in seeds]
    result: dict[str, Any] = {"n": len(diffs), "mean": None, "std": None, "ci": None, "p": None,
                              "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
                              "losses": sum(d < 0 for d in diffs)}
    if not diffs:
        return result
    result["mean"] = statistics.fmean(diffs)
    if len(diffs) < 2:
        return result
    result["std"] = statistics.stdev(diffs)
    if result["std"] == 0:  # every seed moved by the same amount: a zero-width interval, no test
        result["ci"] = (result["mean"], result["mean"])
        return result
    test = stats.ttest_rel([other[s] for s in seeds], [base[s] for s in seeds])
    interval = test.confidence_interval(0.95)
    result["ci"] = (float(interval.low), float(interval.high))
    result["p"] = float(test.pvalue)
    return result


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:+.{digits}f}"


def _last_alphas(directory: Path) -> list[float]:
    """The finite alphas of the balanced layers at the run's last epoch (empty for CAL / SNR)."""
    path = directory / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    alphas = json.loads(lines[-1]).get("alpha") or {} if lines else {}
    return [float(v) for v in alphas.values() if v is not None and math.isfinite(v)]


def _seed_list(seeds: tuple[int, ...]) -> str:
    """``0–29`` for a contiguous run of seeds, else the list."""
    if len(seeds) > 3 and list(seeds) == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]}"
    return str(list(seeds))


def cell_report(out: Path, name: str) -> str:
    """Markdown for one cell: tuning table, then the comparison table."""
    cell = CELLS[name]
    lines = [f"### `{name}` — {cell.note}", ""]
    base = ", ".join(f"{k}={v}" for k, v in cell.base.items() if k != "data_dir")
    try:
        (lr, wd), rows = tuned_values(out, name)
    except RuntimeError as error:
        return "\n".join(lines + [f"(tuning not finished: {error})", ""])
    if rows:
        lines += [f"Tuning CAL ({base}; tuning seeds {list(cell.tune_seeds)}, final test accuracy %):", "",
                  "| lr | wd | " + " | ".join(f"seed {s}" for s in cell.tune_seeds) + " | mean |",
                  "|---|---|" + "---|" * len(cell.tune_seeds) + "---|"]
        for row in rows:
            mark = " **←**" if (row["lr"], row["wd"]) == (lr, wd) else ""
            lines.append(f"| {row['lr']:g} | {row['wd']:g} | " + " | ".join(f"{a:.2f}" for a in row["accs"])
                         + f" | {row['mean']:.2f}{mark} |")
        lines.append("")
    source = f"tuned in `{cell.tune_from}`" if cell.tune_from else ("tuned" if rows else "fixed, not tuned")
    lines += [f"Comparison ({base}; lr={lr:g}, wd={wd:g} {source}; evaluation seeds {_seed_list(cell.seeds)}):", "",
              "| method | n | final test acc % (mean ± std) | diff vs CAL (mean, 95% CI) | p | wins/ties/losses vs CAL "
              "| s/run | balanced alphas, last epoch (min–max) |", "|---|---|---|---|---|---|---|---|"]
    accs: dict[str, dict[int, float]] = {}
    times: dict[str, list[float]] = {}
    ranges: dict[str, list[tuple[float, float]]] = {}
    for label in cell.methods:
        accs[label], times[label], ranges[label] = {}, [], []
        for seed in cell.seeds:
            directory = _run_dir(out, name, label, seed)
            summary = _read_summary(directory)
            if summary is not None:
                accs[label][seed] = float(summary["final_test_acc"])
                times[label].append(float(summary["train_time_s"]))
                alphas = _last_alphas(directory)
                if alphas:
                    ranges[label].append((min(alphas), max(alphas)))
    for label in cell.methods:
        values = list(accs[label].values())
        if not values:
            lines.append(f"| {label} | 0 | (not run) | | | | | |")
            continue
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else None
        run_time = statistics.median(times[label])
        spread = "—"
        if ranges[label]:
            low = statistics.fmean(r[0] for r in ranges[label])
            high = statistics.fmean(r[1] for r in ranges[label])
            spread = f"{low:.2f}–{high:.2f}"
        if label == "cal":
            lines.append(f"| cal | {len(values)} | {mean:.2f} ± {_fmt(std)} | — | — | — | {run_time:.0f} | — |")
            continue
        paired = paired_stats(accs.get("cal", {}), accs[label])
        ci = "—" if paired["ci"] is None else f"[{paired['ci'][0]:+.2f}, {paired['ci'][1]:+.2f}]"
        p = "—" if paired["p"] is None else f"{paired['p']:.2f}"
        lines.append(f"| {label} | {len(values)} | {mean:.2f} ± {_fmt(std)} | {_signed(paired['mean'])} {ci} | {p} "
                     f"| {paired['wins']}/{paired['ties']}/{paired['losses']} | {run_time:.0f} | {spread} |")
    for label, against in cell.pairs:
        paired = paired_stats(accs.get(against, {}), accs.get(label, {}))
        if paired["n"] == 0:
            continue
        ci = "—" if paired["ci"] is None else f"[{paired['ci'][0]:+.2f}, {paired['ci'][1]:+.2f}]"
        p = "—" if paired["p"] is None else f"{paired['p']:.2f}"
        lines.append(f"\n{label} − {against} (paired, n = {paired['n']}): {_signed(paired['mean'])} {ci}, p {p}, "
                     f"wins/ties/losses {paired['wins']}/{paired['ties']}/{paired['losses']}")
    lines.append("")
    return "\n".join(lines)


def _factor_rows(directory: Path) -> list[dict[str, Any]]:
    """Per epoch of one run: {layer: (factor used in the epoch, alpha measured after it)}."""
    path = directory / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [{layer: (rate / row["lr"], (row.get("alpha") or {}).get(layer)) for layer, rate in row["layer_lr"].items()}
            for row in rows if row.get("layer_lr")]


def factor_report(out: Path, name: str, labels: tuple[str, ...] = ("tb", FARMS_LABEL)) -> str:
    """Markdown: each balanced layer's learning-rate factor (its rate / the global rate) under each of
    ``labels``, mean over the epochs and the finished seeds, with its alpha after the first and the
    last epoch (mean over seeds); then the mean factor of the layers with square and with rectangular
    (per-position) matrices, and the mean factor over all balanced layers per epoch."""
    cell = CELLS[name]
    runs = {label: [_run_dir(out, name, label, seed) for seed in cell.seeds
                    if _read_summary(_run_dir(out, name, label, seed)) is not None] for label in labels}
    if not all(runs.values()):
        return ""
    from tempbalance.train.checkpoint import load_checkpoint

    weights = load_checkpoint(runs[labels[0]][0])["model"]
    per_label = {label: [_factor_rows(directory) for directory in dirs] for label, dirs in runs.items()}
    layers = list(per_label[labels[0]][0][0])

    def mean(values: list[float]) -> float:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        return statistics.fmean(finite) if finite else math.nan

    def layer_factor(label: str, layer: str) -> float:
        return mean([epoch[layer][0] for run in per_label[label] for epoch in run if layer in epoch])

    head = " | ".join(f"{label} factor | {label} alpha ep 1 → last" for label in labels)
    lines = ["", f"Per-layer learning-rate factors in `{name}` (rate / global rate, mean over epochs and seeds "
             f"{', '.join(f'{label}: {len(runs[label])}' for label in labels)}; alpha after the first and the last "
             "epoch, mean over seeds):", "", f"| layer | weight | {head} |", "|---|---|" + "---|---|" * len(labels)]
    square: dict[bool, list[str]] = {True: [], False: []}
    for layer in layers:
        shape = tuple(weights[f"{layer}.weight"].shape)
        square[shape[0] == shape[1]].append(layer)
        cells = []
        for label in labels:
            first = mean([run[0][layer][1] for run in per_label[label]])
            last = mean([run[-1][layer][1] for run in per_label[label]])
            cells.append(f"{layer_factor(label, layer):.3f} | {first:.2f} → {last:.2f}")
        lines.append(f"| {layer} | {'x'.join(map(str, shape))} | " + " | ".join(cells) + " |")
    for is_square, members in square.items():
        if members:
            cells = [text for label in labels for text in (f"{mean([layer_factor(label, m) for m in members]):.3f}", "")]
            kind = "square" if is_square else "rectangular"
            lines.append(f"| mean of the {len(members)} {kind} | | " + " | ".join(cells) + " |")
    lines.append("")
    for label in labels:
        epochs = min(len(run) for run in per_label[label])
        per_epoch = [mean([mean([f for f, _ in run[e].values()]) for run in per_label[label]]) for e in range(epochs)]
        lines.append(f"Mean factor over the balanced layers per epoch, {label}: " + " ".join(f"{v:.3f}" for v in per_epoch))
    lines.append("")
    return "\n".join(lines)


def report(out: Path, names: list[str]) -> str:
    """Markdown for the given cells with a header naming the date and machine."""
    header = [
        f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {cpu_model()} "
        f"({os.cpu_count()} logical CPUs, 1 thread a run), Python {platform.python_version()}.",
        "s/run = median training time of one run (epochs only, without data loading), on a shared machine.",
        "",
    ]
    return "\n".join(header + [cell_report(out, name) + factor_report(out, name, _balanced_labels(name)) for name in names])


def _balanced_labels(name: str) -> tuple[str, ...]:
    """The cell's TB-family labels whose learning-rate factors the factor table compares."""
    return tuple(label for label in ("tb", FARMS_LABEL, MEAN_LABEL) if label in CELLS[name].methods)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cells", nargs="*", help=f"cells to run (default: all but cifar10-sub): {', '.join(CELLS)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"runs directory (default {DEFAULT_OUT})")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, 1 thread each (default 2)")
    parser.add_argument("--stage", choices=("all", "tune", "compare"), default="all",
                        help="tune only, compare only (tuning must be done), or both (default)")
    parser.add_argument("--methods", default="",
                        help="comma-separated method labels to run in the comparison (default: all of each cell)")
    parser.add_argument("--seeds", default="",
                        help="comma-separated evaluation seeds to run (default: each cell's own); e.g. 0 for a smoke run")
    parser.add_argument("--report-only", action="store_true", help="print the tables of what has finished")
    parser.add_argument("--list", action="store_true", help="list the cells and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, cell in CELLS.items():
            print(f"{name}: {cell.note}; methods {list(cell.methods)}; {len(cell.seeds)} seeds")
        return 0
    names = args.cells or [name for name, cell in CELLS.items() if cell.in_all]
    unknown = [name for name in names if name not in CELLS]
    if unknown:
        parser.error(f"unknown cell(s) {unknown}; accepted: {', '.join(CELLS)}")
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs} must be >= 1")
    if not args.report_only:
        if args.stage in ("all", "tune"):
            _run_all([job for name in names for job in tune_jobs(args.out, name, CELLS[name])], args.jobs)
        if args.stage in ("all", "compare"):
            methods = [label for label in args.methods.split(",") if label] or None
            seeds = {int(seed) for seed in args.seeds.split(",") if seed}
            jobs = []
            for name in names:
                (lr, wd), _ = tuned_values(args.out, name)
                jobs += [job for job in compare_jobs(args.out, name, CELLS[name], lr, wd, methods)
                         if not seeds or job[1]["seed"] in seeds]
            _run_all(jobs, args.jobs)
    text = report(args.out, names)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
