"""Every code block of the README and the docs runs as written.

- ``python`` blocks: the blocks of one page run in order, in one fresh interpreter (a subprocess
  in a scratch directory, so files they write land there), as a reader pasting them would.
- ``bash`` / ``sh`` blocks: every ``tempbalance ...`` command (also after ``torchrun ... -m
  tempbalance.cli``) must parse with the real command-line parser; ``make T`` must name a
  Makefile target; ``python FILE`` / ``torchrun ... FILE`` must name an existing file.
- ``toml`` blocks: a sweep file that :func:`tempbalance.train.sweep.expand_sweep` accepts.

A block that cannot run here (a GPU, several machines, the Hugging Face Hub) is marked by the
line ``<!-- not run: REASON -->`` right before it; it is still compiled (Python) or parsed (shell).
What a page's snippets take as given (``model``, a small checkpoint file) is made by the code in
its ``<!-- test-setup ... -->`` comments (invisible on the rendered page), run first.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
SETUP = re.compile(r"<!--\s*test-setup\n(.*?)-->", re.S)


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    not_run: str | None


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page (language, first line number, text)."""
    out: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = NOT_RUN.search(previous)
        end = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
        out.append(Block(page, i + 1, match.group(1), "\n".join(lines[i + 1 : end]) + "\n", marker and marker.group(1)))
        i = end + 1
    return out


ALL = [b for page in PAGES for b in blocks(page)]


def _id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_pages_have_code_blocks() -> None:
    assert len(ALL) > 20, "the snippet collector found almost no code blocks"
    assert not [b for b in ALL if b.lang == ""], "every code block names its language (python, bash, toml, text)"


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(b.lang == "python" for b in blocks(p))], ids=_id)
def test_python_blocks_run(page: Path, tmp_path: Path) -> None:
    runnable = [b for b in blocks(page) if b.lang == "python"]
    for block in runnable:
        compile(block.code, f"{_id(page)}:{block.line}", "exec")
    setup = "\n".join(SETUP.findall(page.read_text()))
    script = f"# --- {_id(page)}: test-setup\n{setup}\n" + "\n".join(
        f"# --- {_id(page)}:{b.line}\n{b.code}" for b in runnable if b.not_run is None
    )
    if not script:
        pytest.skip("only blocks marked not run")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), MPLBACKEND="Agg", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{_id(page)}: the Python blocks fail:\n{result.stderr[-4000:]}"


def _commands(code: str) -> list[str]:
    """Logical shell command lines: continuations joined, comments and blank lines dropped."""
    joined = code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            out.append(line)
    return out


def _tempbalance_args(words: list[str]) -> list[str] | None:
    if words[0] == "tempbalance":
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1] == "tempbalance.cli":
        return words[words.index("-m") + 2 :]
    return None


def _check_command(line: str, where: str) -> None:
    from tempbalance.cli import build_parser

    words = shlex.split(line)
    for op in ("|", "&&", ";"):
        if op in words:
            words = words[: words.index(op)]
    args = _tempbalance_args(words)
    if args is not None:
        args = [a if a != "..." else "--help" for a in args]
        if "--help" in args:
            return
        try:
            build_parser().parse_args(args)
        except SystemExit as exc:
            raise AssertionError(f"{where}: `{line}` does not parse") from exc
        return
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert all(t in targets for t in words[1:] if "=" not in t), f"{where}: `{line}` names no Makefile target"
        return
    files = [w for w in words if w.endswith((".py", ".sh")) and "/" in w]
    for name in files:
        assert (ROOT / name).is_file(), f"{where}: `{line}` names a missing file {name}"


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.lang in ("bash", "sh") for b in blocks(p))], ids=_id)
def test_shell_commands_parse(page: Path) -> None:
    for block in blocks(page):
        if block.lang in ("bash", "sh"):
            for line in _commands(block.code):
                _check_command(line, f"{_id(page)}:{block.line}")


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.lang == "toml" for b in blocks(p))], ids=_id)
def test_toml_blocks_are_valid_sweeps(page: Path) -> None:
    from tempbalance.train.sweep import expand_sweep

    for block in blocks(page):
        if block.lang == "toml":
            spec = tomllib.loads(block.code)
            spec.setdefault("name", "snippet")
            assert expand_sweep(spec), f"{_id(page)}:{block.line}: the sweep has no runs"


TEST_REFERENCE = re.compile(r"((?:[\w-]+/)*test_\w+\.py)::(\w+)")


def _defined_tests(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


@pytest.mark.parametrize("page", [ROOT / "BENCHMARKS.md", *PAGES], ids=_id)
def test_every_test_a_page_names_exists(page: Path) -> None:
    """The guarantees name the tests that enforce them: a rename must not leave a dangling name."""
    tests = ROOT / "tests"
    for file, name in TEST_REFERENCE.findall(page.read_text()):
        candidates = [p for p in tests.rglob(Path(file).name) if p.as_posix().endswith(file)]
        assert candidates, f"{_id(page)} names {file}::{name}, but there is no tests/**/{file}"
        assert any(name in _defined_tests(p) for p in candidates), f"{_id(page)} names {file}::{name}: no such test"
