"""benchmarks/gpu.sh as the device tool will run it, dry on the CPU: what comes back in $OUT fits the
tool's limits (at most 8 files, here at most 6, 16 MiB each, none empty, none in a sub-folder, plain
names), every step has a row with a number or an explicit reason, and nothing aborts the script:
not a short budget, a broken tar or a Python that cannot run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.paths import REPO

SCRIPT = REPO / "benchmarks" / "gpu.sh"
SECTIONS = ["1. Device self-check", "2. Analysis speed", "3. One rebalance vs one epoch",
            "4. Checkpoint analysis on the GPU", "5. Data and training throughput", "6. CAL vs TB"]
STEPS = ["1 device self-check", "2 analysis speed", "3 rebalance vs epoch", "4 checkpoint analysis",
         "4b Llama-2-7B shapes on the device", "5a data",
         "5b throughput cal", "5c throughput tb", "5d throughput tb torch.compile", "6 CAL vs TB"]
REASON = re.compile(r"\*\*(skipped|failed|timed out)[^*]*\*\*")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="a bash script")


def _tiny_tar(tmp_path: Path, train: int = 16, test: int = 10) -> Path:
    """An image-folder CIFAR-10 subset like `gpu.sh make-tar` builds, of random 32x32 PNGs."""
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    src = tmp_path / "cifar10"
    for split, n in (("train", train), ("test", test)):
        for c in range(10):
            folder = src / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    tar = tmp_path / "tiny.tar"
    subprocess.run(["bash", str(SCRIPT), "make-tar", str(tar), str(train), str(test), str(src)], check=True,
                   env=dict(os.environ, PYTHON=sys.executable), capture_output=True, timeout=120)
    return tar


def _run(tmp_path: Path, timeout: float, **env: str) -> tuple[subprocess.CompletedProcess, Path, float]:
    out = tmp_path / "out"
    work = tmp_path / "tmp"
    work.mkdir(exist_ok=True)
    environ = dict(os.environ, GPU_SH_DRY="1", OUT=str(out), TMPDIR=str(work), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    environ.update(env)
    started = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], env=environ, capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(work.glob("gpu_sh.*")), "the work folder must be deleted at exit"
    return proc, out, elapsed


def _assert_out_fits_the_device_tool(out: Path) -> dict[str, Path]:
    entries = list(out.iterdir())
    assert 1 <= len(entries) <= 6, [e.name for e in entries]
    for entry in entries:
        assert entry.is_file() and not entry.is_symlink(), f"{entry.name}: only plain files at the top level"
        assert re.fullmatch(r"[A-Za-z0-9._-]+", entry.name), entry.name
        size = entry.stat().st_size
        assert 0 < size <= 16 * 2**20, f"{entry.name}: {size} bytes"
    return {e.name: e for e in entries}


def _sections(markdown: str) -> dict[str, str]:
    parts = re.split(r"^## ", markdown, flags=re.M)
    return {part.splitlines()[0].strip(): part for part in parts[1:]}


def _data_rows(section: str) -> list[list[str]]:
    """The table rows of a section, without header lines (those followed by a |---| line)."""
    lines = section.splitlines()
    rows = []
    for i, line in enumerate(lines):
        header = i + 1 < len(lines) and lines[i + 1].startswith("|---")
        if line.startswith("| ") and not header:
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _summary(sections: dict[str, str]) -> dict[str, str]:
    return {row[0]: row[1] for row in _data_rows(sections["Summary"])}


def _assert_every_step_has_a_row(sections: dict[str, str]) -> None:
    for title in SECTIONS:
        body = sections[title]
        measured = any(re.search(r"\d", " ".join(row[1:])) for row in _data_rows(body))
        assert measured or REASON.search(body), f"section {title!r} has neither a number nor a reason:\n{body}"
    summary = _summary(sections)
    assert list(summary) == STEPS


@pytest.mark.slow
def test_dry_run_with_a_tiny_tar(tmp_path):
    tar = _tiny_tar(tmp_path)
    proc, out, elapsed = _run(tmp_path, timeout=480, CIFAR_TAR=str(tar))
    files = _assert_out_fits_the_device_tool(out)
    assert set(files) == {"gpu_results.md", "gpu_log.txt", "gpu_runs.tar.gz"}
    markdown = files["gpu_results.md"].read_text()
    sections = _sections(markdown)
    _assert_every_step_has_a_row(sections)
    assert all(status == "ok" or status.endswith("runs") for status in _summary(sections).values()), markdown
    total = int(re.search(r"Total (\d+) s of a (\d+) s budget", markdown).group(1))
    assert total <= 480 - 60 and elapsed < 480
    assert "tempbalance from " + str(REPO / "src" / "tempbalance") in markdown  # this checkout's code, not an install
    # self-check: every check ran and passed on gloo
    checks = _data_rows(sections["1. Device self-check"])
    assert len(checks) == 5 and all(row[1].startswith("ok") for row in checks), checks
    # the analysis: three models; alphas unchanged by the lowered float32 matmul precision
    analysis = _data_rows(sections["2. Analysis speed"])
    assert [row[0].split()[0] for row in analysis] == ["resnet18", "vgg16", "wrn28-6"]
    assert all(row[-1] == "0.0e+00" for row in analysis), analysis
    # the checkpoint step: the GPT-2 directory analysed (exit status 0), then the Llama-2-7B shapes
    # (widths / 16 here): 1 block and 32, every layer of each (9 and 226), both finished, and the verdict
    gpt2, *llama = _data_rows(sections["4. Checkpoint analysis on the GPU"])
    assert gpt2[:2] == ["cpu", "0"], gpt2
    assert [row[:2] for row in llama] == [["1", "9"], ["32", "226"]] and all(row[3] == "yes" for row in llama), llama
    assert re.search(r"Per block \(T\(32\) - T\(1\)\) / 31 = [\d.]+ s; 32 blocks [\d.]+ s: the 30 s goal is \*\*(met|missed)\*\*",
                     sections["4. Checkpoint analysis on the GPU"])
    # throughput: the three runs, every batch full, two graphs under torch.compile
    rows = _data_rows(sections["5. Data and training throughput"])
    data_row, runs = rows[0], rows[1:]
    assert data_row[1:3] == ["160", "100"] and data_row[4] == "yes"
    assert [row[0] for row in runs] == ["cal", "tb", "tb (torch.compile)"]
    assert runs[2][-1].startswith("2 graphs")
    for row in runs:
        assert float(row[5]) > 0 and float(row[7]) > 0  # images/s, fixed overhead
    # CAL vs TB: the plan line and both runs finished
    compare = sections["6. CAL vs TB"]
    assert re.search(r"Epoch estimate: [12] epochs", compare)
    assert [r[:3] for r in _data_rows(compare)[:2]] == [["cal seed 0", "finished", "2"], ["tb seed 0", "finished", "2"]]
    # the archive: the small per-run files, no checkpoint, no data
    with tarfile.open(files["gpu_runs.tar.gz"]) as archive:
        names = archive.getnames()
    for run in ("thr_cal", "thr_tb", "thr_tb_compiled", "cmp_cal_seed0", "cmp_tb_seed0"):
        assert f"runs/{run}/metrics.jsonl" in names and f"json/{run}.json" in names
    assert not [n for n in names if n.endswith((".pt", ".npz", ".png", ".safetensors"))]
    assert "logs/step_0.err" in names
    print(f"dry run: {elapsed:.0f} s wall, script total {total} s")


def test_no_time_left_skips_every_step_with_a_reason(tmp_path):
    broken = tmp_path / "broken.tar"
    broken.write_bytes(os.urandom(4096))  # not a tar: falls back to synthetic data
    proc, out, _ = _run(tmp_path, timeout=120, CIFAR_TAR=str(broken), GPU_SH_BUDGET="61", GPU_SH_MARGIN="60")
    files = _assert_out_fits_the_device_tool(out)
    markdown = files["gpu_results.md"].read_text()
    sections = _sections(markdown)
    _assert_every_step_has_a_row(sections)
    assert all(status.startswith("skipped") for status in _summary(sections).values()), markdown
    assert "data: synthetic" in markdown
    assert "could not unpack" in files["gpu_log.txt"].read_text()


def test_a_python_that_cannot_run_gives_failure_rows(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'fake python: cannot import torch' >&2\nexit 1\n")
    fake.chmod(0o755)
    proc, out, _ = _run(tmp_path, timeout=120, CIFAR_TAR=str(tmp_path / "missing.tar"), PYTHON=str(fake))
    files = _assert_out_fits_the_device_tool(out)
    sections = _sections(files["gpu_results.md"].read_text())
    _assert_every_step_has_a_row(sections)
    summary = _summary(sections)
    assert all(summary[step].startswith("failed (rc 1): fake python") for step in STEPS[:-1]), summary
    assert summary["6 CAL vs TB"].startswith("skipped")
    assert "fake python: cannot import torch" in files["gpu_log.txt"].read_text()


def test_make_tar_refuses_a_folder_with_too_few_images(tmp_path):
    (tmp_path / "src" / "train" / "a").mkdir(parents=True)
    (tmp_path / "src" / "test" / "a").mkdir(parents=True)
    proc = subprocess.run(["bash", str(SCRIPT), "make-tar", str(tmp_path / "x.tar"), "3", "1", str(tmp_path / "src")],
                          env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "fewer than 3" in proc.stderr


def _bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_bench
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return gpu_bench


@pytest.mark.parametrize("avail", [0, 40, 150, 400, 5000])
def test_comparison_plan_fits_with_its_margins(tmp_path, capsys, avail):
    """The planned epochs fit the time left even if each of the 4 runs is twice as slow as alone (and 20%
    slower again), the fixed overhead 50% larger, plus 15 s; one more epoch would not fit; at most 40."""
    bench = _bench()
    runs = []
    for name, fixed, per_epoch in (("cal", 9.0, 2.0), ("tb", 11.0, 3.0)):
        path = tmp_path / f"{name}.json"
        path.write_text(f'{{"fixed_s": {fixed}, "per_epoch_s": {per_epoch}}}')
        runs.append(str(path))
    bench.main(["--md", str(tmp_path / "plan.md"), "plan", *runs, "--avail", str(avail), "--parallel", "4"])
    epochs = int(capsys.readouterr().out.strip().splitlines()[-1])

    def needs(e: int) -> float:
        return 1.5 * 11.0 + 15 + e * 2 * 3.0 * 1.2

    assert 0 <= epochs <= 40
    if epochs:
        assert needs(epochs) <= avail
    assert epochs == 40 or needs(epochs + 1) > avail
    assert f"Epoch estimate: {epochs} epochs" in (tmp_path / "plan.md").read_text()


def test_comparison_plan_without_measurements_is_zero(tmp_path, capsys):
    _bench().main(["plan", str(tmp_path / "missing.json"), "--avail", "300"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == "0"
