"""Tests of ``tempbalance analyze``: every kind of SOURCE, the outputs (table, CSV, JSON,
plots, progress) and the one-line errors; results checked against ``tempbalance.analyze``."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch
from torch import nn

import tempbalance as tb
from tempbalance.cli import main
from tempbalance.train.models import create_model


def run(capsys, *argv):
    code = main(["analyze", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def project_model() -> nn.Module:
    torch.manual_seed(3)
    return create_model("cnn-digits", 10, in_channels=1)


def json_alphas(text: str) -> dict[str, float | None]:
    return {layer["name"]: layer["alpha"] for layer in json.loads(text)["layers"]}


def test_architecture_name_prints_a_table(capsys):
    code, out, err = run(capsys, "cnn-digits", "--in-channels", 1)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:5] == ["layer", "kind", "matrices", "eigs", "alpha"]
    assert "layers" in lines[-1] and "mean alpha" in lines[-1]
    names = [r.name for r in tb.find_layers(create_model("cnn-digits", 10, in_channels=1))]
    assert [line.split()[0] for line in lines[2:-1]] == names


def test_state_dict_checkpoint_with_arch_and_wrappers(tmp_path, capsys):
    model = project_model()
    expected = tb.analyze(model).alphas()
    sd = model.state_dict()
    for i, payload in enumerate(
        [
            sd,
            {"model": sd, "epoch": 3},
            {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
            {f"_orig_mod.{k}": v for k, v in sd.items()},
        ]
    ):
        path = tmp_path / f"ckpt{i}.pt"
        torch.save(payload, path)
        code, out, err = run(capsys, path, "--arch", "cnn-digits", "--in-channels", 1, "--json", "-")
        assert code == 0, err
        assert json_alphas(out) == pytest.approx(expected, rel=1e-12)


def test_whole_pickled_module(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20))
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    code, out, err = run(capsys, path, "--csv", "-", "--fit", "ks")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    expected = tb.analyze(model, fit="ks")
    assert [r["name"] for r in rows] == expected.names
    assert [float(r["alpha"]) for r in rows] == pytest.approx([r.alpha for r in expected], rel=1e-12)


def test_options_reach_the_analysis(tmp_path, capsys):
    model = project_model()
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    code, out, _ = run(
        capsys, path, "--arch", "cnn-digits", "--in-channels", 1, "--json", "-",
        "--fit", "fix-finger", "--conv-norm", 0.25, "--precision", "float64", "--conv-mode", "flatten",
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["options"]["fit"] == "fix-finger" and doc["options"]["conv_mode"] == "flatten"
    expected = tb.analyze(model, fit="fix-finger", conv_norm=0.25, precision="float64", conv_mode="flatten")
    assert json_alphas(out) == pytest.approx(expected.alphas(), rel=1e-12)
    code, out, _ = run(capsys, path, "--arch", "cnn-digits", "--in-channels", 1, "--json", "-", "--xmin-pos", 3)
    assert json_alphas(out) == pytest.approx(tb.analyze(model, xmin_pos=3).alphas(), rel=1e-12)


def test_json_and_csv_files_nan_as_null(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(model, path)
    code, out, err = run(capsys, path, "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv")
    assert code == 0, err
    assert "no fit: non-finite" in out  # the table is still printed
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["layers"][0]["alpha"] is None and "non-finite" in doc["layers"][0]["reason"]
    assert math.isfinite(doc["layers"][1]["alpha"])
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert rows[0]["alpha"] == "nan"


def test_plots_directory(tmp_path, capsys):
    code, _, err = run(capsys, "cnn-digits", "--in-channels", 1, "--plots", tmp_path / "plots")
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "plots").iterdir())
    n = len(tb.find_layers(create_model("cnn-digits", 10, in_channels=1)))
    assert "alpha_summary.png" in files
    assert len([f for f in files if f.startswith("esd_")]) == n
    assert all((tmp_path / "plots" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)


def test_progress_bar_on_many_layers(tmp_path, capsys):
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(25)])
    path = tmp_path / "deep.pt"
    torch.save(model, path)
    _, out, err = run(capsys, path)
    assert "analyzing" in err and "analyzing" not in out
    _, _, err = run(capsys, path, "--no-progress")
    assert "analyzing" not in err


def test_torchvision_and_timm_architectures(capsys):
    code, out, err = run(capsys, "torchvision:squeezenet1_1", "--num-classes", 7, "--json", "-", "--no-progress")
    assert code == 0, err
    layers = json.loads(out)["layers"]
    assert layers[-1]["shape"][:2] == [7, 512]
    code, out, err = run(capsys, "test_vit", "--json", "-", "--no-progress", "--split-qkv")
    assert code == 0, err
    assert any(layer["kind"] == "Linear" for layer in json.loads(out)["layers"])


def error_line(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tempbalance: error:")
    return lines[0]


def test_missing_file(capsys, tmp_path):
    assert "no such checkpoint file" in error_line(capsys, tmp_path / "nope.pt")
    assert "no such checkpoint file" in error_line(capsys, "missing.pth")


def test_unknown_arch_lists_close_matches(capsys):
    line = error_line(capsys, "resnet81")
    assert "unknown architecture 'resnet81'" in line and "resnet18" in line
    line = error_line(capsys, "timm:not_a_model_at_all")
    assert "unknown architecture" in line


def test_state_dict_that_does_not_fit(tmp_path, capsys):
    path = tmp_path / "sd.pt"
    torch.save(project_model().state_dict(), path)
    line = error_line(capsys, path, "--arch", "cnn1d", "--in-channels", 1)
    assert "does not fit --arch 'cnn1d'" in line
    assert "state dict" in error_line(capsys, path)  # no --arch
    torch.save({"epoch": 3, "note": "nothing here"}, path)
    assert "neither a model nor a state dict" in error_line(capsys, path)


def test_bad_option_values(capsys, tmp_path):
    assert "conv_norm=-1.0" in error_line(capsys, "cnn-digits", "--conv-norm", -1)
    assert "xmin_pos=0.5" in error_line(capsys, "cnn-digits", "--xmin-pos", 0.5)
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    assert "cannot read checkpoint" in error_line(capsys, tmp_path / "garbage.pt")
    assert "directory" in error_line(capsys, tmp_path)
    assert "both write to stdout" in error_line(capsys, "cnn-digits", "--csv", "-", "--json", "-")
    assert "--device 'gpu0'" in error_line(capsys, "cnn-digits", "--device", "gpu0")
    with pytest.raises(SystemExit):
        main(["analyze", "cnn-digits", "--fit", "hill"])


def test_pickled_module_whose_class_is_gone(tmp_path, capsys):
    import sys
    import types

    module = types.ModuleType("vanishing_models")

    class Gone(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    Gone.__module__ = "vanishing_models"
    Gone.__qualname__ = "Gone"
    module.Gone = Gone
    sys.modules["vanishing_models"] = module
    try:
        torch.save(Gone(), tmp_path / "gone.pt")
    finally:
        del sys.modules["vanishing_models"]
    line = error_line(capsys, tmp_path / "gone.pt")
    assert "not importable" in line and "--arch" in line
