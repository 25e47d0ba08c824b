"""Paths of the repository the tests read: the source tree, the package, the paper's sweep files."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
PACKAGE = SRC / "tempbalance"
PAPER = REPO / "configs" / "paper"
