"""``tempbalance demo``: CAL vs TempBalance on the offline mnist1d set (1-D CNN, 3 seeds), a few
minutes on a laptop CPU, then the results table, per-layer alphas and plots.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command."""
    parser = subparsers.add_parser("demo", help="CAL vs TB on mnist1d, end to end in a few minutes")
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds, 1-5 (default 3)")
    parser.add_argument("--epochs", type=int, default=15, help="epochs per run (default 15)")
    parser.add_argument("--lr", type=float, default=0.2, help="initial learning rate of both methods (default 0.2)")
    parser.add_argument("--train-fraction", type=float, default=1.0, help="share of the training set (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: as the environment sets them, e.g. OMP_NUM_THREADS)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print what it found."""
    from ..train.demo import format_demo, run_demo

    result = run_demo(
        args.out,
        seeds=args.seeds,
        epochs=args.epochs,
        lr=args.lr,
        train_fraction=args.train_fraction,
        threads=args.threads,
        progress=not args.no_progress,
        plots=not args.no_plots,
    )
    print(format_demo(result))
    return 0
