"""Launch a test file as N gloo worker processes on this machine (the 2-process tests run their own
file with ``--worker``; the repository root is put on the workers' path so that they import these
helpers as the parent does)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.paths import REPO


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: str, outdir: Path, world: int, timeout_s: float, extra_args: list[str] | None = None,
                extra_env: dict[str, str] | None = None) -> list[dict]:
    """Run ``script --worker OUTDIR *extra_args`` as ``world`` ranks (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR set; one thread each); fail the test on a non-zero exit or a hang; return each
    rank's ``OUTDIR/rank{r}.pt``."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", PYTHONPATH=path, **(extra_env or {}))
        procs.append(subprocess.Popen(
            [sys.executable, script, "--worker", str(outdir), *(extra_args or [])],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"the workers did not finish in {timeout_s} s (a rank hung in a collective?)")
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{out[-6000:]}"
    return [torch.load(outdir / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
