"""What the asynchronous mode takes off the training path: CAL, TB (synchronous) and TB with
``asynchronous=True``, side by side, through the harness (``run_training``: every epoch's
training, test pass and scheduler step; no files written).

Two numbers per run: the whole training time (``train_time_s``), and the seconds the training
thread spent inside TempBalance (``step()`` plus the optimizer step pre-hook that applies a
finished measurement), timed by wrapping both. The second is what the asynchronous mode removes;
the first also shows whether the worker thread slows training down by competing for the cores.

Setups: the 5x512 MLP on 10% of mnist1d (30 epochs; the cell where a synchronous rebalance
doubled the run time) and the deeper 1-D CNN ``cnn1d-deep`` on the full mnist1d (5 epochs, a
cheap rebalance). Each with 1 torch thread (a core left for the worker) and with all cores.
Rounds are interleaved (each round runs every method once); medians are reported.

Run: .venv/bin/python benchmarks/async_overhead.py [--repeats 5]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pools

import argparse
import contextlib
import datetime
import statistics
import time
from typing import Iterator

import torch

from _common import cpu_model  # noqa: E402
from tempbalance import TempBalance
from tempbalance.measure import MeasurementRuns

SETUPS = {
    "mlp, mnist1d 10%, 30 epochs": dict(dataset="mnist1d", model="mlp", epochs=30, train_fraction=0.1, lr=0.3,
                                        weight_decay=5e-3),
    "cnn1d-deep, mnist1d, 5 epochs": dict(dataset="mnist1d", model="cnn1d-deep", epochs=5, lr=0.1, weight_decay=5e-3),
}
METHODS = {"cal": dict(method="cal"), "tb": dict(method="tb"), "tb async": dict(method="tb", asynchronous=True)}


@contextlib.contextmanager
def time_in_tempbalance() -> Iterator[list[float]]:
    """Sum the wall time of ``TempBalance.step`` and of its optimizer step pre-hook (the
    training thread's share of balancing) into the yielded one-element list."""
    total = [0.0]
    targets = ((TempBalance, "step"), (MeasurementRuns, "_before_optimizer_step"))
    originals = {(owner, name): getattr(owner, name) for owner, name in targets}

    def timed(original):
        def wrapper(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                total[0] += time.perf_counter() - started

        return wrapper

    for (owner, name), original in originals.items():
        setattr(owner, name, timed(original))
    try:
        yield total
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


def run_once(settings: dict, threads: int, seed: int) -> tuple[float, float]:
    """(training time s, seconds inside TempBalance on the training thread) of one run."""
    from tempbalance.train import TrainConfig, run_training

    config = TrainConfig(**settings, seed=seed, device="cpu", progress=False, num_threads=threads, out=None)
    with time_in_tempbalance() as inside:
        summary = run_training(config)
    return float(summary["train_time_s"]), inside[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--setups", nargs="*", default=list(SETUPS), help=f"default: all of {list(SETUPS)}")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU: {cpu_model()} "
          f"({cores} logical cores); torch {torch.__version__}; median of {args.repeats} interleaved rounds")
    print(f"command: .venv/bin/python benchmarks/async_overhead.py --repeats {args.repeats}")
    print()
    print("| setup | torch threads | CAL run s | TB run s | TB async run s | in TempBalance, sync s "
          "| in TempBalance, async s | taken off the training path |")
    print("|---|---|---|---|---|---|---|---|")
    for setup in args.setups:
        for threads in sorted({1, cores}):
            runs: dict[str, list[float]] = {label: [] for label in METHODS}
            inside: dict[str, list[float]] = {label: [] for label in METHODS}
            for round_ in range(args.repeats):
                for label, method in METHODS.items():
                    seconds, balancing = run_once({**SETUPS[setup], **method}, threads, seed=round_)
                    runs[label].append(seconds)
                    inside[label].append(balancing)
            run = {label: statistics.median(values) for label, values in runs.items()}
            sync_in, async_in = statistics.median(inside["tb"]), statistics.median(inside["tb async"])
            print(f"| {setup} | {threads} | {run['cal']:.2f} | {run['tb']:.2f} | {run['tb async']:.2f} "
                  f"| {sync_in:.3f} | {async_in:.3f} | {100 * (1 - async_in / sync_in):.0f}% |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
