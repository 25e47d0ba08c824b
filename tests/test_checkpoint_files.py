"""Tests of checkpoint sources: which files a path or ``hf:`` name resolves to, in which order,
the tensor lists read from headers, and one clear error per kind of broken input."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from torch import nn

import tempbalance as tb
from tempbalance.checkpoint_files import (
    CheckpointFileError,
    SafetensorsShard,
    TorchShard,
    find_state_dict,
    natural_key,
    open_checkpoint,
    strip_wrapper_prefixes,
)
from tempbalance.errors import ConfigError

safetensors_torch = pytest.importorskip("safetensors.torch")


def save_st(path, tensors: dict) -> None:
    safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def raw_safetensors(path, header: dict, data: bytes) -> None:
    """A safetensors file written by hand: 8-byte little-endian header length, JSON, data."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_header_gives_shapes_and_dtypes_without_reading_data(tmp_path):
    save_st(tmp_path / "m.safetensors", {"a.weight": torch.zeros(3, 4), "b.weight": torch.zeros(5, 2).bfloat16()})
    shard = SafetensorsShard(tmp_path / "m.safetensors")
    infos = {i.key: (i.shape, i.dtype, i.stored_dtype) for i in shard.tensors()}
    assert infos == {"a.weight": ((3, 4), torch.float32, "F32"), "b.weight": ((5, 2), torch.bfloat16, "BF16")}
    assert torch.equal(shard.read("b.weight"), torch.zeros(5, 2).bfloat16())


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_prefetch_asks_the_os_for_exactly_that_tensors_bytes(tmp_path, monkeypatch):
    tensors = {"a.weight": torch.randn(3, 4), "b.weight": torch.randn(5, 7).bfloat16(), "c.bias": torch.randn(6).half()}
    path = tmp_path / "m.safetensors"
    save_st(path, tensors)
    hints = []

    def fadvise(descriptor, offset, length, advice):
        hints.append((os.readlink(f"/proc/self/fd/{descriptor}") if os.path.isdir("/proc/self/fd") else str(path),
                      offset, length, advice))

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    shard = SafetensorsShard(path)
    raw = path.read_bytes()
    for key, tensor in tensors.items():
        hints.clear()
        shard.prefetch(key)
        [(file, offset, length, advice)] = hints
        assert os.path.samefile(file, path) and advice == os.POSIX_FADV_WILLNEED
        expected = tensor.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()  # its bytes, as stored
        assert raw[offset : offset + length] == expected, key


def test_a_failed_prefetch_is_only_logged(tmp_path, monkeypatch, caplog):
    save_st(tmp_path / "m.safetensors", {"a.weight": torch.randn(3, 4)})
    shard = SafetensorsShard(tmp_path / "m.safetensors")

    def refuse(*args):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse, raising=False)
    with caplog.at_level("DEBUG", logger="tempbalance.checkpoint_files"):
        shard.prefetch("a.weight")
    assert "prefetch" in caplog.text and "Invalid argument" in caplog.text
    monkeypatch.delattr(os, "posix_fadvise")
    shard.prefetch("a.weight")  # a platform without it: nothing to do
    assert shard.read("a.weight").shape == (3, 4)


def test_natural_order_and_prefix_stripping():
    names = ["layers.10.fc", "layers.2.fc", "layers.1.fc", "embed"]
    assert sorted(names, key=natural_key) == ["embed", "layers.1.fc", "layers.2.fc", "layers.10.fc"]
    state = {"module._orig_mod.fc.weight": torch.zeros(1), "_orig_mod.module.x": torch.zeros(1), "module_x": torch.zeros(1)}
    assert list(strip_wrapper_prefixes(state)) == ["fc.weight", "x", "module_x"]


def test_nested_state_dicts_are_found():
    sd = {"fc.weight": torch.zeros(2, 2)}
    assert find_state_dict(sd) is sd
    assert find_state_dict({"epoch": 1, "model": sd}) is sd
    assert find_state_dict({"checkpoint": 1, "state_dict": {"model": sd}}) is sd
    assert find_state_dict({"epoch": 1, "note": "x"}) is None


def test_directory_prefers_the_index_and_orders_shards_by_it(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    save_st(d / "model-00002-of-00002.safetensors", {"model.layers.10.mlp.weight": torch.randn(4, 4)})
    save_st(d / "model-00001-of-00002.safetensors", {"model.layers.2.mlp.weight": torch.randn(4, 4)})
    save_st(d / "unrelated.safetensors", {"x.weight": torch.randn(4, 4)})  # not in the index: not read
    index = {"weight_map": {"model.layers.10.mlp.weight": "model-00002-of-00002.safetensors",
                            "model.layers.2.mlp.weight": "model-00001-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    source = open_checkpoint(d)
    assert [s.label.rsplit("/", 1)[1] for s in source.shards] == ["model-00001-of-00002.safetensors",
                                                                   "model-00002-of-00002.safetensors"]
    assert tb.analyze(d).names == ["model.layers.2.mlp", "model.layers.10.mlp"]
    (d / "model.safetensors.index.json").unlink()
    assert tb.analyze(d).names == ["model.layers.2.mlp", "model.layers.10.mlp", "x"]  # every file, natural order


def test_single_model_safetensors_wins_over_other_files(tmp_path):
    save_st(tmp_path / "model.safetensors", {"fc.weight": torch.randn(6, 8)})
    save_st(tmp_path / "adapter_model.safetensors", {"lora.weight": torch.randn(6, 8)})
    assert tb.analyze(tmp_path).names == ["fc"]


def test_bin_shards_and_a_single_torch_file_in_a_directory(tmp_path):
    d = tmp_path / "bins"
    d.mkdir()
    torch.save({"b.weight": torch.randn(5, 7)}, d / "pytorch_model-00002-of-00002.bin")
    torch.save({"a.weight": torch.randn(5, 7)}, d / "pytorch_model-00001-of-00002.bin")
    assert tb.analyze(d).names == ["a", "b"]
    e = tmp_path / "one"
    e.mkdir()
    torch.save({"model": {"fc.weight": torch.randn(5, 7)}}, e / "weights.pth")
    assert tb.analyze(e).names == ["fc"]


def test_legacy_torch_format_is_read(tmp_path):
    torch.save({"fc.weight": torch.randn(9, 11)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    shard = TorchShard(tmp_path / "old.pt")
    assert [i.key for i in shard.tensors()] == ["fc.weight"]
    assert tb.analyze(tmp_path / "old.pt").names == ["fc"]


def test_tied_tensors_in_a_torch_file(tmp_path):
    emb = torch.randn(50, 16)
    torch.save({"emb.weight": emb, "mid.weight": torch.randn(16, 16), "head.weight": emb}, tmp_path / "t.pt")
    source = open_checkpoint(tmp_path / "t.pt")
    assert source.ties == {"emb.weight": ["head.weight"]}
    assert [i.key for i in source.tensors()] == ["emb.weight", "mid.weight"]
    report = tb.analyze(tmp_path / "t.pt")
    assert report["emb"].tied_names == ["head"] and report["head"] is report["emb"]


def test_pickled_module_needs_allow_pickle(tmp_path):
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(CheckpointFileError, match="holds pickled Python objects.*allow_pickle=True"):
        open_checkpoint(tmp_path / "whole.pt")
    opened = open_checkpoint(tmp_path / "whole.pt", allow_pickle=True)
    assert isinstance(opened, nn.Sequential)
    assert tb.analyze(tmp_path / "whole.pt", allow_pickle=True).alphas() == tb.analyze(model).alphas()


# ----------------------------------------------------------------------------- broken input


@pytest.mark.parametrize("cut", [4, 30, -10])
def test_truncated_safetensors(tmp_path, cut):
    save_st(tmp_path / "m.safetensors", {"a.weight": torch.randn(8, 8), "b.weight": torch.randn(8, 8)})
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:cut])
    with pytest.raises(CheckpointFileError, match=r"m\.safetensors.*(truncated|not a safetensors file)"):
        open_checkpoint(tmp_path / "m.safetensors")


def test_garbage_safetensors(tmp_path):
    (tmp_path / "g.safetensors").write_bytes(struct.pack("<Q", 12) + b"not json at all, no")
    with pytest.raises(CheckpointFileError, match=r"g\.safetensors: not a safetensors file \(its header is not JSON"):
        open_checkpoint(tmp_path / "g.safetensors")
    raw_safetensors(tmp_path / "h.safetensors", {"a.weight": {"dtype": "F32", "shape": [2, 2]}}, b"\0" * 16)
    with pytest.raises(CheckpointFileError, match="entry 'a.weight' lacks"):
        open_checkpoint(tmp_path / "h.safetensors")
    raw_safetensors(tmp_path / "s.safetensors", {"a.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}},
                    b"\0" * 16)
    with pytest.raises(CheckpointFileError, match="should take 24 bytes"):
        open_checkpoint(tmp_path / "s.safetensors")


def test_unsupported_dtype_names_file_tensor_and_accepted(tmp_path):
    raw_safetensors(tmp_path / "c.safetensors", {"fc.weight": {"dtype": "C64", "shape": [4, 4], "data_offsets": [0, 128]}},
                    b"\0" * 128)
    with pytest.raises(CheckpointFileError, match=r"c\.safetensors: tensor 'fc.weight' is stored as C64.*accepted: F64, F32"):
        tb.analyze(tmp_path / "c.safetensors")
    torch.save({"fc.weight": torch.zeros(4, 4, dtype=torch.complex64)}, tmp_path / "c.pt")
    with pytest.raises(CheckpointFileError, match="stored as torch.complex64"):
        tb.analyze(tmp_path / "c.pt")


def test_directory_without_weights_and_missing_shard(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointFileError, match="no checkpoint weights found"):
        open_checkpoint(tmp_path)
    save_st(tmp_path / "model-00001-of-00002.safetensors", {"a.weight": torch.randn(3, 3)})
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFileError, match="names shard.*model-00002-of-00002.safetensors, missing from"):
        open_checkpoint(tmp_path)
    index["weight_map"] = {"zzz.weight": "model-00001-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFileError, match="says tensor 'zzz.weight' is in model-00001"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointFileError, match="not a readable index file"):
        open_checkpoint(tmp_path)


def test_bin_that_needs_code_is_refused(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    torch.save({"fc.weight": torch.randn(3, 3), "extra": nn.ReLU()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointFileError, match=r"pytorch_model\.bin: holds pickled Python objects.*torch\.nn"):
        open_checkpoint(d)


def test_no_analysable_weights(tmp_path):
    save_st(tmp_path / "m.safetensors", {"a.bias": torch.randn(3), "mask": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(CheckpointFileError, match="no analysable weights"):
        tb.analyze(tmp_path / "m.safetensors")


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no such checkpoint file or directory"):
        open_checkpoint("/nonexistent/model.safetensors")


# ----------------------------------------------------------------------------- hf:


def make_hf_cache(cache, repo: str, revision_hash: str, files: dict) -> None:
    """The Hugging Face cache layout: models--ORG--NAME/{refs/main, blobs/, snapshots/<hash>/} with
    each snapshot file a symlink to its blob."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision_hash)
    (root / "blobs").mkdir()
    snapshot = root / "snapshots" / revision_hash
    snapshot.mkdir(parents=True)
    for name, writer in files.items():
        blob = root / "blobs" / f"blob-{name}"
        writer(blob)
        (snapshot / name).symlink_to(blob)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hf_source_from_an_offline_cache(offline_hub):
    torch.manual_seed(0)
    weights = {"model.layers.0.self_attn.q_proj.weight": torch.randn(32, 32), "lm_head.weight": torch.randn(50, 32)}
    make_hf_cache(offline_hub, "org/tiny", "a" * 40, {
        "config.json": lambda p: p.write_text("{}"),
        "model.safetensors": lambda p: save_st(p, weights),
    })
    report = tb.analyze("hf:org/tiny")
    assert sorted(report.names) == ["lm_head", "model.layers.0.self_attn.q_proj"]
    assert tb.analyze("hf:org/tiny@" + "a" * 40).alphas() == report.alphas()


def test_hf_source_neither_cached_nor_downloadable(offline_hub):
    with pytest.raises(CheckpointFileError) as error:
        open_checkpoint("hf:org/absent@v1")
    message = str(error.value)
    assert message.startswith("hf:org/absent@v1: not in the local Hugging Face cache (")
    assert str(offline_hub) in message and "downloading it failed" in message
    with pytest.raises(ConfigError, match="not a Hugging Face source"):
        open_checkpoint("hf:bad name!")


# --- strip_wrapper_prefixes: a DDP- or torch.compile-wrapped state dict loads into the bare model, its
# _metadata renamed with the keys, the caller's dict left as it was


class Wrapper(nn.Module):
    """Stands in for DDP (``module``) or torch.compile (``_orig_mod``): the same key prefixes."""

    def __init__(self, attribute: str, inner: nn.Module):
        super().__init__()
        setattr(self, attribute, inner)


def bare() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))


def test_a_wrapped_state_dict_loads_into_the_bare_model():
    torch.manual_seed(0)
    inner = bare()
    state = Wrapper("module", Wrapper("_orig_mod", inner)).state_dict()
    keys_before = list(state)
    stripped = strip_wrapper_prefixes(state)
    assert list(stripped) == list(inner.state_dict())  # every key, in module order
    assert list(state) == keys_before  # the caller's dict is untouched
    assert set(stripped._metadata) == set(inner.state_dict()._metadata)
    assert stripped._metadata["1"]["version"] == inner.state_dict()._metadata["1"]["version"]
    target = bare()
    target.load_state_dict(stripped, strict=True)
    for name, tensor in inner.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor)


def test_a_plain_mapping_without_metadata_keeps_its_order():
    state = {"head.weight": 1, "module.body.weight": 2, "_orig_mod.module.tail.weight": 3, "modulex": 4}
    stripped = strip_wrapper_prefixes(state)
    assert list(stripped.items()) == [("head.weight", 1), ("body.weight", 2), ("tail.weight", 3), ("modulex", 4)]
    assert not hasattr(stripped, "_metadata")
