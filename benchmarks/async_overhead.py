"""What the asynchronous mode hides: training time of CAL, TB (synchronous) and TB with
``asynchronous=True``, side by side, through the harness (``run_training``: every epoch's
training, test pass and scheduler step, no files written).

Setups: the 5x512 MLP on 10% of mnist1d (30 epochs; the cell where a synchronous rebalance
doubled the run time) and the deeper 1-D CNN ``cnn1d-deep`` on the full mnist1d (5 epochs).
Each setup runs with 1 torch thread (a core is left for the worker thread) and with all cores
(none left). Rounds are interleaved (each round runs every method once); the table gives the
median training time and TB's extra time over CAL, synchronous vs asynchronous.

Run: .venv/bin/python benchmarks/async_overhead.py [--repeats 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pools

import argparse
import datetime
import statistics

import torch

from _common import cpu_model  # noqa: E402

SETUPS = {
    "mlp, mnist1d 10%, 30 epochs": dict(dataset="mnist1d", model="mlp", epochs=30, train_fraction=0.1, lr=0.3,
                                        weight_decay=5e-3),
    "cnn1d-deep, mnist1d, 5 epochs": dict(dataset="mnist1d", model="cnn1d-deep", epochs=5, lr=0.1, weight_decay=5e-3),
}
METHODS = {"cal": dict(method="cal"), "tb": dict(method="tb"), "tb async": dict(method="tb", tb_async=True)}


def run_once(settings: dict, threads: int, seed: int) -> tuple[float, float]:
    """(training time s, final test accuracy %) of one run."""
    from tempbalance.train import TrainConfig, run_training

    config = TrainConfig(**settings, seed=seed, device="cpu", progress=False, num_threads=threads, out=None)
    summary = run_training(config)
    return float(summary["train_time_s"]), float(summary["final_test_acc"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--setups", nargs="*", default=list(SETUPS), help=f"default: all of {list(SETUPS)}")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU: {cpu_model()} "
          f"({cores} logical cores); torch {torch.__version__}; median of {args.repeats} interleaved rounds")
    print("command: .venv/bin/python benchmarks/async_overhead.py " + f"--repeats {args.repeats}")
    print()
    print("| setup | torch threads | CAL s | TB s | TB async s | TB extra over CAL: sync | async | hidden |")
    print("|---|---|---|---|---|---|---|---|")
    for setup in args.setups:
        for threads in sorted({1, cores}):
            times: dict[str, list[float]] = {label: [] for label in METHODS}
            for round_ in range(args.repeats):
                for label, method in METHODS.items():
                    seconds, _ = run_once({**SETUPS[setup], **method}, threads, seed=round_)
                    times[label].append(seconds)
            med = {label: statistics.median(values) for label, values in times.items()}
            sync_extra = med["tb"] - med["cal"]
            async_extra = med["tb async"] - med["cal"]
            hidden = f"{100 * (1 - async_extra / sync_extra):.0f}%" if sync_extra > 0 else "—"
            print(f"| {setup} | {threads} | {med['cal']:.2f} | {med['tb']:.2f} | {med['tb async']:.2f} "
                  f"| +{sync_extra:.2f} s ({100 * sync_extra / med['cal']:.0f}%) "
                  f"| {async_extra:+.2f} s ({100 * async_extra / med['cal']:.0f}%) | {hidden} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
