"""Tests of sweeps: the paper configs against method.md §3 (re-typed here), grid expansion,
overrides, skipping finished runs and resuming half-done ones, and the CLI's dry run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tempbalance.cli import main as cli_main
from tempbalance.errors import ConfigError
from tempbalance.train import sweep as sweep_module
from tempbalance.train.sweep import expand_sweep, load_sweep, parse_override, run_status, run_sweep

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
SEEDS = [43, 37, 13, 51, 71]

# method.md §3, typed again by hand: (dataset, model name, lr CAL/SNR/TB/TB+SNR, SNR coef SNR/TB+SNR)
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


def test_cli_dry_run_lists_runs(capsys):
    assert cli_main(["sweep", str(PAPER / "cifar10.toml"), "--dry-run", "--set", "epochs=2", "--out", "/tmp/x"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "40 runs"
    assert out[1].split()[:4] == ["new", "resnet18", "cal", "43"] and "/tmp/x/resnet18/cal/seed43" in out[1]
    assert " 2 " in out[1]


def test_a_failing_run_does_not_stop_the_sweep(tmp_path, capsys):
    sweep_file = tmp_path / "s.json"
    sweep_file.write_text(json.dumps({
        "seeds": [3],
        "base": {
            "dataset": "mnist1d", "model": "cnn1d", "width": 0.5, "train_fraction": 0.1, "epochs": 1,
            "batch_size": 64, "device": "cpu", "progress": False, "num_threads": 1,
        },
        "settings": [{"name": "diverges", "lr": 1e30}, {"name": "fine", "lr": 0.1}],
    }))
    assert cli_main(["sweep", str(sweep_file), "--out", str(tmp_path / "runs")]) == 1
    out = capsys.readouterr().out
    assert "1/2 runs finished, 1 failed" in out and "diverged" in out
    assert (tmp_path / "runs" / "fine" / "cal" / "seed3" / "summary.json").exists()


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
