"""A per-run lock, so that one process at a time trains a run directory (several sweeps on the same
files, a resubmitted job): an OS file lock (``flock``) on ``.tempbalance.lock`` in the directory.

The OS releases the lock when its holder exits in any way (SIGKILL included). The lock *file* may
then stay behind with the dead holder's pid in it: that is a stale lock file, detected (the lock
itself is free) and taken over with a log line. Linux's NFS client supports ``flock``; on a file
system without locks a run proceeds unlocked, with a warning.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from pathlib import Path

from ..errors import TempBalanceError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; runs are not locked there
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError", "lock_holder"]

log = logging.getLogger(__name__)

LOCK_NAME = ".tempbalance.lock"
PROBE_RETRIES, PROBE_PAUSE_S = 3, 0.05


class RunLockedError(TempBalanceError):
    """Another process holds the run directory's lock; ``holder`` describes it."""

    exit_status = 1

    def __init__(self, directory: Path, holder: str) -> None:
        super().__init__(f"{directory} is being trained by another process ({holder}); leave it to that process")
        self.directory = directory
        self.holder = holder

    def __reduce__(self):
        return (RunLockedError, (self.directory, self.holder))


def _describe(text: str) -> str:
    return text.strip() or "holder unknown"


def _identity() -> str:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()} since {started}"


class RunLock:
    """The lock of one run directory; use as a context manager or :meth:`acquire` / :meth:`release`.

    Args:
        directory: the run directory (created if missing).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock without waiting.

        Raises:
            RunLockedError: another live process holds it (the message says which, as far as its
                lock file tells).
        """
        if self._fd is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            return self
        attempts = 0
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(os.pread(fd, 4096, 0).decode(errors="replace"))
                os.close(fd)
                attempts += 1
                if attempts >= PROBE_RETRIES:
                    raise RunLockedError(self.directory, holder) from None
                time.sleep(PROBE_PAUSE_S)  # maybe only a brief look by lock_holder(): try again
                continue
            except OSError as exc:  # a file system without locks (some network mounts)
                os.close(fd)
                log.warning("%s: file locks are not supported here (%s); other processes are not kept from "
                            "training this run at the same time", self.directory, exc)
                return self
            except BaseException:
                os.close(fd)
                raise
            # A holder that released the lock deletes the file first: if our file is no longer the
            # one at the path, we locked a deleted file and try again on the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            log.info("%s: taking over a stale lock file (%s, which no longer runs)", self.directory, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_identity() + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up and delete the lock file (no-op when not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def lock_holder(directory: str | os.PathLike) -> str | None:
    """Who holds the lock of ``directory`` now (as its lock file tells), or None when nobody does."""
    path = Path(directory) / LOCK_NAME
    if fcntl is None or not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(os.pread(fd, 4096, 0).decode(errors="replace"))
        except OSError:  # no locks on this file system
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
