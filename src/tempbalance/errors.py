"""The project's exception for bad user input (shown by the CLI as one line)."""

from __future__ import annotations

__all__ = ["TempBalanceError", "ConfigError"]


class TempBalanceError(Exception):
    """Base class for errors the CLI reports as a single readable line."""


class ConfigError(TempBalanceError, ValueError):
    """A bad option value: the message names the value and what is accepted."""
