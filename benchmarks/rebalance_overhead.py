"""What one TempBalance rebalance costs, as a share of one training epoch.

For the CIFAR ResNet18 (batch 128, 32x32 synthetic images, 391 steps an epoch) and the mnist1d
demo model ``cnn1d`` (3200 samples, batch 128, 25 steps an epoch): the median time of a training
step (forward, backward, SGD step) times the steps of an epoch, against the median time of one
``TempBalance.rebalance()`` (spectra of every balanced layer, fits, factors), in the scheduler's
default float64 and in float32, and of a ``step()`` that does not rebalance (the bookkeeping
around the base schedule, paid at every step in per-step training). Prints a Markdown table.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rebalance_overhead.py [--threads 1]

Before / after a change of the library (the script uses only the public API, so it runs against
any checkout's ``src``): save each side's numbers, alternating, then compare::

    PYTHONPATH=/path/to/main/src python benchmarks/rebalance_overhead.py --json /tmp/before.json
    PYTHONPATH=src python benchmarks/rebalance_overhead.py --json /tmp/after.json
    python benchmarks/rebalance_overhead.py --compare /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pools

import argparse
import datetime
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import tempbalance
from _common import cpu_model  # noqa: E402

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
    x = torch.randn(batch_size, *shape)
    y = torch.randint(0, 10, (batch_size,))

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step = median_time(train_step, step_repeats)
    steps = math.ceil(samples / batch_size)
    row = {"model": name, "step_s": step, "steps": steps, "epoch_s": step * steps}
    for precision in ("float64", "float32"):
        scheduler = tempbalance.TempBalance(model, optimizer, precision=precision)
        row["layers"] = len(scheduler.layers)
        row[precision] = median_time(scheduler.rebalance, rebalance_repeats)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10**6)
    scheduler = tempbalance.TempBalance(model, optimizer, cosine, interval=10**9)  # step() never rebalances
    row["bookkeeping_s"] = median_time(lambda: [scheduler.step() for _ in range(100)], 5) / 100
    return row


def print_table(rows: list[dict], threads: int) -> None:
    print(f"# Rebalance overhead ({datetime.date.today().isoformat()}, {cpu_model()}, "
          f"torch {torch.__version__}, {threads} thread(s), tempbalance from {Path(tempbalance.__file__).parent})\n")
    print("| model | balanced layers | train step | steps / epoch | epoch | rebalance float64 (default) "
          "| share of epoch | rebalance float32 | share of epoch | step() without rebalance |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['layers']} | {r['step_s'] * 1e3:.1f} ms | {r['steps']} | {r['epoch_s']:.1f} s "
            f"| {r['float64'] * 1e3:.1f} ms | {100 * r['float64'] / r['epoch_s']:.3f}% "
            f"| {r['float32'] * 1e3:.1f} ms | {100 * r['float32'] / r['epoch_s']:.3f}% "
            f"| {r['bookkeeping_s'] * 1e6:.0f} µs |"
        )


def print_comparison(before_path: str, after_path: str) -> None:
    """Side by side: the rebalance and bookkeeping times of two saved runs (``--json``)."""
    before, after = (json.loads(Path(p).read_text()) for p in (before_path, after_path))
    print(f"# Rebalance overhead, before ({before['source']}) / after ({after['source']})\n")
    print("| model | rebalance float64 | after / before | rebalance float32 | after / before "
          "| step() without rebalance | after / before |")
    print("|---|---|---|---|---|---|---|")
    by_model = {r["model"]: r for r in before["rows"]}
    for a in after["rows"]:
        b = by_model.get(a["model"])
        if b is None:
            continue
        cells = []
        for key, unit, scale in (("float64", "ms", 1e3), ("float32", "ms", 1e3), ("bookkeeping_s", "µs", 1e6)):
            if key in a and key in b:
                cells.append(f"{b[key] * scale:.1f} / {a[key] * scale:.1f} {unit} | {a[key] / b[key]:.3f}")
            else:
                cells.append("— | —")
        print(f"| {a['model']} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--step-repeats", type=int, default=5, help="timed training steps (median)")
    parser.add_argument("--rebalance-repeats", type=int, default=5, help="timed rebalances (median)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to PATH (for --compare)")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two --json files and exit")
    args = parser.parse_args()
    if args.compare:
        print_comparison(*args.compare)
        return
    torch.set_num_threads(args.threads)

    rows = []
    for name in args.models:
        repeats = args.step_repeats if name == "resnet18" else max(args.step_repeats, 30)
        rows.append(measure(name, repeats, args.rebalance_repeats))
    print_table(rows, args.threads)
    if args.json:
        source = str(Path(tempbalance.__file__).resolve().parent)
        Path(args.json).write_text(json.dumps({"source": source, "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
