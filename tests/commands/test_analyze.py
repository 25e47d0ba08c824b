"""Tests of ``tempbalance analyze``: every kind of SOURCE, the outputs (table, CSV, JSON,
plots, progress) and the one-line errors; results checked against ``tempbalance.analyze``."""

from __future__ import annotations

import csv
import io
import json
import math
import re

import numpy as np
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
    line = error_line(capsys, path, "--csv", "-")  # unpickling runs code: only on request
    assert "holds pickled Python objects" in line and "--allow-pickle" in line
    code, out, err = run(capsys, path, "--csv", "-", "--fit", "ks", "--allow-pickle")
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
    code, out, err = run(capsys, path, "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv", "--allow-pickle")
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


def test_progress_bar_on_many_layers(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("tempbalance.progress._is_terminal", lambda stream: True)  # a bar, as on a terminal
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(25)])
    path = tmp_path / "deep.pt"
    torch.save(model.state_dict(), path)
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
    line = error_line(capsys, "resnet19")
    matches = line.split("close matches: ", 1)[1]
    names = [part.split(" (")[0] for part in re.split(r"\), ", matches)]
    assert len(names) == len(set(names))  # each name once ...
    assert "resnet18 (project, torchvision, timm)" in matches  # ... with the libraries that have it
    line = error_line(capsys, "timm:not_a_model_at_all")
    assert "unknown architecture" in line


def test_state_dict_that_does_not_fit(tmp_path, capsys):
    path = tmp_path / "sd.pt"
    torch.save(project_model().state_dict(), path)
    line = error_line(capsys, path, "--arch", "cnn1d", "--in-channels", 1)
    assert "does not fit --arch 'cnn1d'" in line
    torch.save({"epoch": 3, "note": "nothing here"}, path)
    assert "neither a state dict nor a model" in error_line(capsys, path)
    assert "neither a model nor a state dict" in error_line(capsys, path, "--arch", "cnn1d")


def test_bad_option_values(capsys, tmp_path):
    assert "conv_norm=-1.0" in error_line(capsys, "cnn-digits", "--conv-norm", -1)
    assert "xmin_pos=0.5" in error_line(capsys, "cnn-digits", "--xmin-pos", 0.5)
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    assert "cannot read it as a torch file" in error_line(capsys, tmp_path / "garbage.pt")
    (tmp_path / "garbage.pt").unlink()
    assert "no checkpoint weights found" in error_line(capsys, tmp_path)
    assert "both write to stdout" in error_line(capsys, "cnn-digits", "--csv", "-", "--json", "-")
    assert "--device 'gpu0'" in error_line(capsys, "cnn-digits", "--device", "gpu0")
    assert "--threads 0" in error_line(capsys, "cnn-digits", "--threads", 0)
    assert "--batch-memory" in error_line(capsys, "cnn-digits", "--batch-memory", 0)
    assert "--resume needs" in error_line(capsys, "cnn-digits", "--resume")
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
    line = error_line(capsys, tmp_path / "gone.pt", "--allow-pickle")
    assert "not importable" in line and "state_dict()" in line


# ----------------------------------------------------------------------------- checkpoints without an architecture


def gpt2_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(11)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=120,
                                                                 n_positions=32))
    model.save_pretrained(tmp_path / "gpt2", max_shard_size="40KB")
    return model, tmp_path / "gpt2"


def test_directory_source_gives_the_module_report(tmp_path, capsys):
    model, directory = gpt2_directory(tmp_path)
    code, out, err = run(capsys, directory, "--json", "-", "--split-qkv")
    assert code == 0, err
    assert json_alphas(out) == tb.analyze(model, split_qkv=True).alphas()
    code, out, err = run(capsys, directory, "--threads", 1, "--batch-memory", 0.01)
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("14 layers, 14 fitted")  # 3 blocks x 4, wte, wpe


def test_group_by_block_and_module(tmp_path, capsys):
    model, directory = gpt2_directory(tmp_path)
    report = tb.analyze(model)
    code, out, err = run(capsys, directory, "--group-by", "block", "--json", tmp_path / "r.json")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["block", "layers", "fitted", "mean"]
    rows = {line.split()[0]: line.split() for line in lines[2:-1]}
    for block in range(3):
        alphas = [report[f"transformer.h.{block}.{m}"].alpha for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
        assert rows[str(block)][1] == "4"
        assert float(rows[str(block)][3]) == pytest.approx(np.mean(alphas), abs=5e-4)
        assert float(rows[str(block)][4]) == pytest.approx(np.median(alphas), abs=5e-4)
    assert rows["(outside"][2] == "2"  # wte, wpe
    groups = json.loads((tmp_path / "r.json").read_text())["groups"]
    assert groups["by"] == "block" and [g["group"] for g in groups["rows"]] == [0, 1, 2, None]
    code, out, err = run(capsys, directory, "--group-by", "module")
    assert code == 0, err
    modules = [line.split()[0] for line in out.strip().splitlines()[2:-1]]
    assert modules[:4] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def test_plots_include_alpha_against_depth(tmp_path, capsys):
    _, directory = gpt2_directory(tmp_path)
    code, _, err = run(capsys, directory, "--plots", tmp_path / "plots", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "plots" / "alpha_depth.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "plots" / "partial.jsonl").exists()


def test_cli_resume_after_an_interruption(tmp_path, capsys, monkeypatch, caplog):
    from tempbalance import checkpoint_files

    _, directory = gpt2_directory(tmp_path)
    code, out, _ = run(capsys, directory, "--json", "-")
    expected = json_alphas(out)
    reads = []
    original = checkpoint_files.SafetensorsShard.read

    def read(shard, key):
        if stop[0] is not None and len(reads) == stop[0]:
            raise KeyboardInterrupt
        reads.append(key)
        return original(shard, key)

    stop = [5]
    monkeypatch.setattr(checkpoint_files.SafetensorsShard, "read", read)
    out_json = tmp_path / "r.json"
    code, _, err = run(capsys, directory, "--json", out_json, "--batch-memory", 1e-6)
    assert code == 130 and "run the same command with --resume" in caplog.text
    assert not out_json.exists() and (tmp_path / "r.json.partial.jsonl").exists()
    first = list(reads)
    reads.clear()
    stop[0] = None
    code, _, err = run(capsys, directory, "--json", out_json, "--resume")
    assert code == 0, err
    assert set(reads).isdisjoint(first) and len(first) + len(reads) == 14
    assert json_alphas(out_json.read_text()) == expected
    assert not (tmp_path / "r.json.partial.jsonl").exists()


def test_cli_without_resume_starts_over(tmp_path, capsys, caplog):
    _, directory = gpt2_directory(tmp_path)
    journal = tmp_path / "r.json.partial.jsonl"
    journal.write_text('{"journal": "tempbalance-analyze-journal", "version": 1, "source": "another"}\n')
    code, _, err = run(capsys, directory, "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "discarding the partial results" in caplog.text and not journal.exists()
    journal.write_text('{"journal": "tempbalance-analyze-journal", "version": 1, "source": "another"}\n')
    line = error_line(capsys, directory, "--json", tmp_path / "r.json", "--resume")
    assert "partial results of another analysis" in line and "source" in line


def test_broken_input_leaves_old_outputs_untouched(tmp_path, capsys):
    (tmp_path / "r.json").write_text("old")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    line = error_line(capsys, tmp_path / "bad.safetensors", "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv")
    assert "bad.safetensors" in line and "not a safetensors file" in line
    assert (tmp_path / "r.json").read_text() == "old" and not (tmp_path / "r.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "r.json"]


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "mps"])
def test_missing_device_is_one_line(capsys, device):
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 3:
        pytest.skip("this machine has the device")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has the device")
    line = error_line(capsys, "cnn-digits", "--in-channels", 1, "--device", device)
    assert f"--device '{device}'" in line and "available here: cpu" in line


@pytest.mark.slow
def test_cli_under_torchrun_writes_one_report(tmp_path):
    import os
    import subprocess
    import sys

    from tests.helpers.workers import free_port

    model, directory = gpt2_directory(tmp_path)
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tempbalance.cli", "analyze", str(directory), "--json", str(tmp_path / "r.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "layers" in outs[0][0] and outs[1][0] == ""  # rank 0 prints the table, rank 1 nothing
    assert json_alphas((tmp_path / "r.json").read_text()) == tb.analyze(model).alphas()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "r.json"]


# ---------------------------------------------------------------- FARMS


def test_cli_analyze_esd_flags(capsys):
    assert main(["analyze", "resnet18", "--esd", "farms", "--no-progress"]) == 0
    assert "18x32x64" in capsys.readouterr().out  # layer1's 3x3 64 -> 64 convs: 9 positions x 2 blocks of 32 x 64
    assert main(["analyze", "resnet18", "--esd", "farms", "--window-q", "1", "--no-progress"]) == 0
    assert "18x32x64" not in capsys.readouterr().out  # Q = 1: one 64 x 64 block per position
    assert main(["analyze", "resnet18", "--esd", "farms", "--window-q", "0.5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "window_q=0.5" in err
