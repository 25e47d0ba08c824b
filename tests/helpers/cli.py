"""The ``tempbalance`` CLI run in process, with what it printed."""

from __future__ import annotations

import logging

from tempbalance.cli import main as cli_main


def call_cli(argv: list[str], capsys, caplog=None) -> tuple[int, list[str], str]:
    """Run the CLI in process: (exit status, stderr lines, stdout). argparse's exit counts too.

    With ``caplog``, log records of level INFO and above count as stderr lines: in a real process
    the CLI's ``logging.basicConfig(level=INFO)`` prints each of them there (under pytest they go
    to the log capture instead).
    """
    capsys.readouterr()
    if caplog is not None:
        caplog.set_level(logging.INFO)
        caplog.clear()
    try:
        code = cli_main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors exit(2) after printing their one line
        code = exc.code
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    if caplog is not None:
        err = [record.getMessage() for record in caplog.records if record.levelno >= logging.INFO] + err
    return code, err, captured.out


def cli(argv, capsys) -> tuple[int, list[str], str]:
    """Run the CLI in process: (exit status, stderr lines, stdout)."""
    capsys.readouterr()
    code = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out
