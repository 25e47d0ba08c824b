"""Cost of the FARMS spectrum (``esd="farms"``) against the plain one (``esd="full"``), side by side.

For each model (random weights of real shapes; eigen work does not depend on the values), the
whole analysis of its Conv2d + Linear layers (``tempbalance.analysis.analyze_layers``: matrices,
windows, batched Gram + ``eigvalsh``, median fit) is timed with the plain ESD and with FARMS
windows (defaults: 100 x 200 windows, 10 per side; conv blocks of cols/2 x cols), in float32 and
in float64 (TempBalance's default precision). Each round runs every variant once (so a burst of
load on a shared machine hits all alike); a timing is the best of ``--repeats`` rounds, as
process CPU time (with one thread: the work done) and wall time.

Models: ``resnet18-w0.25`` (the CIFAR-10 quality cell's model), ``resnet18`` (CIFAR ResNet18),
``gpt2-block`` (one GPT-2-small block, out x in: 2304x768, 768x768, 3072x768, 768x3072),
``llama-block`` (one Llama-7B decoder block, out x in: 4 x 4096x4096, 2 x 11008x4096, 4096x11008; slow
with the plain ESD: a few minutes a round on one thread, 0.8 GB of weights).

Usage:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/farms_cost.py [--models ...] [--repeats 3]
        [--threads 1] [--device cpu] [--out FILE]
        OMP_NUM_THREADS=1 .venv/bin/python benchmarks/farms_cost.py --alphas resnet18-w0.25   # alphas, factors at init
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy / torch load their BLAS

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import cpu_model  # noqa: E402
from tempbalance.analysis import AnalysisOptions, analyze_layers  # noqa: E402
from tempbalance.layers import find_layers  # noqa: E402

MODELS = ("resnet18-w0.25", "resnet18", "gpt2-block", "llama-block")
TYPES = (nn.Conv2d, nn.Linear)


def _linears(shapes: list[tuple[int, int]]) -> nn.Module:
    """Bias-free Linear layers of the given (out, in) shapes (default init)."""
    return nn.Sequential(*(nn.Linear(n_in, n_out, bias=False) for n_out, n_in in shapes))


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18-w0.25":
        from tempbalance.train.models import create_model

        return create_model("resnet18", 10, width=0.25)
    if name == "resnet18":
        from tempbalance.train.models import create_model

        return create_model("resnet18", 10)
    if name == "gpt2-block":
        return _linears([(2304, 768), (768, 768), (3072, 768), (768, 3072)])
    if name == "llama-block":
        return _linears([(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)])
    raise SystemExit(f"unknown model {name!r}; accepted: {', '.join(MODELS)}")


def timed(fn) -> tuple[float, float, object]:
    """(process CPU seconds, wall seconds, result) of one call."""
    c0, w0 = time.process_time(), time.perf_counter()
    result = fn()
    return time.process_time() - c0, time.perf_counter() - w0, result


def bench_model(name: str, repeats: int, device: str = "cpu") -> list[dict]:
    model = build(name).to(device)
    refs = find_layers(model, TYPES)
    variants = {
        (precision, esd): AnalysisOptions(esd=esd, precision=precision)
        for precision in ("float32", "float64")
        for esd in ("full", "farms")
    }
    best: dict = {}
    records: dict = {}
    for _ in range(repeats):
        for key, options in variants.items():
            cpu, wall, records[key] = timed(lambda options=options: analyze_layers(refs, options))
            old = best.get(key, (float("inf"), float("inf")))
            best[key] = (min(old[0], cpu), min(old[1], wall))
    rows = []
    for (precision, esd), (cpu, wall) in best.items():
        result = records[(precision, esd)]
        plain_cpu = best[(precision, "full")][0]
        rows.append({
            "model": f"{name} ({len(refs)} layers)",
            "precision": precision,
            "esd": esd,
            "cpu": cpu,
            "wall": wall,
            "ratio": cpu / plain_cpu,
            "eigs": sum(r.num_eigs for r in result),
        })
    return rows


def _is_square(shape: str) -> bool:
    """Whether a weight shape like ``"64x64x3x3"`` has square (per-position) matrices."""
    out_ch, in_ch = shape.split("x")[:2]
    return out_ch == in_ch


def alpha_table(name: str) -> str:
    """Per balanced layer of ``name`` at initialisation: plain and FARMS alpha and TempBalance's factor
    (default rule: first/last layer out, eigs_thresh 50, linear map 0.5-1.5, float64 spectra)."""
    import tempbalance as tb

    model = build(name)
    factors = {}
    for esd in ("full", "farms"):
        balancer = tb.TempBalance(model, torch.optim.SGD(tb.param_groups(model), lr=1.0), esd=esd)
        factors[esd] = {entry.layer: (entry.alpha, entry.factor) for entry in balancer.history[-1].layers}
    shapes = {ref.name: "x".join(map(str, ref.weight.shape)) for ref in find_layers(model, TYPES)}
    lines = [f"{name}, seed 0, at initialisation:", "",
             "| layer | weight | plain alpha | plain factor | FARMS alpha | FARMS factor |",
             "|---|---|---|---|---|---|"]
    for layer, (alpha, factor) in factors["full"].items():
        f_alpha, f_factor = factors["farms"][layer]
        lines.append(f"| {layer} | {shapes[layer]} | {alpha:.3f} | {factor:.3f} | {f_alpha:.3f} | {f_factor:.3f} |")
    for esd in ("full", "farms"):
        values = list(factors[esd].values())
        square = [f for layer, (_, f) in factors[esd].items() if _is_square(shapes[layer])]
        lines.append(f"\n{esd}: alpha spread {max(a for a, _ in values) - min(a for a, _ in values):.3f}, mean factor "
                     f"{sum(f for _, f in values) / len(values):.3f}, mean factor of the {len(square)} square "
                     f"layers {sum(square) / len(square):.3f}")
    return "\n".join(lines) + "\n"


def table(rows: list[dict]) -> str:
    lines = [
        "| model | precision | esd | CPU s | wall s | CPU time / plain | eigenvalues |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['precision']} | {row['esd']} | {row['cpu']:.3f} | {row['wall']:.3f} "
            f"| {row['ratio']:.2f} | {row['eigs']} |"
        )
    return "\n".join(lines)


def _header(args: argparse.Namespace) -> str:
    """Date, machine and the command that reproduces the table."""
    when = datetime.datetime.now(datetime.timezone.utc)
    machine = f"{cpu_model()} ({os.cpu_count()} logical cores, {args.threads} thread(s) used), device {args.device}"
    command = (f"OMP_NUM_THREADS={args.threads} python benchmarks/farms_cost.py --models {' '.join(args.models)} "
               f"--repeats {args.repeats} --threads {args.threads} --device {args.device}")
    return (f"date: {when:%Y-%m-%d %H:%M} UTC; CPU: {machine}; torch {torch.__version__}; "
            f"best of {args.repeats} interleaved rounds\ncommand: {command}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; best is kept (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="where the weights and spectra live, e.g. cuda (default cpu; "
                        "on a GPU compare wall times: the records' float() conversions synchronise)")
    parser.add_argument("--alphas", choices=MODELS, help="only print the per-layer plain / FARMS alphas and TB "
                        "factors of this model at initialisation (deterministic; no timing)")
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    if args.alphas:
        print(alpha_table(args.alphas))
        return 0
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows += bench_model(name, args.repeats, args.device)
        print("\n".join(table(rows[-4:]).splitlines()[2:]), flush=True)
    text = _header(args) + "\n" + table(rows) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
