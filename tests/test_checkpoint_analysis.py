"""Tests of ``analyze(checkpoint)``: a file gives the same report as its module (torchvision,
timm, transformers; float32, bf16, fp16; wrapped, nested, sharded, tied), memory stays bounded
while streaming (peak RSS of a child process), an interrupted analysis resumes, and the work
splits across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import tempbalance as tb
from tempbalance import checkpoint_analysis, checkpoint_files
from tempbalance.checkpoint_analysis import AnalysisJournal, analyze_checkpoint, journal_header
from tempbalance.checkpoint_files import open_checkpoint
from tempbalance.errors import ConfigError

safetensors_torch = pytest.importorskip("safetensors.torch")


def without_kind(record) -> dict:
    """A record's fields, less ``kind`` (a file says "matrix" / "conv2d", a module its class)."""
    d = record.to_dict(with_eigenvalues=True)
    d.pop("kind")
    return d


def assert_same_report(from_file, from_module, ordered: bool = True):
    """Same layers (same order when ``ordered``) and every number bit-identical."""
    if ordered:
        assert from_file.names == from_module.names
    else:
        assert sorted(from_file.names) == sorted(from_module.names)
    for name in from_module.names:
        assert without_kind(from_file[name]) == without_kind(from_module[name]), name


# ----------------------------------------------------------------------------- same report as the module


def test_torchvision_state_dicts_with_and_without_wrappers(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    expected = tb.analyze(model)
    sd = model.state_dict()
    payloads = {
        "ddp.pth": {f"module.{k}": v for k, v in sd.items()},
        "nested.pt": {"epoch": 4, "state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}, "optimizer": {}},
    }
    for name, payload in payloads.items():
        torch.save(payload, tmp_path / name)
        assert_same_report(tb.analyze(tmp_path / name), expected)
    assert_same_report(tb.analyze(sd), expected)  # an in-memory state dict


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_safetensors_file(tmp_path, dtype):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    model = torchvision.models.squeezenet1_1(num_classes=7).to(dtype)
    safetensors_torch.save_file(model.state_dict(), tmp_path / "model.safetensors")
    from_file = tb.analyze(tmp_path / "model.safetensors", precision="float64")
    assert_same_report(from_file, tb.analyze(model, precision="float64"), ordered=False)
    first = from_file["features.0"]
    assert first.shape == tuple(model.features[0].weight.shape) and first.kind == "conv2d"


def test_timm_vit_with_fused_qkv(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(2)
    model = timm.create_model("test_vit", pretrained=False)
    safetensors_torch.save_file(model.state_dict(), tmp_path / "vit.safetensors")
    assert_same_report(tb.analyze(tmp_path / "vit.safetensors"), tb.analyze(model), ordered=False)
    split = tb.analyze(tmp_path / "vit.safetensors", split_qkv=True)
    assert_same_report(split, tb.analyze(model, split_qkv=True), ordered=False)
    qkv = model.blocks[0].attn.qkv.weight.detach().double().numpy()  # (3e, e): q, k, v are row blocks
    e = qkv.shape[1]
    for i, part in enumerate("qkv"):
        eigs = np.sort(np.linalg.svd(qkv[i * e : (i + 1) * e], compute_uv=False) ** 2)
        np.testing.assert_allclose(split[f"blocks.0.attn.qkv.{part}"].lambda_max, eigs[-1], rtol=1e-5)


def tiny_gpt2(dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.GPT2Config(n_layer=3, n_embd=48, n_head=4, vocab_size=300, n_positions=64)
    return transformers.GPT2LMHeadModel(config).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_gpt2_sharded_safetensors(tmp_path, dtype):
    model = tiny_gpt2(dtype)
    model.save_pretrained(tmp_path / "gpt2", max_shard_size="60KB")
    shards = sorted(p.name for p in (tmp_path / "gpt2").glob("*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "gpt2" / "model.safetensors.index.json").exists()
    for split in (False, True):
        from_file = tb.analyze(tmp_path / "gpt2", split_qkv=split)
        assert_same_report(from_file, tb.analyze(model, split_qkv=split), ordered=False)
    # the tied LM head is stored once, as the embedding: listed under both names, as for the module
    assert from_file["transformer.wte"].tied_names == ["lm_head"]
    assert from_file["lm_head"] is from_file["transformer.wte"]
    w = model.transformer.h[1].attn.c_attn.weight.detach().double().numpy()  # Conv1D: (in, out)
    v = w[:, 2 * 48 :]
    eigs = np.sort(np.linalg.svd(v, compute_uv=False) ** 2)
    np.testing.assert_allclose(from_file["transformer.h.1.attn.c_attn.v"].lambda_max, eigs[-1], rtol=1e-5)


def write_bin_shards(state: dict, directory, shards: int) -> None:
    """The Hugging Face layout of ``.bin`` shards: ``pytorch_model-0000N-of-0000M.bin`` in module
    order and ``pytorch_model.bin.index.json`` mapping each key to its shard."""
    directory.mkdir()
    keys = list(state)
    weight_map = {}
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k].clone() for k in keys[s * len(keys) // shards : (s + 1) * len(keys) // shards]}
        torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_transformers_llama_bin_shards_in_block_order(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=200, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    write_bin_shards(model.state_dict(), tmp_path / "llama", shards=5)
    from_file = tb.analyze(tmp_path / "llama")
    assert_same_report(from_file, tb.analyze(model))  # .bin state dicts keep module order
    safe = tmp_path / "llama-st"
    model.save_pretrained(safe, max_shard_size="40KB")
    names = tb.analyze(safe).names  # safetensors headers are sorted by name: natural order, 2 before 10
    blocks = [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]
    assert blocks == sorted(blocks) and blocks[-1] == 11


def test_multihead_attention_and_tied_weights_in_a_pt_file(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(90, 64)
            self.attn = nn.MultiheadAttention(64, 4)
            self.conv = nn.Conv1d(64, 32, 3)
            self.head = nn.Linear(64, 90, bias=False)
            self.head.weight = self.emb.weight

    torch.manual_seed(5)
    model = Net()
    torch.save(model.state_dict(), tmp_path / "net.pt")
    for split in (False, True):
        from_file = tb.analyze(tmp_path / "net.pt", split_qkv=split)
        assert_same_report(from_file, tb.analyze(model, split_qkv=split))
    assert from_file.names == ["emb", "attn.q", "attn.k", "attn.v", "attn.out_proj", "conv"]
    assert from_file["head"].name == "emb" and from_file["emb"].tied_names == ["head"]


def test_project_training_checkpoint_needs_no_architecture(tmp_path):
    """``tempbalance train``'s checkpoint.pt: weights beside optimizer, scheduler and RNG state
    (numpy arrays); a width-0.25, 1-channel model is read without --width / --in-channels."""
    from tempbalance.train.checkpoint import rng_state, save_checkpoint
    from tempbalance.train.models import create_model

    torch.manual_seed(6)
    model = create_model("resnet18", 10, in_channels=1, width=0.25)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    optimizer.step()
    run = tmp_path / "run"
    save_checkpoint({"format": 1, "epoch": 3, "config": {"model": "resnet18", "width": 0.25},
                     "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state()}, run)
    expected = tb.analyze(model)
    assert_same_report(tb.analyze(run / "checkpoint.pt"), expected)
    assert_same_report(tb.analyze(run), expected)  # the run directory itself


def test_float8_weights_are_upcast(tmp_path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    torch.manual_seed(7)
    w = (torch.randn(64, 96) * 0.5).to(torch.float8_e4m3fn)
    safetensors_torch.save_file({"fc.weight": w}, tmp_path / "f8.safetensors")
    record = tb.analyze(tmp_path / "f8.safetensors", precision="float64")["fc"]
    eigs = np.sort(np.linalg.svd(w.float().double().numpy(), compute_uv=False) ** 2)
    np.testing.assert_allclose(record.lambda_max, eigs[-1], rtol=1e-10)
    assert record.num_eigs == 64


def test_nan_weights_give_nan_alpha_with_reason(tmp_path):
    w = torch.randn(40, 60)
    w[3, 4] = float("nan")
    safetensors_torch.save_file({"a.weight": w, "b.weight": torch.randn(40, 60)}, tmp_path / "m.safetensors")
    report = tb.analyze(tmp_path / "m.safetensors")
    assert np.isnan(report["a"].alpha) and "non-finite" in report["a"].reason
    assert np.isfinite(report["b"].alpha)


def test_skipped_tensors(tmp_path):
    state = {
        "fc.weight": torch.randn(30, 20),
        "fc.bias": torch.randn(30),                      # not a weight
        "norm.weight": torch.randn(30),                  # 1-D
        "attn.bias": torch.ones(1, 1, 8, 8),             # a buffer (GPT-2's mask)
        "q.weight": torch.randint(0, 9, (30, 20), dtype=torch.int32),  # integer (quantised)
        "pos_embed": torch.randn(1, 10, 20),             # a parameter that is no layer's weight
        "conv3.weight": torch.randn(8, 4, 2, 2, 2),      # 5-D: Conv3d
    }
    safetensors_torch.save_file(state, tmp_path / "m.safetensors")
    report = tb.analyze(tmp_path / "m.safetensors")
    assert report.names == ["conv3", "fc"]
    assert report["conv3"].kind == "conv3d" and report["conv3"].num_matrices == 8


# ----------------------------------------------------------------------------- bounded memory

RSS_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import tempbalance as tb
    torch.set_num_threads(1)
    kind, path, warm, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    def reset_peak():                            # Linux: VmHWM := VmRSS
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")

    tb.analyze(warm, batch_bytes=batch)          # libraries and eigensolver workspaces loaded
    reset_peak()
    before = status("VmRSS")
    report = tb.analyze(path, batch_bytes=batch)
    streamed = status("VmHWM") - before
    reset_peak()
    before = status("VmRSS")
    if kind == "safetensors":                    # the control: reading the whole checkpoint at once
        from safetensors.torch import load_file
        whole = load_file(path)
    else:
        whole = torch.load(path, weights_only=True)
    whole = {k: v.float() for k, v in whole.items()}
    print(json.dumps({"layers": len(report), "streamed": streamed, "whole": status("VmHWM") - before}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak RSS")
@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_peak_memory_does_not_grow_with_the_checkpoint(tmp_path, kind):
    """64 bf16 tensors of 512 x 1024 (64 MiB; 128 MiB upcast): streaming with an 8 MiB batch
    budget must stay far below the checkpoint, the whole-file control far above."""
    torch.manual_seed(8)
    state = {f"blocks.{i}.fc.weight": torch.randn(512, 1024).bfloat16() for i in range(64)}
    warm = {"w.weight": torch.randn(512, 1024).bfloat16()}
    if kind == "safetensors":
        path, warm_path = tmp_path / "m.safetensors", tmp_path / "warm.safetensors"
        safetensors_torch.save_file(state, path)
        safetensors_torch.save_file(warm, warm_path)
    else:
        path, warm_path = tmp_path / "pytorch_model.bin", tmp_path / "warm.bin"
        torch.save(state, path)
        torch.save(warm, warm_path)
    checkpoint_bytes = sum(t.numel() * t.element_size() for t in state.values())
    del state
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, kind, str(path), str(warm_path), str(8 << 20)],
                         capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["layers"] == 64
    assert result["whole"] > 1.5 * checkpoint_bytes  # the measurement sees a whole load
    assert result["streamed"] < 0.5 * checkpoint_bytes, result


def test_tensors_alive_at_once_stay_within_the_batch_budget(tmp_path, monkeypatch):
    torch.manual_seed(9)
    state = {f"l{i}.weight": torch.randn(64, 128) for i in range(20)}  # 32 KiB each in float32
    safetensors_torch.save_file(state, tmp_path / "m.safetensors")
    alive, peak = [0], [0]
    upcast = checkpoint_analysis._upcast

    def released():
        alive[0] -= 1

    def tracked(tensor, device):
        out = upcast(tensor, device)
        alive[0] += 1
        weakref.finalize(out, released)
        peak[0] = max(peak[0], alive[0])
        return out

    monkeypatch.setattr(checkpoint_analysis, "_upcast", tracked)
    report = tb.analyze(tmp_path / "m.safetensors", batch_bytes=3 * 32 * 1024)
    assert len(report) == 20
    assert peak[0] == 3  # a batch of three, released before the next is read
    assert_same_report(report, tb.analyze(tmp_path / "m.safetensors"))


# ----------------------------------------------------------------------------- resume


def write_checkpoint(directory, n: int = 12):
    torch.manual_seed(10)
    directory.mkdir()
    for s in range(3):
        shard = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(48, 80) for i in range(s * n // 3, (s + 1) * n // 3)}
        safetensors_torch.save_file(shard, directory / f"model-0000{s + 1}-of-00003.safetensors")
    return directory


READ = checkpoint_files.SafetensorsShard.read


class Interrupt:
    """Patches ``SafetensorsShard.read``: counts reads, raises KeyboardInterrupt at read ``stop``."""

    def __init__(self, monkeypatch, stop: int | None):
        self.reads, self.stop = [], stop
        original = READ

        def read(shard, key):
            if self.stop is not None and len(self.reads) == self.stop:
                raise KeyboardInterrupt
            self.reads.append(key)
            return original(shard, key)

        monkeypatch.setattr(checkpoint_files.SafetensorsShard, "read", read)


def test_interrupted_analysis_resumes_without_redoing_finished_tensors(tmp_path, monkeypatch):
    directory = write_checkpoint(tmp_path / "ckpt")
    expected = tb.analyze(directory, keep_eigenvalues=True)
    journal = tmp_path / "partial.jsonl"
    first = Interrupt(monkeypatch, stop=7)
    with pytest.raises(KeyboardInterrupt):
        tb.analyze(directory, journal=journal, batch_bytes=1, keep_eigenvalues=True)  # batches of one tensor
    assert len(journal.read_text().splitlines()) == 1 + 7  # header + one line per finished tensor
    second = Interrupt(monkeypatch, stop=None)
    resumed = tb.analyze(directory, journal=journal, batch_bytes=1, keep_eigenvalues=True)
    assert set(second.reads).isdisjoint(first.reads) and len(second.reads) == 12 - 7
    assert_same_report(resumed, expected)


def test_each_tensor_is_prefetched_while_the_one_before_it_is_read(tmp_path, monkeypatch):
    directory = write_checkpoint(tmp_path / "ckpt")
    expected = tb.analyze(directory, keep_eigenvalues=True)
    events = []
    original_prefetch = checkpoint_files.SafetensorsShard.prefetch

    def prefetch(shard, key):
        events.append(("prefetch", key))
        original_prefetch(shard, key)

    def read(shard, key):
        events.append(("read", key))
        return READ(shard, key)

    monkeypatch.setattr(checkpoint_files.SafetensorsShard, "prefetch", prefetch)
    monkeypatch.setattr(checkpoint_files.SafetensorsShard, "read", read)
    report = tb.analyze(directory, keep_eigenvalues=True)
    reads = [key for kind, key in events if kind == "read"]
    assert sorted(reads) == sorted(f"model.layers.{i}.mlp.up_proj.weight" for i in range(12))
    # the next tensor's hint comes just before the current tensor is read, across shard boundaries too
    expected_events = [e for i, key in enumerate(reads) for e in ([("prefetch", reads[i + 1])] if i + 1 < len(reads) else []) + [("read", key)]]
    assert events == expected_events
    assert_same_report(report, expected)


def test_journal_survives_a_torn_line_and_refuses_other_settings(tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt")
    journal = tmp_path / "partial.jsonl"
    full = tb.analyze(directory, journal=journal)
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2])  # killed mid-line
    source = open_checkpoint(directory)
    book = AnalysisJournal(journal, journal_header(source, tb.AnalysisOptions(), False))
    assert len(book.load()) == 4
    assert journal.read_text() == "".join(lines[:5])  # the torn line is gone before anything is appended
    assert_same_report(tb.analyze(directory, journal=journal), full)
    with pytest.raises(ConfigError, match="partial results of another analysis.*fit"):
        tb.analyze(directory, journal=journal, fit="ks")


# ----------------------------------------------------------------------------- ranks

RANK_CHILD = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    import tempbalance as tb
    from tempbalance import checkpoint_files
    reads = []
    original = checkpoint_files.SafetensorsShard.read
    checkpoint_files.SafetensorsShard.read = lambda shard, key: reads.append(key) or original(shard, key)
    dist.init_process_group("gloo")
    report = tb.analyze(sys.argv[1], journal=sys.argv[2])
    print(json.dumps({"reads": reads, "alphas": report.alphas()}))
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_ranks_split_the_tensors_and_agree(tmp_path):
    from tests.helpers.workers import free_port

    directory = write_checkpoint(tmp_path / "ckpt")
    expected = tb.analyze(directory).alphas()
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_CHILD, str(directory), str(tmp_path / "j.jsonl")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for result in results:
        assert result["alphas"] == expected
    reads = [set(r["reads"]) for r in results]
    assert reads[0].isdisjoint(reads[1]) and len(reads[0] | reads[1]) == 12 and reads[0] and reads[1]
    assert sorted(p.name for p in tmp_path.glob("j.jsonl.rank*")) == ["j.jsonl.rank0", "j.jsonl.rank1"]


def test_analyze_checkpoint_rejects_a_bad_batch_budget(tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="batch_bytes=0"):
        analyze_checkpoint(open_checkpoint(directory), batch_bytes=0)
