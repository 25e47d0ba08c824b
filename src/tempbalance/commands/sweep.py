"""``tempbalance sweep CONFIG``: run a grid of settings x methods x seeds from a TOML/JSON file.

Finished runs (with summary.json) are skipped, half-done ones resumed; ``--dry-run`` lists them.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` command."""
    parser = subparsers.add_parser("sweep", help="run a grid of training runs (e.g. a published table)")
    parser.add_argument("config", help="sweep file (.toml or .json), e.g. configs/paper/cifar10.toml")
    parser.add_argument("--out", default=None, help="root of the run directories (default: the file's `out`)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a setting for every run, e.g. --set epochs=2 --set seeds=[43] --set device=cpu",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their status, train nothing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """List or run the sweep; exit 0, 1 when a run failed, or 130 when a run was interrupted."""
    from ..train.sweep import expand_sweep, load_sweep, run_status, run_sweep

    runs = expand_sweep(load_sweep(args.config), args.overrides, out=args.out)
    if args.dry_run:
        print(f"{'status':<8} {'setting':<22} {'method':<10} {'seed':>5}  lr       epochs  out")
        for item in runs:
            print(
                f"{run_status(item):<8} {item.setting:<22} {item.method:<10} {item.seed:>5}  "
                f"{item.config.lr:<8g} {item.config.epochs:<7} {item.out}"
            )
        print(f"{len(runs)} runs")
        return 0
    summaries = run_sweep(runs)
    finished = sum(summary["status"] == "finished" for summary in summaries)
    failed = [summary for summary in summaries if summary["status"] == "failed"]
    print(f"sweep {args.config}: {finished}/{len(runs)} runs finished, {len(failed)} failed")
    for summary in failed:
        print(f"  failed: {summary['method']} seed {summary['seed']}: {summary['error']}")
    if failed:
        return 1
    return 0 if finished == len(runs) else 130
