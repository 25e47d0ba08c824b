"""Progress of long work (training epochs, a model's layers): a tqdm bar on a terminal, a few log
lines elsewhere, so that a log file gets one line per milestone instead of every redraw of a bar.

On a terminal (stderr is a TTY, or a Jupyter kernel) with tqdm installed, :class:`Progress` draws a
bar with its ETA. Off a terminal (a file, a pipe, CI), or without tqdm, it draws nothing: it logs one
line per :meth:`Progress.milestone` (e.g. an epoch) and, with ``log_every``, one each time that share
of the total is done (e.g. every 10% of a long analysis), each line with the time elapsed and an ETA.
The lines go to the ``tempbalance.progress`` logger at INFO (the ``tempbalance`` CLI shows INFO on
stderr; ``logging.getLogger("tempbalance.progress").setLevel(logging.WARNING)`` silences them).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Mapping

from .errors import ConfigError

__all__ = ["Progress", "format_duration"]

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """A short duration: ``"0.4s"``, ``"12s"``, ``"3m05s"``, ``"2h03m"`` (``seconds`` >= 0)."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (where tqdm draws a widget although stderr is no TTY)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _tqdm_class() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        log.debug("tqdm is not installed: progress goes to the log")
        return None
    return tqdm


class Progress:
    """Progress over ``total`` units (batches, layers); a no-op when ``enabled`` is false.

    Use as a context manager (or call :meth:`close`)::

        with Progress(len(refs), "analyzing layers", "layer", log_every=0.1) as progress:
            for ref in refs:
                ...
                progress.update(1)

    Args:
        total: the number of units the work has (>= 0).
        desc: what is done, the bar's label and the start of every log line.
        unit: the unit's name on the bar (``"batch"``, ``"layer"``).
        enabled: False: no bar and no lines (``progress=False``, ``--no-progress``).
        log_every: off a terminal, log a line each time this share of ``total`` is done
            (0 < share <= 1, e.g. 0.1); default None: lines at milestones only.
        delay: off a terminal, no ``log_every`` line before this many seconds have passed, so that
            short work logs nothing (default 0).
        leave: keep the finished bar on the terminal (default True).
        interactive: draw a bar (True) or log lines (False); default None: a bar when stderr is a
            terminal or a Jupyter kernel runs, and tqdm is installed.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        *,
        enabled: bool = True,
        log_every: float | None = None,
        delay: float = 0.0,
        leave: bool = True,
        interactive: bool | None = None,
    ) -> None:
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ConfigError(f"total={total!r} must be a whole number >= 0")
        if log_every is not None and not (isinstance(log_every, (int, float)) and 0 < log_every <= 1):
            raise ConfigError(f"log_every={log_every!r} must be a share of the total in (0, 1], or None")
        if not (isinstance(delay, (int, float)) and delay >= 0):
            raise ConfigError(f"delay={delay!r} must be a number of seconds >= 0")
        self.total = total
        self.desc = desc
        self.count = 0
        self._skipped = 0
        self._log_every = log_every
        self._delay = delay
        self._next_share = 1
        self._started = time.monotonic()
        self._bar: Any = None
        self._logging = False
        if not enabled:
            return
        if interactive is None:
            interactive = _is_terminal(sys.stderr) or _in_notebook()
        tqdm = _tqdm_class() if interactive else None
        if tqdm is None:
            self._logging = True
        else:
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=leave, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._logging and self._log_every is not None and self.total:
            if self.count >= self._share_count(self._next_share) and self._elapsed() >= self._delay:
                self._pass_shares()
                log.info("%s: %s", self.desc, self._status(f"{self.count}/{self.total} ({self._percent()}%)"))

    def skip(self, n: int) -> None:
        """``n`` units that were done before (e.g. by an interrupted run): counted, but not in the
        rate the ETA is estimated from, and no line for the shares they pass."""
        self.count += n
        self._skipped += n
        if self._bar is not None:  # moved without an update, so tqdm's rate does not see them
            self._bar.n += n
            self._bar.initial += n
            self._bar.refresh()
        elif self._logging and self._log_every is not None and self.total:
            self._pass_shares()

    def milestone(self, fields: Mapping[str, str]) -> None:
        """A milestone (e.g. an epoch), ``fields`` its values (``{"epoch": "3/10", "loss": "0.412"}``):
        shown beside the bar, or logged as one line with the time elapsed and the ETA."""
        if self._bar is not None:
            self._bar.set_postfix(dict(fields))
        elif self._logging:
            log.info("%s: %s", self.desc, self._status(", ".join(f"{k} {v}" for k, v in fields.items())))

    def close(self) -> None:
        """Finish the bar (it stays on the terminal with ``leave``); a no-op when logging lines."""
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _share_count(self, k: int) -> int:
        return math.ceil(k * self._log_every * self.total - 1e-9)

    def _pass_shares(self) -> None:
        while self._next_share * self._log_every < 1 + 1e-9 and self.count >= self._share_count(self._next_share):
            self._next_share += 1

    def _percent(self) -> int:
        return int(100 * self.count / self.total) if self.total else 100

    def _elapsed(self) -> float:
        return time.monotonic() - self._started

    def _status(self, head: str) -> str:
        elapsed = self._elapsed()
        text = f"{head}, {format_duration(elapsed)} elapsed"
        left = self.total - self.count
        done = self.count - self._skipped
        if left > 0 and done > 0:
            text += f", ETA {format_duration(elapsed * left / done)}"
        return text
