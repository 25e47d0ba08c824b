"""``tempbalance data``: list the data sets, prepare TinyImageNet, fetch or cache a data set.

Subcommands: ``list``, ``tinyimagenet --data-dir DIR [--download]``, ``prepare NAME --data-dir DIR``.
"""

from __future__ import annotations

import argparse

from ..errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command and its subcommands."""
    parser = subparsers.add_parser("data", help="list, download and prepare data sets")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    sub.add_parser("list", help="show the supported data sets")

    tiny = sub.add_parser(
        "tinyimagenet",
        help="extract tiny-imagenet-200.zip in DIR and arrange val/ into class folders",
    )
    tiny.add_argument("--data-dir", required=True, help="folder holding tiny-imagenet-200.zip or tiny-imagenet-200/")
    tiny.add_argument("--download", action="store_true", help="download the zip first if it is missing")

    prep = sub.add_parser(
        "prepare",
        help="download (with --download) and load a data set once: checks it and builds the decode cache",
    )
    prep.add_argument("name", help="data set name (see `tempbalance data list`)")
    prep.add_argument("--data-dir", default=None, help="folder with the data set's files")
    prep.add_argument("--download", action="store_true", help="fetch cifar10/cifar100/svhn/tinyimagenet if missing")
    prep.add_argument("--cache-dir", default=None, help="cache for decoded image folders (default: see docs)")
    parser.set_defaults(func=run)


def _list() -> int:
    from ..train.data import DATASETS

    header = f"{'name':<13}{'classes':>8}{'shape':>12}  {'model':<12}{'augment':<10}source"
    print(header)
    for info in DATASETS.values():
        shape = f"{info.in_channels}x{info.image_size}" + ("" if info.name == "mnist1d" else f"x{info.image_size}")
        print(f"{info.name:<13}{info.num_classes:>8}{shape:>12}  {info.default_model:<12}{info.augment:<10}{info.source}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from ..train.data import load_dataset, prepare_tinyimagenet

    if args.name == "tinyimagenet":
        if args.data_dir is None:
            raise ConfigError("tinyimagenet needs --data-dir")
        prepare_tinyimagenet(args.data_dir, download=args.download)
    data = load_dataset(args.name, args.data_dir, download=args.download, cache_dir=args.cache_dir, num_workers=0)
    print(f"{args.name}: {data.num_train} train / {data.num_test} test examples, {data.info.num_classes} classes")
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch ``tempbalance data ACTION``; returns the exit status."""
    if args.data_command == "list":
        return _list()
    if args.data_command == "tinyimagenet":
        from ..train.data import prepare_tinyimagenet

        root = prepare_tinyimagenet(args.data_dir, download=args.download)
        print(f"tinyimagenet ready in {root} (train/ and val/ arranged in class folders)")
        return 0
    return _prepare(args)
