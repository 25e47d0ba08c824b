"""What the harness's safety checks cost per epoch: the non-finite check of every weight before an
epoch is saved, the atomic checkpoint write (unique temporary, fsync, rename, previous kept) against
a plain ``torch.save``, and the status of a run directory as a sweep reads it (lock probe, summary,
last metrics row, memory-mapped checkpoint and recorded settings). Prints a Markdown table.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/robustness_overhead.py [--models resnet18 cnn1d] [--repeats 5]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pools

import argparse
import json
import tempfile
from pathlib import Path

import torch

from rebalance_overhead import median_time  # noqa: E402  (median of repeats after one warm-up call)
from tempbalance.train.checkpoint import save_checkpoint
from tempbalance.train.divergence import non_finite_tensors
from tempbalance.train.models import create_model
from tempbalance.train.sweep import expand_sweep, run_status

MODELS = {"resnet18": (3, 10), "cnn1d": (1, 10)}  # name: (input channels, classes)


def training_state(model: torch.nn.Module) -> dict:
    """A checkpoint as the loop writes it: weights, SGD momentum buffers, a few metric rows."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for parameter in model.parameters():
        optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
    rows = [{"epoch": i + 1, "test_acc": 50.0} for i in range(10)]
    return {"epoch": 10, "config": {"method": "cal", "seed": 1}, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": {}, "rng": {}, "metrics": rows}


def plain_save(state: dict, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(state, handle)


def measure(name: str, repeats: int, directory: Path) -> dict:
    channels, classes = MODELS[name]
    model = create_model(name, classes, channels)
    run_dir = directory / name
    spec = {"name": "b", "seeds": [1], "methods": ["cal"], "base": {"dataset": "mnist1d", "model": "cnn1d"}}
    (run,) = expand_sweep(spec, {"out": str(directory)}, out=directory)
    run.config.out = str(run_dir)  # the sweep run whose directory is measured
    state = dict(training_state(model), config=run.config.to_dict())
    save_checkpoint(state, run_dir)
    (run_dir / "config.json").write_text(json.dumps(run.config.to_dict()))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in state["metrics"]))
    (run_dir / "summary.json").write_text(json.dumps({"status": "finished", "epochs_done": 10}))
    assert run_status(run) == "done"
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint_mb": (run_dir / "checkpoint.pt").stat().st_size / 1e6,
        "finite_check_ms": 1e3 * median_time(lambda: non_finite_tensors(model), repeats),
        "plain_save_ms": 1e3 * median_time(lambda: plain_save(state, directory / f"{name}.pt"), repeats),
        "atomic_save_ms": 1e3 * median_time(lambda: save_checkpoint(state, run_dir), repeats),
        "status_ms": 1e3 * median_time(lambda: run_status(run), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), medians of {args.repeats}")
    print("| model | parameters | checkpoint (MB) | non-finite check (ms) | torch.save (ms) | atomic save (ms) | run status (ms) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            r = measure(name, args.repeats, Path(tmp))
            print(f"| {r['model']} | {r['parameters']:,} | {r['checkpoint_mb']:.1f} | {r['finite_check_ms']:.2f} "
                  f"| {r['plain_save_ms']:.1f} | {r['atomic_save_ms']:.1f} | {r['status_ms']:.1f} |")


if __name__ == "__main__":
    main()
