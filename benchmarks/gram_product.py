"""Time of the lower-triangle Gram product (``tempbalance.spectrum.gram_lower_``) against the full
product ``A @ A^T`` and the four-row-block scheme it replaced, on the matrix shapes of LLM and CNN layers.

The four-row-block scheme (row block ``b`` times the rows up to its end: 62.5% of the full product's
multiply-adds) is written out here as the baseline; the recursive halving of ``gram_lower_`` does 48% at
side 4096. Each time is the median of ``--repeats`` rounds, the three methods interleaved in each round.

Usage (repository root):
    OMP_NUM_THREADS=2 python benchmarks/gram_product.py --threads 2
    OMP_NUM_THREADS=2 python benchmarks/gram_product.py --threads 2 --shapes 1x4096x4096 9x512x512
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

from tempbalance.spectrum import gram_lower_  # noqa: E402

DEFAULT_SHAPES = ("9x512x512", "1x512x4608", "1x768x3072", "1x2048x5632", "1x4096x4096", "1x4096x11008",
                  "1x4096x32000")


def four_row_blocks(mats: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The previous scheme: 4 row blocks from side 512, 2 from 256, else 1."""
    side = mats.shape[1]
    blocks = 4 if side >= 512 else 2 if side >= 256 else 1
    edges = [side * b // blocks for b in range(blocks + 1)]
    for lo, hi in zip(edges, edges[1:]):
        torch.matmul(mats[:, lo:hi], mats[:, :hi].transpose(1, 2), out=out[:, lo:hi, :hi])
        out[:, lo:hi, hi:] = 0
    return out


def full_product(mats: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.matmul(mats, mats.transpose(1, 2), out=out)


METHODS = {"gram_lower_": gram_lower_, "four row blocks": four_row_blocks, "full A @ A^T": full_product}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="BATCHxROWSxCOLS, rows <= cols")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU: {cpu_model()} "
          f"({os.cpu_count()} logical cores); {args.threads} thread(s); torch {torch.__version__}; "
          f"median of {args.repeats} interleaved rounds, float32")
    print(f"command: python benchmarks/gram_product.py {' '.join(sys.argv[1:])}\n")
    print("| batch x rows x cols | gram_lower_ ms | four row blocks ms | full A @ A^T ms | vs four row blocks | lower triangles equal |")
    print("|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for text in args.shapes:
        batch, rows, cols = (int(part) for part in text.split("x"))
        mats = torch.randn(batch, rows, cols, generator=generator)
        outs = {name: torch.empty(batch, rows, rows) for name in METHODS}
        times: dict[str, list[float]] = {name: [] for name in METHODS}
        for _ in range(args.repeats):
            for name, method in METHODS.items():
                started = time.perf_counter()
                method(mats, outs[name])
                times[name].append(time.perf_counter() - started)
        ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
        equal = all(torch.equal(torch.tril(outs[name]), torch.tril(outs["full A @ A^T"])) for name in METHODS)
        print(f"| {text} | {ms['gram_lower_']:.1f} | {ms['four row blocks']:.1f} | {ms['full A @ A^T']:.1f} "
              f"| **{ms['gram_lower_'] / ms['four row blocks']:.2f}x** | {'yes' if equal else 'no'} |")


if __name__ == "__main__":
    main()
