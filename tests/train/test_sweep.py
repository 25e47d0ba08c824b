"""Tests of sweeps: the paper configs against the published settings (re-typed here), grid expansion,
overrides, method variants, skipping finished runs and resuming half-done ones (a summary that
disagrees with the checkpoint does not make a run done), runs another process holds, and several
sweeps of one file at once as real processes."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from tempbalance.atomic import temporaries
from tempbalance.errors import ConfigError
from tempbalance.train import run_training
from tempbalance.train import sweep as sweep_module
from tempbalance.train.checkpoint import load_checkpoint
from tempbalance.train.metrics import read_metrics
from tempbalance.train.rundir import RUN_FILES, inspect_run
from tempbalance.train.runlock import LOCK_NAME
from tempbalance.train.sweep import expand_sweep, load_sweep, parse_override, run_status, run_sweep
from tests.helpers.paths import PAPER, REPO
from tests.helpers.processes import TIMEOUT_S, finish_cli, start_cli
from tests.helpers.sweeps import spec

SEEDS = [43, 37, 13, 51, 71]

# The paper's settings, typed again by hand: (dataset, model name, lr CAL/SNR/TB/TB+SNR, SNR coef SNR/TB+SNR)
MAIN_TABLE = [
    ("cifar100", "resnet18", (0.1, 0.1, 0.1, 0.1), (0.01, 0.001)),
    ("cifar100", "resnet34", (0.05, 0.1, 0.1, 0.1), (0.015, 0.005)),
    ("cifar100", "vgg16", (0.05, 0.05, 0.05, 0.05), (0.005, 0.005)),
    ("cifar100", "vgg19", (0.05, 0.05, 0.05, 0.05), (0.01, 0.01)),
    ("tinyimagenet", "resnet18-64", (0.1, 0.1, 0.1, 0.1), (0.01, 0.001)),
    ("tinyimagenet", "resnet34-64", (0.1, 0.1, 0.1, 0.1), (0.01, 0.001)),
    ("tinyimagenet", "wrn16-8", (0.1, 0.1, 0.1, 0.1), (1e-4, 1e-4)),
    ("tinyimagenet", "wrn28-6", (0.05, 0.1, 0.1, 0.1), (1e-4, 1e-4)),
    ("cifar10", "resnet18", (0.1, 0.1, 0.1, 0.1), (0.001, 0.001)),
    ("cifar10", "vgg16", (0.1, 0.05, 0.05, 0.05), (0.005, 0.005)),
    ("svhn", "resnet18", (0.1, 0.1, 0.1, 0.1), (0.005, 0.015)),
    ("svhn", "vgg16", (0.05, 0.05, 0.05, 0.05), (0.01, 0.005)),
]
# optimizer comparison on CIFAR100: method -> (ResNet18 lr, ResNet34 lr)
OPTIMIZER_TABLE = {
    "sgdr": (0.1, 0.05), "lars": (28, 32), "lookahead": (0.1, 0.15), "sgdp": (0.1, 0.1),
    "lamb": (0.01, 0.01), "tb": (0.1, 0.1), "tb+sgdp": (0.1, 0.1),
}


MAIN_FILES = ("cifar100", "cifar10", "svhn", "tinyimagenet", "cifar100-optimizers")


def _paper_runs(names=None) -> list:
    runs = []
    paths = sorted(PAPER.glob("*.toml")) if names is None else [PAPER / f"{name}.toml" for name in names]
    for path in paths:
        runs += expand_sweep(load_sweep(path))
    return runs


def test_every_paper_run_uses_the_published_training_setup():
    runs = _paper_runs()
    assert runs
    for run in runs:
        c = run.config
        assert (c.epochs, c.batch_size, c.weight_decay, c.momentum) == (200, 128, 5e-4, 0.9), run.out
    groups: dict = {}
    for run in runs:
        groups.setdefault(str(run.out.parent), set()).add(run.seed)
    assert all(sorted(seeds) == sorted(SEEDS) for seeds in groups.values())


def test_main_tables_match_method_md():
    runs = _paper_runs(MAIN_FILES)
    assert all(r.config.width == 1.0 and r.config.metric == "alpha" and r.config.fit == "median" for r in runs)
    found = {}
    for run in runs:
        c = run.config
        found.setdefault((c.dataset, c.model, c.method), set()).add((c.lr, c.snr_coef, c.s1, c.s2))
    for dataset, model, lrs, coefs in MAIN_TABLE:
        tb_s = (0.6, 1.4) if dataset == "tinyimagenet" else (0.5, 1.5)
        expected = {
            "cal": (lrs[0], None, None, None),
            "snr": (lrs[1], coefs[0], None, None),
            "tb": (lrs[2], None, *tb_s),
            "tb+snr": (lrs[3], coefs[1], 0.6, 1.4),
        }
        for method, (lr, coef, s1, s2) in expected.items():
            settings = found.get((dataset, model, method))
            assert settings, f"{dataset} {model} {method} missing from configs/paper"
            assert len(settings) == 1, (dataset, model, method, settings)
            got_lr, got_coef, got_s1, got_s2 = next(iter(settings))
            assert got_lr == pytest.approx(lr), (dataset, model, method)
            if coef is not None:
                assert got_coef == pytest.approx(coef), (dataset, model, method)
            if s1 is not None:
                assert (got_s1, got_s2) == pytest.approx((s1, s2)), (dataset, model, method)
    # nothing beyond the table in the main files
    main_keys = {(d, m) for d, m, _, _ in MAIN_TABLE}
    for dataset, model, method in found:
        if method in ("cal", "snr", "tb+snr"):
            assert (dataset, model) in main_keys, (dataset, model, method)


def test_optimizer_table_matches_method_md():
    runs = expand_sweep(load_sweep(PAPER / "cifar100-optimizers.toml"))
    got = {(r.config.model, r.method): r.config for r in runs}
    for method, (lr18, lr34) in OPTIMIZER_TABLE.items():
        assert got[("resnet18", method)].lr == pytest.approx(lr18)
        assert got[("resnet34", method)].lr == pytest.approx(lr34)
    assert {r.config.dataset for r in runs} == {"cifar100"}
    for model in ("resnet18", "resnet34"):
        assert got[(model, "lars")].lars_trust == 1e-3
        assert (got[(model, "lookahead")].lookahead_k, got[(model, "lookahead")].lookahead_alpha) == (10, 0.8)
        assert got[(model, "sgdr")].sgdr_t0 == 100
    # the shared cal/tb runs are the same runs (same directory, same settings) as in cifar100.toml
    main = {(r.config.model, r.method, r.seed): r for r in expand_sweep(load_sweep(PAPER / "cifar100.toml"))}
    for run in runs:
        twin = main.get((run.config.model, run.method, run.seed))
        if twin is not None:
            assert twin.out == run.out and twin.config.to_dict() == run.config.to_dict()


def test_ablations_cover_lr_width_metric_and_fit():
    def values(name, field):
        return sorted({getattr(r.config, field) for r in expand_sweep(load_sweep(PAPER / f"{name}.toml"))})

    assert values("ablation-lr", "lr") == [0.05, 0.1, 0.15]
    assert values("ablation-width", "width") == [0.5, 1.0, 1.5]
    assert values("ablation-metric", "metric") == ["alpha", "alphahat", "spectral_norm"]
    assert values("ablation-fit", "fit") == ["fix-finger", "ks", "median"]


def test_overrides_parse_as_toml_values():
    assert parse_override("epochs=2") == ("epochs", 2)
    assert parse_override("lr=0.05") == ("lr", 0.05)
    assert parse_override("seeds=[43, 37]") == ("seeds", [43, 37])
    assert parse_override("progress=false") == ("progress", False)
    assert parse_override("device=cpu") == ("device", "cpu")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("epochs")


def test_expand_applies_order_and_overrides(tmp_path):
    spec = {
        "name": "t",
        "seeds": [1, 2],
        "methods": ["cal", "tb"],
        "base": {"dataset": "mnist1d", "lr": 0.1},
        "settings": [{"name": "a", "width": 0.5}, {"width": 0.75, "methods": {"snr": {"snr_coef": 0.003}}}],
    }
    runs = expand_sweep(spec, ["epochs=2", "lr=0.3"], out=tmp_path)
    assert [(r.setting, r.method, r.seed) for r in runs] == [
        ("a", "cal", 1), ("a", "cal", 2), ("a", "tb", 1), ("a", "tb", 2),
        ("width-0.75", "snr", 1), ("width-0.75", "snr", 2),
    ]
    assert all(r.config.epochs == 2 and r.config.lr == 0.3 and r.config.resume for r in runs)
    assert runs[-1].config.snr_coef == 0.003 and runs[-1].config.width == 0.75 and runs[-1].config.tag == "width-0.75"
    assert runs[0].out == tmp_path / "a" / "cal" / "seed1"
    assert len(expand_sweep(spec, ["seeds=[7]"], out=tmp_path)) == 3


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ({"name": "x", "grid": 1}, r"unknown sweep key\(s\) \['grid'\]"),
        ({"name": "x", "seeds": []}, r"seeds=\[\] must be a non-empty list"),
        ({"name": "x", "base": {"dataset": "mnist1d", "epoch": 3}}, r"unknown training setting\(s\) \['epoch'\]"),
        ({"name": "x", "base": {"dataset": "mnist1d"}, "methods": ["cal", "adamw"]}, r"unknown method 'adamw'"),
        ({"name": "x", "base": {"dataset": "mnist1d"}, "settings": [{"name": "a"}, {"name": "a"}]}, "two settings"),
    ],
)
def test_bad_sweeps_are_named(spec, pattern, tmp_path):
    with pytest.raises(ConfigError, match=pattern):
        expand_sweep(spec, out=tmp_path)


def test_load_sweep_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("seeds = [1,\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_sweep(bad)
    other = tmp_path / "sweep.yaml"
    other.write_text("a: 1")
    with pytest.raises(ConfigError, match=r"\.toml or \.json"):
        load_sweep(other)
    good = tmp_path / "g.json"
    good.write_text(json.dumps({"seeds": [1], "base": {"dataset": "mnist1d"}}))
    assert load_sweep(good)["name"] == "g"


def test_run_sweep_skips_finished_and_resumes_partial(tmp_path, monkeypatch):
    spec = {
        "name": "tiny",
        "seeds": [3],
        "methods": ["cal", "snr"],
        "base": {
            "dataset": "mnist1d", "model": "cnn1d", "width": 0.5, "train_fraction": 0.1, "epochs": 2,
            "batch_size": 64, "device": "cpu", "progress": False, "num_threads": 1,
        },
    }
    runs = expand_sweep(spec, out=tmp_path)
    assert [run_status(r) for r in runs] == ["new", "new"]
    # half-do the second run, finish the first
    half = expand_sweep(spec, ["stop_after=1"], out=tmp_path)
    sweep_module.run_training(half[1].config)
    run_sweep(runs[:1])
    assert [run_status(r) for r in runs] == ["done", "partial"]
    calls = []
    real = sweep_module.run_training

    def spy(config):
        calls.append((config.method, config.resume))
        return real(config)

    monkeypatch.setattr(sweep_module, "run_training", spy)
    summaries = run_sweep(runs)
    assert calls == [("snr", True)]
    assert [s["status"] for s in summaries] == ["finished", "finished"]
    rows = (tmp_path / "default" / "snr" / "seed3" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
    assert [run_status(r) for r in runs] == ["done", "done"]


def test_a_method_entry_can_name_a_variant_of_a_method(tmp_path):
    spec = {
        "name": "v", "seeds": [1], "base": {"dataset": "mnist1d", "epochs": 1},
        "methods": {"cal": {}, "tb": {}, "tb-farms": {"method": "tb", "esd": "farms"}, "tb-narrow": {"method": "tb", "s1": 0.8, "s2": 1.2}},
    }
    runs = {run.method: run for run in expand_sweep(spec, out=tmp_path)}
    assert set(runs) == {"cal", "tb", "tb-farms", "tb-narrow"}
    assert runs["tb-farms"].config.method == "tb" and runs["tb-farms"].config.esd == "farms"
    assert runs["tb-narrow"].config.s1 == 0.8 and runs["tb-narrow"].out == tmp_path / "default" / "tb-narrow" / "seed1"
    assert runs["cal"].config.method == "cal" and runs["tb"].config.esd == "full"
    with pytest.raises(ConfigError, match="plain name"):
        expand_sweep(dict(spec, methods={"tb/../x": {"method": "tb"}}), out=tmp_path)
    with pytest.raises(ConfigError, match="unknown method 'tbb'"):
        expand_sweep(dict(spec, methods={"v": {"method": "tbb"}}), out=tmp_path)


# ---------------------------------------------------------------- done only when it really is


def test_a_summary_that_disagrees_with_the_checkpoint_does_not_make_a_run_done(tmp_path):
    """As a slow second process left it: summary.json of 3 epochs, metrics and checkpoint at epoch 2."""
    runs = expand_sweep(spec(epochs=3), out=tmp_path / "runs")
    (run,) = runs
    run_training(run.config)
    finished_summary = (run.out / "summary.json").read_bytes()
    straight = tmp_path / "straight"
    shutil.copytree(run.out, straight)
    partial = tmp_path / "partial"
    run_training(dict(run.config.to_dict(), out=str(partial), resume=False, stop_after=2))
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "metrics.csv"):
        shutil.copy(partial / name, run.out / name)
    assert (run.out / "summary.json").read_bytes() == finished_summary
    files = inspect_run(run.out)
    assert not files.finished and "summary.json says 3 epochs, metrics.jsonl ends at epoch 2" in files.disagreement()
    assert run_status(run) == "partial"
    (summary,) = run_sweep(runs)  # resumes from the epoch-2 checkpoint
    assert summary["status"] == "finished" and inspect_run(run.out).finished
    a, b = load_checkpoint(run.out), load_checkpoint(straight)
    assert a["epoch"] == b["epoch"] == 3 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time"} for r in rows]  # noqa: E731
    assert strip(read_metrics(run.out)) == strip(read_metrics(straight))


def test_a_run_another_process_holds_is_running_and_left_to_it(tmp_path):
    from tempbalance.train.runlock import RunLock

    (run,) = expand_sweep(spec(), out=tmp_path / "runs")
    with RunLock(run.out):  # as another process training it would hold it
        assert run_status(run) == "running"
        (summary,) = run_sweep([run])
    assert summary["status"] == "skipped" and "trained by another process (pid" in summary["reason"]
    assert not (run.out / "config.json").exists()  # nothing was written under the other process's lock
    assert run_status(run) == "new"


# ---------------------------------------------------------------- FARMS and follow-up methods


def test_sweep_files_take_esd():
    spec = {"name": "x", "base": {"dataset": "mnist1d", "epochs": 1}, "methods": {"cal": {}, "tb": {"esd": "farms"}}}
    runs = expand_sweep(spec, out="unused")
    assert {(run.method, run.config.esd) for run in runs} == {("cal", "full"), ("tb", "farms")}
    with pytest.raises(ConfigError, match="unknown esd 'farm'"):
        expand_sweep(spec, ["esd=farm"], out="unused")


def test_the_follow_up_sweep_file_expands(tmp_path):
    from tempbalance.train.sweep import expand_sweep, load_sweep

    path = REPO / "configs" / "follow-ups" / "alphadecay-cifar100.toml"
    data = tmp_path / "cifar100"
    data.mkdir()
    runs = expand_sweep(load_sweep(path), [f"data_dir={data}"])
    assert {(r.setting, r.method) for r in runs} == {
        (s, m) for s in ("resnet18", "vgg16") for m in ("cal", "tb", "alphadecay", "tb+alphadecay")
    }
    assert len(runs) == 8 * 5 and all(r.config.norm_follows == "name" and r.config.epochs == 200 for r in runs)
    ad = next(r for r in runs if r.method == "tb+alphadecay" and r.setting == "vgg16")
    assert (ad.config.lr, ad.config.wd_s1, ad.config.wd_s2, ad.config.s1) == (0.05, 0.5, 1.5, 0.5)


# ---------------------------------------------------------------- several sweeps at once, as real processes


SWEEP = {
    "seeds": [1, 2],
    "methods": ["cal", "tb"],
    "base": {
        "dataset": "mnist1d", "model": "cnn1d", "width": 0.5, "train_fraction": 0.1, "epochs": 3, "batch_size": 64,
        "device": "cpu", "progress": False, "num_threads": 1,
    },
}


def _sweep_file(tmp_path: Path, methods=("cal", "tb"), **base) -> Path:
    spec = json.loads(json.dumps(SWEEP))
    spec["base"].update(base)
    spec["methods"] = list(methods)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.slow
def test_three_sweeps_at_once_train_every_run_exactly_once(tmp_path):
    sweep = _sweep_file(tmp_path)
    procs = [start_cli("sweep", sweep, "--out", tmp_path / "runs") for _ in range(3)]
    outputs = [finish_cli(proc) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], [err for _, err in outputs]
    runs = expand_sweep(load_sweep(sweep), out=tmp_path / "runs")
    started = {str(run.out): 0 for run in runs}
    for _, err in outputs:
        for line in err.splitlines():
            found = re.search(r"\] (\S+): (starting|resuming)", line)
            if found:
                started[found.group(1)] += 1
    assert set(started.values()) == {1}, started  # one process trained each run, nobody twice
    for run in runs:
        assert run_status(run) == "done"
        files = inspect_run(run.out)
        assert files.finished and files.summary["epochs_done"] == files.metrics_epoch == files.checkpoint_epoch == 3
        assert not (run.out / LOCK_NAME).exists()
        assert all(temporaries(run.out / name) == [] for name in RUN_FILES)
    summaries = [out.strip().splitlines()[0] for out, _ in outputs]
    assert all(re.match(r"sweep .*: \d/4 runs finished, 0 failed", line) for line in summaries), summaries


@pytest.mark.slow
def test_a_killed_sweep_leaves_a_stale_lock_file_that_the_next_sweep_takes_over(tmp_path):
    sweep = _sweep_file(tmp_path, methods=["cal"], epochs=40)  # long enough to be killed mid-run
    first = start_cli("sweep", sweep, "--out", tmp_path / "runs", "--set", "seeds=[1]")
    run_dir = tmp_path / "runs" / "default" / "cal" / "seed1"
    deadline = time.monotonic() + TIMEOUT_S
    while not (run_dir / "metrics.jsonl").exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the sweep did not start training"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert (run_dir / LOCK_NAME).exists()  # left behind by the killed process
    # the next sweep (with 6 epochs: the killed run's 40 make it stale, retrained on request)
    second = start_cli("sweep", sweep, "--out", tmp_path / "runs", "--set", "seeds=[1]", "--set", "epochs=6",
                    "--rerun-stale")
    out, err = finish_cli(second)
    assert second.returncode == 0, err
    assert f"stale lock file (pid {first.pid} " in err and "stale: its recorded settings differ (epochs: 40 -> 6)" in err
    assert inspect_run(run_dir).finished and json.loads((run_dir / "config.json").read_text())["epochs"] == 6
    assert not (run_dir / LOCK_NAME).exists()
