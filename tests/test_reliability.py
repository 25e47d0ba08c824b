"""End-to-end proofs of the reliability guarantees (issue #8): bad input, numerics, interruption.

Everything goes through the public surfaces: the ``tempbalance`` CLI (in process and as a
subprocess), ``tempbalance.analyze``, ``TempBalance`` in a real training loop and ``run_training``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tempbalance
from tempbalance.cli import main as cli_main
from tempbalance.errors import ConfigError
from tempbalance.train import TrainConfig, run_training
from tempbalance.atomic import temporaries
from tempbalance.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

# A TempBalance run of ~0.4 s per epoch on one thread: mnist1d (10%), cnn1d at half width
# (3 balanced convs), 12 epochs, batch 32 (13 batches per epoch).
TINY = dict(
    dataset="mnist1d", model="cnn1d", method="tb", epochs=12, lr=0.1, batch_size=32, width=0.5,
    train_fraction=0.1, seed=5, device="cpu", num_threads=1,
)
TINY_ARGS = [
    "--dataset", "mnist1d", "--model", "cnn1d", "--method", "tb", "--epochs", "12", "--lr", "0.1",
    "--batch-size", "32", "--width", "0.5", "--train-fraction", "0.1", "--seed", "5", "--device", "cpu",
    "--threads", "1", "--no-progress",
]


def call_cli(argv: list[str], capsys, caplog=None) -> tuple[int, list[str], str]:
    """Run the CLI in process: (exit status, stderr lines, stdout). argparse's exit counts too.

    With ``caplog``, log records of level INFO and above count as stderr lines: in a real process
    the CLI's ``logging.basicConfig(level=INFO)`` prints each of them there (under pytest they go
    to the log capture instead).
    """
    capsys.readouterr()
    if caplog is not None:
        caplog.set_level(logging.INFO)
        caplog.clear()
    try:
        code = cli_main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors exit(2) after printing their one line
        code = exc.code
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    if caplog is not None:
        err = [record.getMessage() for record in caplog.records if record.levelno >= logging.INFO] + err
    return code, err, captured.out


def hill_median_reference(eigs: np.ndarray) -> float:
    """The published median Hill estimator re-derived from method.md §2.4 (float64, numpy)."""
    lam = np.sort(np.asarray(eigs, dtype=np.float64))
    i = lam.size // 2
    n = lam.size - i
    return 1.0 + n / (np.log(lam[i:]).sum() - n * np.log(lam[i]))


def svd_eigs(weight: torch.Tensor) -> np.ndarray:
    """lambda = sigma^2 of a 2-D weight, by a float64 numpy SVD."""
    w = weight.detach().to(torch.float64).cpu().numpy()
    return np.linalg.svd(w, compute_uv=False) ** 2


# =============================================================== 1. input validation


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    """Files the bad-input table refers to: a stopped run, damaged checkpoints, a wrong TinyImageNet."""
    root = tmp_path_factory.mktemp("bad")
    run = root / "run"
    run_training(TrainConfig(**dict(TINY, method="cal", epochs=2, stop_after=1, progress=False, out=str(run))))
    broken = root / "broken"
    broken.mkdir()
    shutil.copy(run / "config.json", broken / "config.json")
    (broken / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:200])  # truncated
    (broken / "checkpoint.prev.pt").write_bytes(b"\x00garbage")  # corrupted
    (root / "truncated.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:300])
    tiny = root / "tin" / "tiny-imagenet-200"
    (tiny / "train" / "n01443537" / "images").mkdir(parents=True)
    (tiny / "val" / "images").mkdir(parents=True)  # no val_annotations.txt, not arranged
    (root / "empty").mkdir()
    (root / "bad.toml").write_text('seeds = [1]\nmethods = ["cal"]\n[base]\ndataset = "mnist1d"\nlr = -2.0\n')
    (root / "unknown.toml").write_text('seeds = [1]\nmethods = ["adamw"]\n[base]\ndataset = "mnist1d"\n')
    return root


# (argv with {d} = the fixture's directory, a fragment the one error line must contain)
BAD_CLI = [
    (["train", "--dataset", "imagenet-22k"], "'imagenet-22k'"),
    (["train", "--dataset", "mnist1d", "--model", "resnet9000"], "'resnet9000'"),
    (["train", "--dataset", "mnist1d", "--method", "adamw"], "'adamw'"),
    (["train", "--dataset", "mnist1d", "--method", "tb", "--fit", "mle"], "'mle'"),
    (["train", "--dataset", "mnist1d", "--method", "tb", "--metric", "beta"], "'beta'"),
    (["train", "--dataset", "mnist1d", "--lr", "0"], "lr=0.0"),
    (["train", "--dataset", "mnist1d", "--lr", "-0.1"], "lr=-0.1"),
    (["train", "--dataset", "mnist1d", "--lr", "nan"], "lr=nan"),
    (["train", "--dataset", "mnist1d", "--s1", "1.4", "--s2", "0.6"], "s1=1.4 > s2=0.6"),
    (["train", "--dataset", "mnist1d", "--epochs", "0"], "epochs=0"),
    (["train", "--dataset", "mnist1d", "--batch-size", "-4"], "batch_size=-4"),
    (["train", "--dataset", "mnist1d", "--train-fraction", "1.5"], "train_fraction=1.5"),
    (["train", "--dataset", "mnist1d", "--stop-after", "0"], "stop_after=0"),
    (["train", "--dataset", "mnist1d", "--device", "tpu"], "'tpu'"),
    (["train", "--dataset", "mnist1d", "--amp", "fp8"], "'fp8'"),
    (["train", "--dataset", "mnist1d", "--resume"], "resume"),
    (["train", "--dataset", "mnist1d", "--epochs", "ten"], "'ten'"),  # argparse
    (["train", "--dataset", "mnist1d", "--learning-rate", "0.1"], "--learning-rate"),  # argparse
    (["frobnicate"], "'frobnicate'"),  # argparse
    (["train", "--dataset", "cifar10", "--data-dir", "{d}/no-such-dir"], "no-such-dir"),
    (["train", "--dataset", "tinyimagenet", "--data-dir", "{d}/empty"], "tiny-imagenet-200"),
    (["train", "--dataset", "tinyimagenet", "--data-dir", "{d}/tin"], "val/images/"),
    (["data", "tinyimagenet", "--data-dir", "{d}/tin"], "val_annotations.txt"),
    (["data", "prepare", "mnist2d"], "'mnist2d'"),
    (["train", *TINY_ARGS, "--model", "mlp", "--out", "{d}/run", "--resume"], "model: 'cnn1d' -> 'mlp'"),
    (["train", *TINY_ARGS, "--method", "cal", "--out", "{d}/run"], "--resume"),
    (["analyze", "{d}/run/checkpoint.pt", "--arch", "resnet18"], "does not fit --arch 'resnet18'"),
    (["analyze", "{d}/truncated.pt"], "truncated.pt"),
    (["analyze", "{d}/missing.pt"], "missing.pt"),
    (["analyze", "not-an-architecture"], "'not-an-architecture'"),
    (["analyze", "cnn-digits", "--xmin-pos", "0"], "xmin_pos=0.0"),
    (["analyze", "cnn-digits", "--fit", "mle"], "'mle'"),  # argparse choices
    (["report", "{d}/no-such-runs"], "no-such-runs"),
    (["report", "{d}/empty"], "empty"),
    (["sweep", "{d}/no-such.toml"], "no-such.toml"),
    (["sweep", "{d}/bad.toml", "--dry-run"], "lr=-2.0"),
    (["sweep", "{d}/unknown.toml", "--dry-run"], "'adamw'"),
    (["sweep", "{d}/bad.toml", "--set", "epochs"], "'epochs'"),
    (["demo", "--seeds", "0"], "seeds=0"),
    (["demo", "--lr", "-1"], "lr=-1.0"),
]


def _case_id(index: int, case) -> str:
    argv = case.values[0] if hasattr(case, "values") else case[0]
    return f"{index}-" + "-".join(a.replace("{d}/", "") for a in argv[:4] if not a.startswith("--dataset"))


@pytest.mark.parametrize("argv, fragment", BAD_CLI, ids=[_case_id(i, c) for i, c in enumerate(BAD_CLI)])
def test_bad_cli_input_is_one_line_exit_2(argv, fragment, bad_inputs, capsys, caplog, monkeypatch):
    monkeypatch.chdir(bad_inputs)
    code, err, _ = call_cli([a.replace("{d}", str(bad_inputs)) for a in argv], capsys, caplog)
    assert code == 2, err
    assert len(err) == 1, err
    assert "error" in err[0] and fragment in err[0], err
    assert "Traceback" not in err[0]


def test_resume_with_no_readable_checkpoint_is_one_line(bad_inputs, capsys, caplog):
    argv = ["train", *TINY_ARGS, "--method", "cal", "--out", bad_inputs / "broken", "--resume"]
    code, err, _ = call_cli(argv, capsys, caplog)
    assert code == 2
    assert len(err) == 1, err


def test_resume_with_no_readable_checkpoint_exits_2_naming_both_files(bad_inputs, capsys, caplog):
    argv = ["train", *TINY_ARGS, "--method", "cal", "--out", bad_inputs / "broken", "--resume"]
    code, err, _ = call_cli(argv, capsys, caplog)
    assert code == 2
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and "checkpoint.pt" in errors[0] and "checkpoint.prev.pt" in errors[0]
    assert not any("Traceback" in line for line in err)


def test_debug_shows_the_traceback_and_without_it_one_line(bad_inputs, capsys):
    """As real processes: exit status 2 and one line; with --debug the traceback."""
    with pytest.raises(ConfigError, match="imagenet-22k"):
        cli_main(["--debug", "train", "--dataset", "imagenet-22k"])
    base = [sys.executable, "-m", "tempbalance.cli"]
    argv = ["train", "--dataset", "mnist1d", "--lr", "-3"]
    pipes = dict(env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    plain = subprocess.Popen([*base, *argv], **pipes)
    debug = subprocess.Popen([*base, "--debug", *argv], **pipes)
    _, plain_err = plain.communicate(timeout=120)
    _, debug_err = debug.communicate(timeout=120)
    assert plain.returncode == 2
    assert plain_err.strip().splitlines() == ["tempbalance: error: lr=-3.0 must be a finite number > 0"]
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug_err and "ConfigError" in debug_err and "lr=-3.0" in debug_err


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"method": "cal", "assign": "nope"}, id="unknown-assign"),
        pytest.param({"method": "tb", "s1": 0.0}, id="s1-zero"),
        pytest.param({"seed": "seven"}, id="seed-not-int"),
    ],
)
def test_train_config_rejects_before_any_work(overrides):
    with pytest.raises(ConfigError):
        TrainConfig(**dict(TINY, **overrides)).validate()


def test_config_json_survives_a_crash_while_it_is_rewritten(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_training(TrainConfig(**dict(TINY, method="cal", epochs=2, stop_after=1, progress=False, out=str(out))))
    before = (out / "config.json").read_text()
    import tempbalance.train.checkpoint as checkpoint_module

    real_replace = os.replace

    def killed_before_rename(src, dst, *args, **kwargs):
        if str(dst).endswith("config.json"):
            Path(src).write_text(Path(src).read_text()[:10])  # a half-written temporary file
            raise KeyboardInterrupt("simulated kill during the write")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.os, "replace", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        run_training(TrainConfig(**dict(TINY, method="cal", epochs=2, progress=False, out=str(out), resume=True)))
    monkeypatch.setattr(checkpoint_module.os, "replace", real_replace)
    assert (out / "config.json").read_text() == before  # the old, complete file is still there
    json.loads((out / "config.json").read_text())


# =============================================================== 2. numerics


def _poisoned_linear(kind: str) -> nn.Linear:
    layer = nn.Linear(64, 100)
    with torch.no_grad():
        if kind == "nan":
            layer.weight[7, 3] = float("nan")
        elif kind == "inf":
            layer.weight[0, 0] = float("-inf")
        elif kind == "zero":
            layer.weight.zero_()
        elif kind == "rank1":
            layer.weight.copy_(torch.randn(100, 1) @ torch.randn(1, 64))
    return layer


@pytest.mark.parametrize("kind", ["nan", "inf", "zero", "rank1"])
def test_analyze_gives_nan_alpha_with_a_reason_and_leaves_other_layers_alone(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), _poisoned_linear(kind), nn.Linear(100, 80))
    records = {r.name: r for r in tempbalance.analyze(model)}
    bad = records["1"]
    assert math.isnan(bad.alpha) and isinstance(bad.reason, str) and bad.reason
    for name in ("0", "2"):
        good = records[name]
        assert good.reason is None
        assert good.alpha == pytest.approx(hill_median_reference(svd_eigs(model[int(name)].weight)), rel=1e-4)


def test_analyze_too_few_eigenvalues_and_depthwise_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 2, 1), nn.Conv2d(2, 32, 3), nn.Conv2d(32, 32, 3, groups=32))
    records = {r.name: r for r in tempbalance.analyze(model, precision="float64")}
    few = records["0"]  # 1x1 conv, 2 eigenvalues: no fit
    assert few.num_eigs == 2 and math.isnan(few.alpha) and "too few" in few.reason
    # depthwise: one 1x1 matrix per channel and kernel position, pooled (conv_norm 0.5)
    depthwise = records["2"]
    eigs = 0.5 * model[2].weight.detach().double().flatten().numpy() ** 2
    assert depthwise.num_eigs == eigs.size == 288
    assert depthwise.alpha == pytest.approx(hill_median_reference(eigs), rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_match_a_float64_reference(dtype):
    torch.manual_seed(1)
    layer = nn.Linear(96, 128).to(dtype)
    reference = hill_median_reference(svd_eigs(layer.weight))
    (record,) = tempbalance.analyze(layer)
    assert record.alpha == pytest.approx(reference, rel=1e-3)
    (record64,) = tempbalance.analyze(layer, precision="float64")
    assert record64.alpha == pytest.approx(reference, rel=1e-9)
    assert layer.weight.dtype == dtype  # the model is not changed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(4, 72),
    n=st.integers(4, 72),
    log_scale=st.floats(-4, 4),
    log_factor=st.floats(-3, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_alpha_finite_above_one_and_scale_invariant(m, n, log_scale, log_factor, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, n, generator=generator, dtype=torch.float64) * 10.0**log_scale
    layer = nn.Linear(n, m, bias=False).double()
    scaled = nn.Linear(n, m, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        scaled.weight.copy_(weight * 10.0**log_factor)
    (a,) = tempbalance.analyze(layer, precision="float64")
    (b,) = tempbalance.analyze(scaled, precision="float64")
    assert math.isfinite(a.alpha) and a.alpha > 1.0
    assert b.alpha == pytest.approx(a.alpha, rel=1e-7)
    assert a.alpha == pytest.approx(hill_median_reference(svd_eigs(weight)), rel=1e-7)


class _MLP(nn.Module):
    """in -> 3 hidden 64x64 layers (the balanced ones) -> out."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.inp = nn.Linear(20, width)
        self.h1 = nn.Linear(width, width)
        self.h2 = nn.Linear(width, width)
        self.h3 = nn.Linear(width, width)
        self.out = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.inp, self.h1, self.h2, self.h3):
            x = torch.relu(layer(x))
        return self.out(x)


def _rates_ok(optimizer: torch.optim.Optimizer) -> bool:
    return all(math.isfinite(float(g["lr"])) and float(g["lr"]) >= 0 for g in optimizer.param_groups)


def test_nan_weights_mid_training_keep_rates_finite_and_warn_once(caplog):
    torch.manual_seed(0)
    x, y = torch.randn(256, 20), torch.randint(0, 5, (256,))
    model = _MLP()
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=0.05, momentum=0.9)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    scheduler = tempbalance.TempBalance(model, optimizer, cosine)
    assert scheduler.layers == ["h1", "h2", "h3"]
    with caplog.at_level(logging.WARNING, logger="tempbalance"):
        for epoch in range(8):
            for batch in range(0, 256, 32):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[batch : batch + 32]), y[batch : batch + 32]).backward()
                optimizer.step()
            if epoch == 3:  # poison one balanced layer just before its rebalance
                with torch.no_grad():
                    model.h2.weight[5, 5] = float("nan")
            scheduler.step()
            assert _rates_ok(optimizer), [g["lr"] for g in optimizer.param_groups]
            if epoch == 3:
                assert scheduler.factors["h2"] == 1.0
                entry = {e.layer: e for e in scheduler.history[-1].layers}["h2"]
                assert math.isnan(entry.alpha) and "non-finite" in entry.reason
                others = [scheduler.factors["h1"], scheduler.factors["h3"]]
                assert sorted(others) == [0.5, 1.5]  # the two healthy layers still span s1..s2
    warnings = [r.getMessage() for r in caplog.records if "keeps factor 1" in r.getMessage()]
    assert sum("layer h2 " in w for w in warnings) == 1
    # the NaN spreads through training to the other layers: each warns once, never per epoch
    assert len(warnings) == len(set(warnings)) <= 3


def test_identical_alphas_give_factor_one():
    torch.manual_seed(0)
    model = _MLP()
    with torch.no_grad():
        model.h2.weight.copy_(model.h1.weight)
        model.h3.weight.copy_(model.h1.weight)
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    scheduler = tempbalance.TempBalance(model, optimizer)
    alphas = [e.alpha for e in scheduler.history[-1].layers]
    assert len(set(alphas)) == 1 and math.isfinite(alphas[0])
    assert scheduler.factors == {"h1": 1.0, "h2": 1.0, "h3": 1.0}
    assert all(g["lr"] == 0.1 for g in optimizer.param_groups)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_balances_with_finite_rates(dtype):
    torch.manual_seed(0)
    model = _MLP().to(dtype)
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    scheduler = tempbalance.TempBalance(model, optimizer)
    scheduler.step()
    assert _rates_ok(optimizer)
    alphas = {name: hill_median_reference(svd_eigs(getattr(model, name).weight)) for name in scheduler.layers}
    low, high = min(alphas.values()), max(alphas.values())
    for entry in scheduler.history[-1].layers:
        assert entry.alpha == pytest.approx(alphas[entry.layer], rel=1e-6)  # float64 by default in TempBalance
        expected = 0.5 + (alphas[entry.layer] - low) / (high - low)  # the linear map, s1 = 0.5, s2 = 1.5
        assert scheduler.factors[entry.layer] == pytest.approx(expected, rel=1e-6)


def test_small_1x1_conv_is_not_balanced_and_keeps_the_global_rate():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 3),
        nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16, 3),
    )
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    scheduler = tempbalance.TempBalance(model, optimizer)
    assert "2" not in scheduler.layers and "eigs_thresh" in scheduler.plan.skipped["2"]
    (group,) = [g for g in optimizer.param_groups if any(p is model[2].weight for p in g["params"])]
    assert group["lr"] == 0.1
    assert _rates_ok(optimizer)


def test_diverging_run_stops_with_an_error_not_nan_rates(tmp_path):
    with pytest.raises(tempbalance.errors.TempBalanceError, match="diverged"):
        run_training(TrainConfig(**dict(TINY, lr=1e30, epochs=2, progress=False, out=str(tmp_path / "r"))))
    rows = load_checkpoint(tmp_path / "r")["metrics"]
    assert rows == []  # the diverged epoch is never recorded; the epoch-0 checkpoint stays resumable


# =============================================================== 3./4. interruption


def _spawn(out: Path, resume: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "tempbalance.cli", "train", *TINY_ARGS, "--out", str(out)]
    if resume:
        command.append("--resume")
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _wait(proc: subprocess.Popen, condition, timeout: float = 120.0, pause: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before the kill point: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the kill point")
        if pause:
            time.sleep(pause)


def _wait_new_checkpoint(proc: subprocess.Popen, out: Path) -> None:
    before = _mtime(out / "checkpoint.pt")
    _wait(proc, lambda: _mtime(out / "checkpoint.pt") not in (0, before))


def _without_times(rows) -> list[dict]:
    """Metric rows without the wall-clock ``epoch_time`` (the only field allowed to differ)."""
    return [{k: v for k, v in row.items() if k != "epoch_time"} for row in rows]


def _assert_readable(out: Path, report_dir: Path, capsys) -> int:
    """The run directory after a kill: a checkpoint loads and `tempbalance report` reads it."""
    state = load_checkpoint(out)
    assert state is not None and 0 <= state["epoch"] < TINY["epochs"]
    code, err, _ = call_cli(["report", out, "--no-plots", "--out", report_dir], capsys)
    assert code == 0, err
    assert (report_dir / "report.md").exists()
    return state["epoch"]


def test_sigkill_at_three_moments_then_sigint_resume_is_bit_exact(tmp_path, capsys):
    """Kill -9 (1) right after the first checkpoint, (2) mid-epoch, (3) as a later checkpoint write
    starts; then SIGINT; resume with --resume each time and finish: identical to an uninterrupted run."""
    rng = random.Random(20231129)
    out = tmp_path / "killed"
    epochs_at_kill = []
    reference = _spawn(tmp_path / "straight", resume=False)  # uninterrupted, alongside

    proc = _spawn(out, resume=False)  # 1: soon after the epoch-0 checkpoint appears
    _wait(proc, lambda: (out / "checkpoint.pt").exists())
    time.sleep(rng.uniform(0.0, 0.3))
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    epochs_at_kill.append(_assert_readable(out, tmp_path / "report1", capsys))

    proc = _spawn(out, resume=True)  # 2: mid-epoch, a random moment after a checkpoint
    _wait_new_checkpoint(proc, out)
    time.sleep(rng.uniform(0.05, 0.25))
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    epochs_at_kill.append(_assert_readable(out, tmp_path / "report2", capsys))

    proc = _spawn(out, resume=True)  # 3: while a later checkpoint is being written (tmp file present)
    _wait_new_checkpoint(proc, out)
    renamed = [_mtime(out / "checkpoint.pt")]

    def writing_checkpoint() -> bool:
        if temporaries(out / "checkpoint.pt"):  # a checkpoint's temporary file is being written
            return True
        stamp = _mtime(out / "checkpoint.pt")
        if stamp != renamed[-1]:
            renamed.append(stamp)
        return len(renamed) > 3  # the write window was missed 3 times: kill right after a rename

    _wait(proc, writing_checkpoint, pause=0.0)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    epochs_at_kill.append(_assert_readable(out, tmp_path / "report3", capsys))

    proc = _spawn(out, resume=True)  # 4: SIGINT (Ctrl-C) stops cleanly with exit 130
    _wait_new_checkpoint(proc, out)
    time.sleep(rng.uniform(0.0, 0.2))
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert stdout.startswith("interrupted:") and "Traceback" not in stderr
    assert not (out / "summary.json").exists()
    epochs_at_kill.append(_assert_readable(out, tmp_path / "report4", capsys))
    assert epochs_at_kill == sorted(epochs_at_kill) and epochs_at_kill[-1] < TINY["epochs"]

    code, err, _ = call_cli(["train", *TINY_ARGS, "--out", out, "--resume"], capsys)
    assert code == 0, err
    _, reference_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_err

    killed, straight = load_checkpoint(out), load_checkpoint(tmp_path / "straight")
    assert killed["epoch"] == straight["epoch"] == TINY["epochs"]
    assert killed["model"].keys() == straight["model"].keys()
    for key, value in straight["model"].items():
        assert torch.equal(killed["model"][key], value), key

    def rows(directory: Path) -> list[dict]:
        return _without_times(json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines())

    assert rows(out) == rows(tmp_path / "straight") and len(rows(out)) == TINY["epochs"]
    summaries = [json.loads((d / "summary.json").read_text()) for d in (out, tmp_path / "straight")]
    for key in ("status", "epochs_done", "final_test_acc", "final_test_loss", "best_test_acc", "best_epoch"):
        assert summaries[0][key] == summaries[1][key], key
    code, err, _ = call_cli(["report", tmp_path, "--no-plots", "--out", tmp_path / "report-final"], capsys)
    assert code == 0, err


def test_kill_between_the_two_renames_of_a_checkpoint_leaves_a_resumable_run(tmp_path, monkeypatch, capsys):
    """The narrowest window of the atomic save: checkpoint.pt already moved to checkpoint.prev.pt,
    the new file not yet renamed into place. Simulated in process at the epoch-2 checkpoint."""
    config = dict(TINY, epochs=3, progress=False)
    run_training(TrainConfig(**config, out=str(tmp_path / "straight")))
    real_replace, saves = os.replace, []

    def dying_replace(src, dst):
        if Path(src) in temporaries(cut / "checkpoint.pt"):
            saves.append(dst)
            if len(saves) == 3:  # checkpoints of epochs 0, 1, then 2: die before the final rename
                raise KeyboardInterrupt("simulated SIGKILL")
        return real_replace(src, dst)

    cut = tmp_path / "cut"
    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        run_training(TrainConfig(**config, out=str(cut)))
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (cut / "checkpoint.pt").exists() and (cut / "checkpoint.prev.pt").exists()
    assert len((cut / "metrics.jsonl").read_text().splitlines()) == 1  # never ahead of the newest checkpoint
    assert _assert_readable(cut, tmp_path / "report", capsys) == 1
    run_training(TrainConfig(**config, out=str(cut), resume=True))
    a, b = load_checkpoint(cut), load_checkpoint(tmp_path / "straight")
    assert a["epoch"] == b["epoch"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert _without_times(a["metrics"]) == _without_times(b["metrics"])


@pytest.mark.parametrize("key, value", [("weight_decay", -5e-4), ("weight_decay", float("nan")), ("lr", float("inf")), ("momentum", -0.9)])
def test_param_groups_rejects_bad_group_options(key, value):
    """torch checks these only in an optimizer's defaults, so a per-group value must be checked here."""
    with pytest.raises(ConfigError, match=f"{key}="):
        tempbalance.param_groups(_MLP(), **{key: value})
    assert len(tempbalance.param_groups(_MLP(), **{key: 0.0})) == 4  # h1, h2, h3, rest


def test_checkpoint_data_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    from tempbalance.train.checkpoint import save_checkpoint

    def state(epoch: int, w: torch.Tensor) -> dict:
        return {"epoch": epoch, "config": {}, "model": {"w": w}, "optimizer": {}, "scheduler": {}, "rng": {},
                "metrics": [{"epoch": i + 1} for i in range(epoch)]}

    save_checkpoint(state(1, torch.ones(4)), tmp_path)
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync")
        return real_fsync(fd)

    def replace(src, dst):
        events.append(f"replace {Path(src).name} -> {Path(dst).name}")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(state(2, torch.zeros(4)), tmp_path)
    monkeypatch.undo()
    (final,) = [i for i, event in enumerate(events) if re.fullmatch(r"replace \.checkpoint\.\d+-\w+\.tmp\.pt -> checkpoint\.pt", event)]
    assert "fsync" in events[:final]  # the data reach the disk before the name points at them
    assert events.index("replace checkpoint.pt -> checkpoint.prev.pt") < final  # the previous one is kept
    assert torch.load(tmp_path / "checkpoint.prev.pt")["epoch"] == 1 and load_checkpoint(tmp_path)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
