"""A gate on the background worker of ``TempBalance(asynchronous=True)``: every timing forced, not raced."""

from __future__ import annotations

import threading

import tempbalance.background as background


class Gate:
    """Wraps the worker's analyze_layers: each call waits for ``release`` and sets ``finished``."""

    def __init__(self, monkeypatch):
        self.release = threading.Event()
        self.finished = threading.Event()
        self.calls = 0
        inner = background.analyze_layers

        def gated(refs, options):
            self.calls += 1
            assert self.release.wait(30), "test gate never released"
            try:
                return inner(refs, options)
            finally:
                self.finished.set()

        monkeypatch.setattr(background, "analyze_layers", gated)

    def open_and_wait(self):
        self.release.set()
        assert self.finished.wait(30)
