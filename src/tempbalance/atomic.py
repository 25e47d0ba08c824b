"""One way to write a file: a temporary file unique to the process in the same directory, fsync,
rename over the target. A crash leaves the old file or the new one, never a mix; a failed write
removes its temporary and says which file failed and why ("no space left on device").
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Union

from .errors import TempBalanceError

__all__ = ["WriteError", "write_atomic", "write_json", "json_safe", "atomic_path", "temporaries", "remove_temporaries"]

Content = Union[bytes, str, Callable[[IO[bytes]], Any]]
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class WriteError(TempBalanceError, OSError):
    """A file could not be written. ``path`` is the file, ``errno`` the cause's error number.

    The message names the file and, for a full disk or quota, says "no space left".
    """

    exit_status = 1

    def __init__(self, path: str | os.PathLike, cause: BaseException) -> None:
        number = getattr(cause, "errno", None)
        super().__init__(number, getattr(cause, "strerror", None) or str(cause))
        self.path = os.fspath(path)
        if number in _FULL:
            what = "no space left on device" if number == errno.ENOSPC else "no space left (disk quota exceeded)"
            self.message = f"cannot write {self.path}: {what}; free some space or write to another disk"
        else:
            self.message = f"cannot write {self.path}: {self.strerror}"

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # picklable (DDP ranks broadcast errors)
        return (_rebuild, (self.path, self.errno, self.strerror))

    @property
    def disk_full(self) -> bool:
        """True when the disk (or the quota) is full."""
        return self.errno in _FULL


def _rebuild(path: str, number: int | None, text: str | None) -> WriteError:
    return WriteError(path, OSError(number, text))


def _temporary_name(path: Path) -> Path:
    """``.NAME.PID-RANDOM.tmpSUFFIX`` next to ``path``: unique per process and call; the suffix
    (e.g. ``.png``) is kept so that writers that choose a format by extension still do."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")


def temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files that writes of ``path`` left behind (e.g. after a SIGKILL), sorted."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.stem}.[0-9]*-*.tmp{path.suffix}"))


def remove_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete :func:`temporaries` of ``path`` (call only while no other process writes it); return them."""
    removed = []
    for leftover in temporaries(path):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
            removed.append(leftover)
    return removed


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, or one in its cause/context chain (torch.save reports a
    failed write as a RuntimeError whose context is the OSError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse to fsync a directory
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create(path: Path) -> tuple[int, Path]:
    """Open a new temporary file for ``path`` (mode 0o666 minus the umask, like ``open``)."""
    for _ in range(100):
        tmp = _temporary_name(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {path}")


def _fail(path: Path, tmp: Path | None, exc: BaseException) -> None:
    """Remove the temporary; raise :class:`WriteError` when an OSError caused ``exc``."""
    if tmp is not None:
        with contextlib.suppress(OSError):
            tmp.unlink()
    cause = _os_error(exc)
    if cause is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
        raise WriteError(path, cause) from exc


def write_atomic(
    path: str | os.PathLike,
    content: Content,
    *,
    encoding: str = "utf-8",
    before_replace: Callable[[], Any] | None = None,
) -> Path:
    """Replace ``path`` with ``content`` atomically; return ``path``.

    Args:
        path: the file to write (its directory is created if needed).
        content: ``bytes``, ``str`` (written with ``encoding``, newlines as given) or a function
            ``write(handle)`` that writes to a binary file handle (e.g. ``lambda f: torch.save(obj, f)``).
        encoding: of a ``str`` content.
        before_replace: called once the data are on disk, just before the rename (e.g. to keep the
            current file under another name); its OSError fails the write like any other.

    The data go to a temporary file unique to this process and call, are flushed and fsynced,
    and the temporary is renamed over ``path`` (then the directory is fsynced). On any failure the
    temporary is removed and ``path`` is left as it was.

    Raises:
        WriteError: the write failed for an OS reason (full disk, permissions, ...); names ``path``.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create(path)
        with os.fdopen(fd, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode(encoding) if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as exc:
        _fail(path, tmp, exc)
        raise
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """For writers that want a file name (``savefig``, ``np.savez``): yields a temporary path with
    ``path``'s extension; when the block ends it is fsynced and renamed over ``path``. On failure
    the temporary is removed (:class:`WriteError` for OS reasons, naming ``path``)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create(path)
        os.close(fd)
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        _fail(path, tmp, exc)
        raise
    _fsync_dir(path.parent)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (also inside dicts, lists and tuples) replaced by None,
    tuples by lists: what strict JSON can hold (``NaN`` and ``Infinity`` are not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2) -> Path:
    """Write ``value`` as strict JSON (non-finite numbers as ``null``, see :func:`json_safe`) with a
    final newline, atomically (:func:`write_atomic`)."""
    return write_atomic(path, json.dumps(json_safe(value), indent=indent, allow_nan=False) + "\n")
