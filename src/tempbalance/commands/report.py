"""``tempbalance report RUNS_DIR``: Markdown + CSV tables (mean ± std over seeds, paired difference
vs cal) and PNG plots (accuracy curves, per-layer alpha and rate heat maps).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` command."""
    parser = subparsers.add_parser("report", help="tables and plots from a directory of runs")
    parser.add_argument("runs_dir", help="directory searched recursively for run directories")
    parser.add_argument("--out", default=None, help="where report.md, report.csv and plots/ go (default RUNS_DIR)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the report and print its table."""
    from ..train.report import write_report

    result = write_report(args.runs_dir, args.out, plots=not args.no_plots)
    print(result["markdown"], end="")
    print("wrote " + ", ".join(result["files"]))
    return 0
