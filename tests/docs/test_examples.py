"""Every ``examples/*.py`` runs with plain ``python`` as a user first runs it (offline, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
QUICK = {"ddp_train.py": ["--epochs", "2"]}  # shorter than the default, same code path


def test_every_example_is_listed():
    assert {p.name for p in EXAMPLES} >= {"ddp_train.py", "lightning_example.py", "hf_trainer_example.py",
                                         "accelerate_example.py"}


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_with_plain_python(example, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    result = subprocess.run([sys.executable, str(example), *QUICK.get(example.name, [])], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_the_ddp_example_says_how_to_run_it_under_torchrun(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "ddp_train.py"), "--epochs", "1",
                             "--samples", "256"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torchrun --nproc-per-node N examples/ddp_train.py" in result.stdout
    assert "1 ranks: identical rates True" in result.stdout
