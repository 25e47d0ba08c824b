"""Faults for the tests of writes: a disk that fills up."""

from __future__ import annotations

import errno
import os


class FullDisk:
    """A file object whose writes fail like a full disk (ENOSPC) once ``room`` bytes are written."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.close()


def fill_disk_after(monkeypatch, room: int) -> None:
    """Make every file opened through ``os.fdopen`` (what the atomic writer uses) fail after ``room`` bytes."""
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FullDisk(real(fd, *a, **k), room))
