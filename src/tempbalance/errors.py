"""The project's exceptions for bad user input (shown by the CLI as one line), and how an error
message spells a setting in the interface it is raised in (``resume=True`` or ``--resume``).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

__all__ = ["TempBalanceError", "ConfigError", "Placeholder", "spell", "spelling"]


class TempBalanceError(Exception):
    """Base class for errors the CLI reports as a single readable line.

    ``exit_status`` is the CLI's exit status for it: 2 (bad input) unless a subclass says otherwise.
    """

    exit_status = 2


class ConfigError(TempBalanceError, ValueError):
    """A bad option value: the message names the value and what is accepted."""


class Placeholder(str):
    """A value shown as a name to fill in (``DIR``), never quoted: ``spell("data_dir", Placeholder("DIR"))``."""

    def __repr__(self) -> str:
        return str(self)


Speller = Callable[[str, Any], str]


def _python(name: str, value: Any) -> str:
    return f"{name}={value!r}"


_SPELLER: contextvars.ContextVar[Speller] = contextvars.ContextVar("tempbalance_speller", default=_python)


def spell(name: str, value: Any = True) -> str:
    """How the current interface writes the setting ``name`` with ``value``.

    In Python (the default) ``spell("resume")`` is ``"resume=True"`` and ``spell("data_dir",
    Placeholder("DIR"))`` is ``"data_dir=DIR"``; inside :func:`spelling` the command line's own form,
    e.g. ``"--resume"`` and ``"--data-dir DIR"`` for ``tempbalance train``.
    """
    return _SPELLER.get()(name, value)


@contextlib.contextmanager
def spelling(speller: Speller) -> Iterator[None]:
    """Within the block, error messages spell settings with ``speller(name, value) -> str``."""
    token = _SPELLER.set(speller)
    try:
        yield
    finally:
        _SPELLER.reset(token)
