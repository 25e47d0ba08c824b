"""Speed of the layer analysis on one CPU thread: this project's "median" and "ks" fits
against WeightWatcher, the reference algorithm and the bare eigensolver floor.

Per model (CIFAR ResNet18, VGG16, WRN28-6 from the project zoo; timm ViT-B/16, random init):

- ``tb median`` / ``tb ks``: ``tempbalance.analyze(model, fit=...)`` on the Conv2d + Linear layers
  (``ks`` with ``filter_zeros=True``, WeightWatcher's lambda > 1e-5 convention);
- ``weightwatcher``: WeightWatcher 0.7.7 ``analyze()`` with default settings (its ``ks``-type fit);
- ``reference``: the TempBalance reference algorithm (per-layer float32 svdvals and a Python loop), written here:
  per layer, batched float32 ``torch.linalg.svdvals`` of the per-position matrices scaled by
  sqrt(0.5), lambda = sigma^2 pooled, median Hill alpha;
- ``floor``: only the eigensolver calls on prebuilt matrix stacks: Gram + ``eigvalsh``, batched by
  shape, float32.

Each timing is the best of ``--repeats`` rounds (each round runs every method once, so load
from other processes hits all alike), as process CPU time (one thread: the work done,
robust to other processes on a shared machine) and wall time. Ratios use CPU time: the
reference's time over ours (median), WeightWatcher's over ours (ks), ours over the floor;
alpha agreement: max relative difference of alpha vs WeightWatcher (ks, layers with 64+
eigenvalues) or vs the reference algorithm (median).

Usage:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/analysis_speed.py [--repeats 3] [--models ...]
        [--out .agents/bench_analysis.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import logging
import math
import os
import time
import warnings
from collections import defaultdict

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy / torch / scipy load their BLAS

import torch  # noqa: E402
from torch import nn  # noqa: E402

import tempbalance as tb  # noqa: E402
from _common import cpu_model  # noqa: E402

TYPES = (nn.Conv2d, nn.Linear)
MODELS = ("resnet18", "vgg16", "wrn28-6", "vit_base_patch16_224")


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("vit"):
        import timm

        return timm.create_model(name, pretrained=False)
    from tempbalance.train.models import create_model

    return create_model(name, 10)


def timed(fn):
    """(process CPU seconds, wall seconds, result) of one call.

    On one thread CPU time is the work done; unlike wall time it barely moves when other
    processes share the machine, so the ratios use it."""
    c0, w0 = time.process_time(), time.perf_counter()
    result = fn()
    return time.process_time() - c0, time.perf_counter() - w0, result


def best_of_interleaved(methods: dict, repeats: int) -> tuple[dict, dict]:
    """Run every method once per round, ``repeats`` rounds (so a burst of load on a shared
    machine hits all methods alike); return the best (CPU, wall) times and the last results."""
    best: dict = {}
    results: dict = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            cpu, wall, results[name] = timed(fn)
            old = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(old[0], cpu), min(old[1], wall))
    return best, results


def reference_stacks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per Conv2d / Linear layer: (k, out, in) float32 matrices, conv scaled by sqrt(0.5)."""
    stacks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            w = module.weight.detach().float()
            stacks[name] = w.permute(2, 3, 0, 1).reshape(-1, w.shape[0], w.shape[1]) * math.sqrt(0.5)
        elif isinstance(module, nn.Linear):
            stacks[name] = module.weight.detach().float().unsqueeze(0)
    return stacks


def median_hill(eigs: torch.Tensor) -> float:
    eigs = torch.sort(eigs.double()).values
    i = eigs.numel() // 2
    tail = eigs[i:]
    n = tail.numel()
    return 1 + n / float(torch.log(tail).sum() - n * torch.log(tail[0]))


@torch.no_grad()
def reference_algorithm(model: nn.Module) -> dict[str, float]:
    """Reference algorithm: svdvals per layer (batched over kernel positions) + median Hill."""
    alphas = {}
    for name, stack in reference_stacks(model).items():
        alphas[name] = median_hill(torch.linalg.svdvals(stack).reshape(-1) ** 2)
    return alphas


@torch.no_grad()
def floor(buckets: list[torch.Tensor]) -> None:
    """Only the eigensolver: Gram of the smaller side + eigvalsh, one call per shape bucket."""
    for batch in buckets:
        torch.linalg.eigvalsh(batch @ batch.transpose(1, 2))


def shape_buckets(model: nn.Module) -> list[torch.Tensor]:
    groups = defaultdict(list)
    for stack in reference_stacks(model).values():
        if stack.shape[1] > stack.shape[2]:
            stack = stack.transpose(1, 2)
        groups[tuple(stack.shape[1:])].append(stack.contiguous())
    return [torch.cat(g) for g in groups.values()]


def weightwatcher(model: nn.Module):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        import weightwatcher as ww

        logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
        return ww.WeightWatcher(model=model).analyze()


def max_rel(ours: dict[str, float], theirs: dict[str, float]) -> float:
    diffs = [abs(ours[k] - v) / abs(v) for k, v in theirs.items() if k in ours and math.isfinite(v)]
    return max(diffs) if diffs else float("nan")


def bench_model(name: str, repeats: int) -> list[tuple]:
    model = build(name)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    buckets = shape_buckets(model)
    times, results = best_of_interleaved(
        {
            "med": lambda: tb.analyze(model, types=TYPES),
            "ks": lambda: tb.analyze(model, "ks", types=TYPES, filter_zeros=True),
            "ref": lambda: reference_algorithm(model),
            "floor": lambda: floor(buckets),
            "ww": lambda: weightwatcher(model),
        },
        repeats,
    )
    df = results["ww"]
    ww_alphas = {row["longname"]: float(row["alpha"]) for _, row in df.iterrows() if row["num_evals"] >= 64}
    label = f"{name} ({len(results['med'])} layers, {params:.1f}M params)"
    cpu = {k: v[0] for k, v in times.items()}
    return [
        (label, "tb median", times["med"],
         f"**{cpu['ref'] / cpu['med']:.2f}x** faster than reference; **{cpu['med'] / cpu['floor']:.2f}x** floor",
         f"{max_rel(results['med'].alphas(), results['ref']):.1e} vs reference"),
        ("", "tb ks", times["ks"], f"**{cpu['ww'] / cpu['ks']:.2f}x** faster than WW",
         f"{max_rel(results['ks'].alphas(), ww_alphas):.1e} vs WW ({len(ww_alphas)} layers)"),
        ("", "weightwatcher analyze()", times["ww"], "", ""),
        ("", "reference (svdvals + median)", times["ref"], f"{cpu['ref'] / cpu['floor']:.2f}x floor", ""),
        ("", "floor (Gram + eigvalsh)", times["floor"], "1", ""),
    ]


def table(rows: list[tuple]) -> str:
    lines = [
        "| model | method | CPU s | wall s | ratio (CPU time) | alpha agreement (max rel diff) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {meth} | {t[0]:.3f} | {t[1]:.3f} | {ratio} | {agree} |" for m, meth, t, ratio, agree in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        rows += bench_model(name, args.repeats)
        print("\n".join(table(rows[-5:]).splitlines()[2:]), flush=True)
    header = (
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU: {cpu_model()} "
        f"({os.cpu_count()} logical cores, 1 thread used); torch {torch.__version__}; best of {args.repeats} interleaved rounds\n"
        f"command: OMP_NUM_THREADS=1 python benchmarks/analysis_speed.py --repeats {args.repeats} "
        f"--models {' '.join(args.models)}\n"
    )
    text = header + "\n" + table(rows) + "\n"
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
