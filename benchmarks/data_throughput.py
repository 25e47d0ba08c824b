"""Training-data throughput: the in-memory batched path vs a torchvision DataLoader + PIL pipeline.

Both read the real CIFAR-10 image folder; measured data-only and feeding one training step of a small
model. Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_throughput.py [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn

from tempbalance.train.data import load_dataset
from _common import cpu_model  # noqa: E402

DEFAULT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def small_model(width: float) -> tuple[nn.Module, str]:
    try:
        from tempbalance.train.models import create_model

        return create_model("resnet18", 10, width=width), f"resnet18 width {width}"
    except ImportError:
        c = 16
        net = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1, stride=2), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1, stride=2), nn.BatchNorm2d(4 * c), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, 10),
        )
        return net, "tiny CNN 16-32-64 (tempbalance.train.models not available)"


def torchvision_loader(data_dir: Path, batch_size: int, workers: int) -> Callable[[], Iterable]:
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    dataset = datasets.ImageFolder(str(data_dir / "train"), transform=transform)
    return lambda: torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)


def timed(batches: Iterator, count: int, step: Callable | None) -> float:
    """Images per second over ``count`` batches after one warm-up batch."""
    x, y = next(batches)
    if step is not None:
        step(x, y)
    images, start = 0, time.perf_counter()
    for _ in range(count):
        x, y = next(batches)
        if step is not None:
            step(x, y)
        images += x.shape[0]
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data-batches", type=int, default=60, help="timed batches, data only")
    parser.add_argument("--model-batches", type=int, default=12, help="timed batches with a training step")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    start = time.perf_counter()
    data = load_dataset("cifar10", args.data_dir)
    first_load_s = time.perf_counter() - start
    start = time.perf_counter()
    data = load_dataset("cifar10", args.data_dir)
    cached_load_s = time.perf_counter() - start

    model, model_name = small_model(args.width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    pipelines: dict[str, Callable[[], Iterator]] = {
        "in-memory uint8 tensor, batched crop+flip": lambda: iter(data.train_batches(args.batch_size, epoch=0, seed=0)),
    }
    for workers in (0, 1):
        make = torchvision_loader(args.data_dir, args.batch_size, workers)
        pipelines[f"torchvision ImageFolder + PIL transforms, num_workers={workers}"] = lambda make=make: iter(make())

    rows = []
    for name, make in pipelines.items():
        data_only = timed(make(), args.data_batches, None)
        with_model = timed(make(), args.model_batches, step)
        rows.append((name, data_only, with_model))

    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"cpu: {cpu_model()} ({os.cpu_count()} cores visible), torch threads: {args.threads}, torch {torch.__version__}")
    print(f"data: {args.data_dir}; in-memory load: first call {first_load_s:.1f} s (decodes all 60,000 images "
          f"unless the cache exists), from the cache {cached_load_s:.1f} s")
    print(f"load average at the end (other processes share the machine): {os.getloadavg()[0]:.1f}")
    print(f"model step: {model_name}, SGD, batch {args.batch_size}; timed batches: {args.data_batches} data-only, "
          f"{args.model_batches} with model (after 1 warm-up batch)")
    print()
    print("| pipeline | data only (img/s) | with training step (img/s) |")
    print("|---|---:|---:|")
    for name, data_only, with_model in rows:
        print(f"| {name} | {data_only:,.0f} | {with_model:,.0f} |")


if __name__ == "__main__":
    main()
