"""``tempbalance train``: one training run (dataset, model, method) with metrics and checkpoints.

Every field of :class:`tempbalance.train.TrainConfig` has a flag, generated from the dataclass:
``--batch-size`` for ``batch_size`` (or the names in the field's ``flags`` metadata, e.g.
``--threads``), its type, its default, and as help the class docstring's line for the field; a
``bool`` field gets ``--name`` and ``--no-name``. A field added later gets its flag with no change
here. Unset flags keep the defaults; with ``--resume`` they are read back from the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..errors import spelling

# Flags that replace a generated one (their field then gets no generated flag):
# (flag, TrainConfig field, type, help) for values, (flag, field, value stored, help) for switches.
OPTIONS: tuple[tuple[str, str, Any, str], ...] = ()
SWITCHES: tuple[tuple[str, str, bool, str], ...] = ()


def _choices() -> dict[str, Callable[[], Iterable[str]]]:
    """Field -> the registry of its accepted values (shown in the help; validation stays in
    ``TrainConfig.validate``, which names the bad value)."""
    from ..train import config, data, methods, models

    return {
        "dataset": lambda: data.DATASETS,
        "model": lambda: models.MODEL_NAMES,
        "method": lambda: methods.METHODS,
        "fit": lambda: config.FITS,
        "metric": lambda: config.METRICS,
        "amp": lambda: config.AMP_MODES,
        "normalize": lambda: config.NORMALIZE,
        "norm_follows": lambda: config.NORM_FOLLOWS,
        "esd": lambda: config.ESD_MODES,
    }


@dataclass(frozen=True)
class Flag:
    """The command-line form of one TrainConfig field."""

    field: str
    names: tuple[str, ...]
    switch: bool
    parse: Callable[[str], Any] | None
    help: str
    stored: bool | None = None  # a SWITCHES override: the value it stores


def _parser_for(annotation: Any) -> Callable[[str], Any]:
    """``int``/``float``/``str`` (also ``X | None``) parse as such; anything else is read as a TOML
    value (lists, booleans, strings), like ``sweep --set``."""
    from ..train.config import parse_value

    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
    else:
        options = [annotation]
    return options[0] if len(options) == 1 and options[0] in (int, float, str) else parse_value


def _help(text: str, default: Any, choices: Iterable[str] | None) -> str:
    text = text or "see tempbalance.train.TrainConfig"
    if choices is not None:
        text += f" Accepted: {', '.join(choices)}."
    if "default" not in text.lower():
        text += f" (default: {default})"
    return text.replace("%", "%%")  # argparse formats help strings


def train_flags() -> list[Flag]:
    """One :class:`Flag` per TrainConfig field, in field order (overrides from ``OPTIONS`` /
    ``SWITCHES`` replace the generated flag of their field)."""
    from ..train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    helps = TrainConfig.field_help()
    choices = _choices()
    overridden = {field: (flag, kind, text) for flag, field, kind, text in OPTIONS}
    switched = {field: (flag, value, text) for flag, field, value, text in SWITCHES}
    flags = []
    for item in dataclasses.fields(TrainConfig):
        name = item.name
        if name in overridden:
            flag, kind, text = overridden[name]
            flags.append(Flag(name, (flag,), False, kind, text))
            continue
        if name in switched:
            flag, value, text = switched[name]
            flags.append(Flag(name, (flag,), True, None, text, stored=value))
            continue
        names = tuple(item.metadata.get("flags", ("--" + name.replace("_", "-"),)))
        listed = choices[name]() if name in choices else None
        text = _help(helps.get(name, ""), item.default, listed)
        if hints[name] is bool:
            flags.append(Flag(name, names, True, None, text))
        else:
            flags.append(Flag(name, names, False, _parser_for(hints[name]), text))
    return flags


def _add(parser: argparse.ArgumentParser, flag: Flag) -> None:
    if flag.stored is not None:
        parser.add_argument(*flag.names, dest=flag.field, action="store_const", const=flag.stored, default=None,
                            help=flag.help)
    elif flag.switch:
        parser.add_argument(*flag.names, dest=flag.field, action=argparse.BooleanOptionalAction, default=None,
                            help=flag.help)
    else:
        metavar = flag.names[0].lstrip("-").replace("-", "_").upper()
        parser.add_argument(*flag.names, dest=flag.field, type=flag.parse, default=None, metavar=metavar,
                            help=flag.help)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` command."""
    parser = subparsers.add_parser(
        "train",
        help="train one model with one method (CAL, TB, SNR, ...)",
        description="Train one model with one method. Under `torchrun --nproc-per-node N` the run is "
        "data-parallel (DDP): --batch-size is per process, rank 0 writes the files, --resume works the same. "
        "`--out DIR --resume` alone continues a run with its own settings.",
    )
    for flag in train_flags():
        _add(parser, flag)
    parser.set_defaults(func=run)


def cli_spelling(flags: list[Flag]) -> Callable[[str, Any], str]:
    """The speller of error messages raised under ``tempbalance train``: ``--resume``,
    ``--no-progress``, ``--data-dir DIR``."""
    by_field = {flag.field: flag for flag in flags}

    def speller(name: str, value: Any) -> str:
        flag = by_field.get(name)
        if flag is None:
            return f"{name}={value!r}"
        if flag.switch:
            if flag.stored is not None or value:
                return flag.names[0]
            return "--no-" + flag.names[0][2:]
        return f"{flag.names[0]} {value}"

    return speller


def config_from_args(args: argparse.Namespace):
    """The :class:`TrainConfig` of the given flags: unset flags keep the defaults, or with
    ``--resume --out DIR`` the run's own settings."""
    from ..train import TrainConfig

    values = {name: getattr(args, name) for name in TrainConfig.field_names() if getattr(args, name, None) is not None}
    if values.get("resume") and values.get("out") is not None:
        return TrainConfig.for_resume(values["out"], values)
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    """Train; print the summary line (rank 0 only under torchrun). Exit 0 when finished or stopped,
    128 + signal when interrupted."""
    from ..train import run_training
    from ..train.loop import summary_line

    with spelling(cli_spelling(train_flags())):
        summary = run_training(config_from_args(args))  # errors name the flags, e.g. --resume
    if os.environ.get("RANK", "0") == "0":
        print(summary_line(summary))
    if summary["status"] == "interrupted":
        return 128 + int(summary["signal"])
    return 0
