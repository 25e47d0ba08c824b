"""What one TempBalance rebalance costs, as a share of one training epoch.

For the CIFAR ResNet18 (batch 128, 32x32 synthetic images, 391 steps an epoch) and the mnist1d
demo model ``cnn1d`` (3200 samples, batch 128, 25 steps an epoch): the median time of a training
step (forward, backward, SGD step) times the steps of an epoch, against the median time of one
``TempBalance.rebalance()`` (spectra of every balanced layer, fits, factors), in the scheduler's
default float64 and in float32. Prints a Markdown table.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rebalance_overhead.py [--threads 1]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pools

import argparse
import datetime
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import tempbalance
from _common import cpu_model  # noqa: E402
from tempbalance.analysis import AnalysisOptions

SETUPS = {
    # name: (model name, input shape of one sample, samples an epoch, batch size)
    "resnet18": ("resnet18", (3, 32, 32), 50_000, 128),
    "cnn1d": ("cnn1d", (1, 40), 3_200, 128),
}


def build(name: str) -> nn.Module:
    from tempbalance.train.models import create_model

    model_name, shape, _, _ = SETUPS[name]
    return create_model(model_name, num_classes=10, in_channels=shape[0])


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, step_repeats: int, rebalance_repeats: int) -> dict:
    model_name, shape, samples, batch_size = SETUPS[name]
    torch.manual_seed(0)
    model = build(name)
    optimizer = torch.optim.SGD(tempbalance.param_groups(model, weight_decay=5e-4), lr=0.1, momentum=0.9)
    scheduler = tempbalance.TempBalance(model, optimizer)
    x = torch.randn(batch_size, *shape)
    y = torch.randint(0, 10, (batch_size,))

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step = median_time(train_step, step_repeats)
    steps = math.ceil(samples / batch_size)
    row = {
        "model": name,
        "layers": len(scheduler.layers),
        "step_s": step,
        "steps": steps,
        "epoch_s": step * steps,
    }
    for precision in ("float64", "float32"):
        scheduler._analysis = AnalysisOptions(precision=precision)  # benchmark-only switch
        row[precision] = median_time(scheduler.rebalance, rebalance_repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--step-repeats", type=int, default=5, help="timed training steps (median)")
    parser.add_argument("--rebalance-repeats", type=int, default=5, help="timed rebalances (median)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name in args.models:
        repeats = args.step_repeats if name == "resnet18" else max(args.step_repeats, 30)
        rows.append(measure(name, repeats, args.rebalance_repeats))

    print(f"# Rebalance overhead ({datetime.date.today().isoformat()}, {cpu_model()}, "
          f"torch {torch.__version__}, {args.threads} thread(s))\n")
    print("| model | balanced layers | train step | steps / epoch | epoch | rebalance float64 (default) "
          "| share of epoch | rebalance float32 | share of epoch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['layers']} | {r['step_s'] * 1e3:.1f} ms | {r['steps']} | {r['epoch_s']:.1f} s "
            f"| {r['float64'] * 1e3:.1f} ms | {100 * r['float64'] / r['epoch_s']:.3f}% "
            f"| {r['float32'] * 1e3:.1f} ms | {100 * r['float32'] / r['epoch_s']:.3f}% |"
        )


if __name__ == "__main__":
    main()
