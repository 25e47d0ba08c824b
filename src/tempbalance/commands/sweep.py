"""``tempbalance sweep CONFIG``: run a grid of settings x methods x seeds from a TOML/JSON file.

Finished runs are skipped, half-done ones resumed, runs another process trains left to it (so the
same command may run several times at once); ``--dry-run`` lists them; stale runs (other
recorded settings) are listed and retrained only with ``--rerun-stale``.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import spelling


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
    parser.add_argument(
        "--rerun-stale", action="store_true",
        help="retrain from scratch the runs whose recorded settings differ from the sweep's (default: skip them)",
    )
    parser.set_defaults(func=run)


def sweep_spelling(name: str, value: Any) -> str:
    """How errors under ``tempbalance sweep`` name a setting: ``--set data_dir=DIR``; starting a
    run over is ``--rerun-stale``, continuing one is running the same command again."""
    if name in ("rerun_stale", "overwrite"):
        return "--rerun-stale"
    if name == "resume":
        return "the same sweep command again"
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return f"--set {name}={text}"


def _line(summary: dict[str, Any]) -> str:
    what = f"{summary.get('setting', summary.get('tag', '?'))} {summary['method']} seed {summary['seed']}"
    return f"  {summary['status']}: {what} ({summary.get('out', '')}): {summary.get('error') or summary.get('reason')}"


def run(args: argparse.Namespace) -> int:
    """List or run the sweep; exit 0 (every run finished or left to another process that trains it),
    1 when a run failed or is stale, or 130 when a run was interrupted."""
    from ..train.sweep import expand_sweep, load_sweep, run_status, run_sweep

    with spelling(sweep_spelling):
        runs = expand_sweep(load_sweep(args.config), args.overrides, out=args.out)
        if args.dry_run:
            print(f"{'status':<8} {'setting':<22} {'method':<10} {'seed':>5}  lr       epochs  out")
            statuses = [run_status(item) for item in runs]
            for item, status in zip(runs, statuses):
                print(
                    f"{status:<8} {item.setting:<22} {item.method:<10} {item.seed:>5}  "
                    f"{item.config.lr:<8g} {item.config.epochs:<7} {item.out}"
                )
            counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
            print(f"{len(runs)} runs ({counts})" if "stale" in statuses else f"{len(runs)} runs")
            return 0
        summaries = run_sweep(runs, rerun_stale=args.rerun_stale)
    finished = sum(summary["status"] == "finished" for summary in summaries)
    left = [summary for summary in summaries if summary["status"] in ("failed", "skipped", "stale")]
    counts = {status: sum(s["status"] == status for s in left) for status in ("failed", "skipped", "stale")}
    extra = "".join(
        f", {counts[key]} {text}" for key, text in (("skipped", "left to another process"), ("stale", "stale"))
        if counts[key]
    )
    print(f"sweep {args.config}: {finished}/{len(runs)} runs finished, {counts['failed']} failed{extra}")
    for summary in left:
        print(_line(summary))
    if counts["stale"]:
        print("  (stale: the directory holds a run with other settings; --rerun-stale retrains it)")
    if counts["failed"] or counts["stale"]:
        return 1
    if any(summary["status"] == "interrupted" for summary in summaries) or len(summaries) < len(runs):
        return 130
    return 0
