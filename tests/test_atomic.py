"""Tests of the one atomic writer (tempbalance.atomic): a failed write names the file, says "no space
left" for a full disk, removes its temporary and leaves the old file; temporaries are unique per
process; a writer that wants a path keeps the file's extension."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tempbalance.atomic import WriteError, atomic_path, remove_temporaries, temporaries, write_atomic
from tempbalance.errors import TempBalanceError
from tests.helpers.faults import fill_disk_after


def test_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.json"
    write_atomic(target, '{"x": 1}\n')
    write_atomic(target, b'{"x": 2}\n')
    write_atomic(target, lambda handle: handle.write(b'{"x": 3}\n'))
    assert target.read_text() == '{"x": 3}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # like open(), not mkstemp's 0o600


@pytest.mark.parametrize("kind", ["text", "torch.save"])
def test_full_disk_names_the_file_removes_the_temporary_and_keeps_the_old_file(tmp_path, monkeypatch, kind):
    target = tmp_path / ("metrics.jsonl" if kind == "text" else "checkpoint.pt")
    write_atomic(target, b"old\n")
    fill_disk_after(monkeypatch, room=100)
    content = "x" * 10_000 if kind == "text" else (lambda handle: torch.save({"w": torch.zeros(10_000)}, handle))
    with pytest.raises(WriteError) as caught:
        write_atomic(target, content)
    error = caught.value
    assert str(target) in str(error) and "no space left" in str(error)
    assert error.errno == errno.ENOSPC and error.disk_full and error.path == str(target)
    assert isinstance(error, OSError) and isinstance(error, TempBalanceError)  # callers of either kind catch it
    assert target.read_bytes() == b"old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary left to fill the disk


def test_other_os_errors_name_the_file_and_the_cause(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(WriteError, match=r"cannot write .*file/x\.txt: ") as caught:
        write_atomic(blocker / "x.txt", "y")  # its directory is a file
    assert not caught.value.disk_full
    restored = pickle.loads(pickle.dumps(caught.value))  # DDP ranks share errors pickled
    assert str(restored) == str(caught.value) and restored.errno == caught.value.errno


def test_an_interrupted_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "config.json"
    write_atomic(target, "{}\n")

    def killed(handle):
        handle.write(b'{"half": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, killed)
    assert target.read_text() == "{}\n" and temporaries(target) == []


def test_atomic_path_keeps_the_extension_and_cleans_up(tmp_path):
    target = tmp_path / "plot.png"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"png")
    assert target.read_bytes() == b"png" and temporaries(target) == []
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the plot failed")
    assert target.read_bytes() == b"png" and temporaries(target) == []


def test_temporaries_are_unique_per_process_and_found_after_a_kill(tmp_path):
    """Two processes writing the same file at once never share a temporary; the temporaries a
    killed writer leaves are found (and only they) and can be removed."""
    target = tmp_path / "metrics.jsonl"
    code = (
        "import sys; from tempbalance.atomic import write_atomic\n"
        "for i in range(50): write_atomic(sys.argv[1], f'{sys.argv[2]} {i}\\n' * 100)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target), name], env=env, stderr=subprocess.PIPE,
                              text=True) for name in ("a", "b")]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors
    lines = target.read_text().splitlines()
    assert len(lines) == 100 and len(set(lines)) == 1  # one writer's complete file, never a mix
    leftover = tmp_path / f".metrics.{os.getpid()}-0badf00d.tmp.jsonl"  # as a SIGKILL leaves it
    leftover.write_text("partial")
    other = tmp_path / f".metrics.csv.{os.getpid()}-0badf00d.tmp"  # another file's name pattern: not ours
    other.write_text("")
    assert temporaries(target) == [leftover]
    assert remove_temporaries(target) == [leftover] and not leftover.exists() and other.exists()
