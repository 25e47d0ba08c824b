"""``tempbalance train``: one training run (dataset, model, method) with metrics and checkpoints.

Every flag maps to a field of :class:`tempbalance.train.TrainConfig`; unset flags keep its defaults.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

# flag -> (TrainConfig field, type, help)
OPTIONS: tuple[tuple[str, str, Any, str], ...] = (
    ("--dataset", "dataset", str, "data set name (see `tempbalance data list`); default cifar10"),
    ("--model", "model", str, "model name; default: the data set's default model"),
    ("--method", "method", str, "cal, snr, tb, tb+snr, sgdr, lars, lamb, lookahead, sgdp, tb+sgdp, alphadecay, "
     "tb+alphadecay; default cal"),
    ("--epochs", "epochs", int, "number of epochs; default 200"),
    ("--lr", "lr", float, "initial (global) learning rate; default 0.1"),
    ("--batch-size", "batch_size", int, "training batch size per process; default 128 (global: x processes)"),
    ("--weight-decay", "weight_decay", float, "weight decay; default 5e-4"),
    ("--momentum", "momentum", float, "SGD momentum; default 0.9"),
    ("--seed", "seed", int, "seed of weights, batch order and augmentation; default 43"),
    ("--out", "out", str, "run directory: config.json, metrics, checkpoints, summary.json (default: no files)"),
    ("--data-dir", "data_dir", str, "folder holding the data set's files"),
    ("--device", "device", str, "auto (default), cpu, cuda, cuda:N, mps"),
    ("--train-fraction", "train_fraction", float, "share of the training set used, in (0, 1]; default 1"),
    ("--width", "width", float, "model width factor; default 1"),
    ("--s1", "s1", float, "TempBalance: lowest lr factor; default 0.5"),
    ("--s2", "s2", float, "TempBalance: highest lr factor; default 1.5"),
    ("--assign", "assign", str, "TempBalance assignment function; default linear"),
    ("--metric", "metric", str, "TempBalance metric: alpha, alphahat, spectral_norm; default alpha"),
    ("--fit", "fit", str, "power-law fit: median, ks, fix-finger; default median"),
    ("--snr-coef", "snr_coef", float, "spectral-norm regularisation coefficient (snr methods); default 0.01"),
    ("--amp", "amp", str, "auto (bf16 autocast on CUDA only), bf16, off; default auto"),
    ("--threads", "num_threads", int, "torch CPU threads"),
    ("--eval-batch-size", "eval_batch_size", int, "test batch size; default 512"),
    ("--stop-after", "stop_after", int, "stop (resumably) after this many epochs in total"),
    ("--tag", "tag", str, "free label the report groups runs by"),
    ("--wd-s1", "wd_s1", float, "AlphaDecay: lowest weight-decay factor; default 0.5"),
    ("--wd-s2", "wd_s2", float, "AlphaDecay: highest weight-decay factor; default 1.5"),
    ("--normalize", "normalize", str, "balancing factors: none (default) or mean (divided by their mean)"),
    ("--norm-follows", "norm_follows", str, "which layer a norm layer follows: order (default), name (the reference's), none"),
)
SWITCHES: tuple[tuple[str, str, bool, str], ...] = (
    ("--resume", "resume", True, "continue the run in --out from its checkpoint"),
    ("--download", "download", True, "fetch a missing data set into --data-dir (cifar10/cifar100/svhn)"),
    ("--compile", "compile", True, "wrap the model in torch.compile"),
    ("--asynchronous", "asynchronous", True, "TempBalance: measure on a worker thread, apply when ready (single process)"),
    ("--tb-async", "asynchronous", True, "the old name of --asynchronous"),
    ("--sync-bn", "sync_bn", True, "under torchrun: SyncBatchNorm over the global batch (CUDA only)"),
    ("--no-progress", "progress", False, "no progress bar"),
    ("--no-augment", "augment", False, "no data augmentation"),
    ("--no-deterministic", "deterministic", False, "allow non-deterministic kernels (faster on GPU)"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` command."""
    parser = subparsers.add_parser(
        "train",
        help="train one model with one method (CAL, TB, SNR, ...)",
        description="Train one model with one method. Under `torchrun --nproc-per-node N` the run is "
        "data-parallel (DDP): --batch-size is per process, rank 0 writes the files, --resume works the same.",
    )
    for flag, dest, kind, text in OPTIONS:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    for flag, dest, value, text in SWITCHES:
        parser.add_argument(flag, dest=dest, action="store_const", const=value, default=None, help=text)
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The :class:`TrainConfig` of the given flags (unset flags keep the defaults)."""
    from ..train import TrainConfig

    names = [dest for _, dest, _, _ in OPTIONS] + [dest for _, dest, _, _ in SWITCHES]
    values = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    """Train; print the summary line (rank 0 only under torchrun). Exit 0 when finished or stopped,
    128 + signal when interrupted."""
    from ..train import run_training
    from ..train.loop import summary_line

    summary = run_training(config_from_args(args))
    if os.environ.get("RANK", "0") == "0":
        print(summary_line(summary))
    if summary["status"] == "interrupted":
        return 128 + int(summary["signal"])
    return 0
