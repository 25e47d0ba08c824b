"""The ``tempbalance`` command line: analyze | train | sweep | report | demo | data.

Each subcommand lives in ``tempbalance.commands.<name>`` with ``register(subparsers)``;
errors are printed as one line (exit 2) unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from .errors import TempBalanceError

COMMANDS = ("analyze", "train", "sweep", "report", "demo", "data")


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one stderr line (no usage block), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print ``PROG: error: MESSAGE (see PROG --help)`` and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="tempbalance",
        description="Layer-wise spectral analysis (HT-SR) and TempBalance training for PyTorch.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"tempbalance.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("tempbalance.commands"):
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def _rank() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun; (0, 1) otherwise."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def _print_error(text: str) -> None:
    """One whole line on stderr in a single write (ranks sharing a terminal cannot interleave it),
    prefixed with the rank under torchrun."""
    rank, world = _rank()
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    sys.stderr.write(f"tempbalance: error: {prefix}{text}\n")
    sys.stderr.flush()


SIGPIPE = 13


def _silence_stdout() -> None:
    """The reader of stdout is gone (``tempbalance ... | head``): send what is still buffered to
    /dev/null, so the interpreter's last flush does not print a BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Returns the exit status (0 ok, 2 bad input, 1 unexpected error or a failed write,
    130 interrupted, 141 when the reader of the output went away, e.g. ``| head``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away (``| head``) shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        _silence_stdout()
        return 128 + SIGPIPE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (TempBalanceError, ValueError, TypeError, FileNotFoundError, NotADirectoryError, KeyError) as exc:
        if debug:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if not (getattr(exc, "shown_by_rank0", False) and _rank()[0] != 0):  # rank 0 prints a shared error
            _print_error(str(message))
        return int(getattr(exc, "exit_status", 2))
    except Exception as exc:  # noqa: BLE001 - the CLI promises one line without --debug
        if debug:
            raise
        _print_error(f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
