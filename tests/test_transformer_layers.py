"""Tests for tempbalance.transformer_layers: norm detection, fused q/k/v splits, blocks.

Split matrices are checked against the models' own forward passes, alphas against a float64
numpy SVD with the median Hill formula re-derived here, block means against plain numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tempbalance import AnalysisOptions, MatrixOptions, analyze_layers, find_layers
from tempbalance.transformer_layers import (
    block_average,
    find_blocks,
    is_fused_qkv,
    is_norm_layer,
    merge_split_values,
    split_fused_qkv,
    split_parent,
    transformer_layers,
)

OPTS = MatrixOptions()


def _median_hill_alpha(w: np.ndarray) -> float:
    """Reference median Hill alpha (the published rule) from a float64 SVD."""
    eigs = np.sort(np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2)
    n_all = eigs.size
    i = n_all // 2
    n = n_all - i
    return 1 + n / (np.log(eigs[i:]).sum() - n * np.log(eigs[i]))


class LlamaStyleRMSNorm(nn.Module):
    """A custom RMSNorm as Hugging Face writes them (its own class, a 1-D weight)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Normalizer(nn.Module):
    """Not a norm layer: its name does not end in Norm and its weight is a matrix."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, 4))


class TinyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class TinyViT(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.blocks = nn.ModuleList(TinyBlock(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 10)


@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64, num_labels=2)
    return transformers.BertForSequenceClassification(config).eval()


def test_norm_layers_detected():
    assert is_norm_layer(nn.LayerNorm(8))
    assert is_norm_layer(nn.RMSNorm(8))
    assert is_norm_layer(nn.BatchNorm2d(8))
    assert is_norm_layer(nn.GroupNorm(2, 8))
    assert is_norm_layer(LlamaStyleRMSNorm(8))
    assert not is_norm_layer(nn.Linear(8, 8))
    assert not is_norm_layer(Normalizer())
    assert not is_norm_layer(nn.Sequential(nn.LayerNorm(8)))  # a container holds no parameter itself


def test_gpt2_norms_are_norm_layers(gpt2):
    names = [n for n, m in gpt2.named_modules() if is_norm_layer(m)]
    expected = [f"transformer.h.{i}.{ln}" for i in range(2) for ln in ("ln_1", "ln_2")] + ["transformer.ln_f"]
    assert names == expected


def test_gpt2_c_attn_split_matches_attention_forward(gpt2):
    refs = transformer_layers(gpt2)
    names = [r.name for r in refs]
    for i in range(2):
        for s in "qkv":
            assert f"transformer.h.{i}.attn.c_attn.{s}" in names
        assert f"transformer.h.{i}.attn.c_attn" not in names
    c_attn = gpt2.transformer.h[0].attn.c_attn
    x = torch.randn(5, 64)
    with torch.no_grad():
        out = c_attn(x) - c_attn.bias  # (5, 192): GPT-2 splits this into q, k, v along the last dim
    by_name = {r.name: r for r in refs}
    for j, s in enumerate("qkv"):
        mats = by_name[f"transformer.h.0.attn.c_attn.{s}"].matrices(OPTS)
        assert mats.shape == (1, 64, 64)
        torch.testing.assert_close(x @ mats[0].T, out[:, 64 * j: 64 * (j + 1)], rtol=1e-5, atol=1e-5)


def test_gpt2_embeddings_and_conv1d_found_tied_head_once(gpt2):
    refs = transformer_layers(gpt2, split_qkv=False)
    by_name = {r.name: r for r in refs}
    assert by_name["transformer.wte"].tied_names == ["lm_head"]
    assert "lm_head" not in by_name
    assert by_name["transformer.h.0.mlp.c_fc"].matrices(OPTS).shape == (1, 256, 64)  # (out, in) from Conv1D (in, out)
    assert "transformer.h.0.attn.c_attn" in by_name


def test_linear_qkv_split_matches_rows():
    torch.manual_seed(1)
    model = TinyViT()
    refs = transformer_layers(model)
    by_name = {r.name: r for r in refs}
    qkv = model.blocks[1].qkv
    x = torch.randn(3, 64)
    with torch.no_grad():
        out = qkv(x) - qkv.bias
    for j, s in enumerate("qkv"):
        mats = by_name[f"blocks.1.qkv.{s}"].matrices(OPTS)
        torch.testing.assert_close(x @ mats[0].T, out[:, 64 * j: 64 * (j + 1)])
    assert [r.name for r in refs][:2] == ["embed", "blocks.0.qkv.q"]


def test_split_only_fused_names_with_three_equal_parts():
    assert is_fused_qkv("blk.qkv", nn.Linear(8, 24))
    assert is_fused_qkv("blk.query_key_value", nn.Linear(8, 24))
    assert not is_fused_qkv("blk.fc", nn.Linear(8, 24))  # an MLP that happens to be 3x wide
    assert not is_fused_qkv("blk.qkv", nn.Linear(8, 20))  # grouped-query layout: unequal parts
    refs = find_layers(nn.Sequential(nn.Linear(8, 24)))
    assert [r.name for r in split_fused_qkv(refs)] == ["0"]


def test_multihead_attention_split():
    torch.manual_seed(2)
    model = nn.Sequential(nn.MultiheadAttention(64, 2))
    refs = transformer_layers(model)
    assert [r.name for r in refs] == ["0.q", "0.k", "0.v", "0.out_proj"]
    w = model[0].in_proj_weight.detach()
    for j, r in enumerate(refs[:3]):
        torch.testing.assert_close(r.matrices(OPTS)[0], w[64 * j: 64 * (j + 1)])


def test_split_alphas_match_float64_svd_reference(gpt2):
    refs = [r for r in transformer_layers(gpt2) if r.name.startswith("transformer.h.1.attn.c_attn.")]
    records = analyze_layers(refs, AnalysisOptions(precision="float64"))
    w = gpt2.transformer.h[1].attn.c_attn.weight.detach().numpy()  # (in, 3 * out)
    for j, rec in enumerate(records):
        expected = _median_hill_alpha(w[:, 64 * j: 64 * (j + 1)].T)
        assert rec.alpha == pytest.approx(expected, rel=1e-9)
    merged = merge_split_values({r.name: r.alpha for r in records})
    assert list(merged) == ["transformer.h.1.attn.c_attn"]
    assert merged["transformer.h.1.attn.c_attn"] == pytest.approx(np.mean([r.alpha for r in records]))


def test_merge_split_values_rules():
    values = {"a": 1.0, "b.q": 2.0, "b.k": float("nan"), "b.v": 4.0, "c.q": 5.0, "d": 6.0}
    merged = merge_split_values(values)
    assert list(merged) == ["a", "b", "c.q", "d"]  # c has no k/v: not a split trio, kept
    assert merged["b"] == pytest.approx(3.0)
    all_nan = merge_split_values({"x.q": float("nan"), "x.k": float("nan"), "x.v": float("nan")})
    assert math.isnan(all_nan["x"])
    assert merge_split_values(values, parents=["c"]) == values
    assert split_parent("h.0.attn.c_attn.k") == "h.0.attn.c_attn"
    assert split_parent("h.0.mlp.c_fc") is None


def test_blocks_gpt2_and_bert(gpt2, bert):
    names = [r.name for r in transformer_layers(gpt2)]
    blocks = find_blocks(gpt2, names)
    assert blocks["transformer.h.0.attn.c_attn.q"] == "transformer.h.0"
    assert blocks["transformer.h.1.mlp.c_proj"] == "transformer.h.1"
    assert blocks["transformer.wte"] == "transformer.wte"
    names = [r.name for r in transformer_layers(bert)]
    blocks = find_blocks(bert, names)
    assert blocks["bert.encoder.layer.1.attention.self.query"] == "bert.encoder.layer.1"
    assert blocks["bert.encoder.layer.0.output.dense"] == "bert.encoder.layer.0"
    assert blocks["classifier"] == "classifier"
    assert len(set(blocks.values())) == 2 + 3 + 2  # two layers, three embeddings, pooler + classifier


def test_blocks_sequential_and_top_level_split():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.MultiheadAttention(8, 2))
    names = ["0", "1.0", "2.q", "2.k", "2.v"]
    assert find_blocks(model, names) == {"0": "0", "1.0": "1", "2.q": "2", "2.k": "2", "2.v": "2"}
    vit = TinyViT()
    assert find_blocks(vit, ["embed", "blocks.1.qkv.v", "head"]) == {
        "embed": "embed", "blocks.1.qkv.v": "blocks.1", "head": "head"}


def test_block_average_matches_numpy():
    rng = np.random.default_rng(0)
    names = [f"b{i}.l{j}" for i in range(3) for j in range(4)] + ["head"]
    values = {n: float(rng.uniform(2, 6)) for n in names}
    values["b1.l2"] = float("nan")
    blocks = {n: n.split(".")[0] for n in names if n != "head"}
    out = block_average(values, blocks)
    assert list(out) == names
    for b in ("b0", "b1", "b2"):
        expected = np.nanmean([values[n] for n in names if n.startswith(b + ".")])
        for n in names:
            if n.startswith(b + "."):
                assert out[n] == pytest.approx(expected)
    assert out["head"] == values["head"]


def test_core_import_pulls_no_framework():
    import subprocess
    import sys

    code = (
        "import sys, tempbalance, tempbalance.transformer_layers, tempbalance.integrations\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_model_balancing_hooks_on_tiny_vit():
    """Per-block sigmoid factors on split-qkv alphas, re-derived here from numpy SVDs."""
    import tempbalance
    from tempbalance.transformer_layers import SplitQKVMetric, block_averaged_assign, model_balancing

    torch.manual_seed(3)
    model = TinyViT(depth=3)
    optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    tb = tempbalance.TempBalance(model, optimizer, **model_balancing(model, assign_options={"tau": 10.0, "s": 1.0}))
    assert tb.layers == [f"blocks.{i}.{p}" for i in range(3) for p in ("qkv", "proj")]
    metric = {}
    for i in range(3):
        w = model.blocks[i].qkv.weight.detach().numpy()
        metric[f"blocks.{i}.qkv"] = np.mean([_median_hill_alpha(w[64 * j: 64 * (j + 1)]) for j in range(3)])
        metric[f"blocks.{i}.proj"] = _median_hill_alpha(model.blocks[i].proj.weight.detach().numpy())
    recorded = {x.layer: x.metric for x in tb.history[-1].layers}
    assert recorded == pytest.approx(metric, rel=1e-8)
    block_means = np.array([(metric[f"blocks.{i}.qkv"] + metric[f"blocks.{i}.proj"]) / 2 for i in range(3)])
    phi = 1.0 / (1.0 + np.exp(-10.0 * (block_means - block_means.mean()))) - 0.5
    expected = 10.0 ** phi
    for i in range(3):
        assert tb.factors[f"blocks.{i}.qkv"] == pytest.approx(expected[i], rel=1e-9)
        assert tb.factors[f"blocks.{i}.proj"] == pytest.approx(expected[i], rel=1e-9)
    norm_group = next(g for g in optimizer.param_groups if any(p is model.blocks[1].norm.weight for p in g["params"]))
    assert norm_group["tb_layer"] == "blocks.0.proj"  # pre-norm: follows the Linear before it

    plain = SplitQKVMetric(model)
    assert plain.parts.keys() == {f"blocks.{i}.qkv" for i in range(3)}
    fallback = block_averaged_assign(["a", "b"], {"a": "x", "b": "x"}, "linear")
    assert fallback(np.array([2.0, 3.0, 4.0])) == pytest.approx([0.5, 1.0, 1.5])  # length mismatch: per layer


def test_register_norm_types_lets_custom_rmsnorm_follow():
    import tempbalance
    from tempbalance.transformer_layers import register_norm_types

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(64, 64)
            self.post_norm = LlamaStyleRMSNorm(64)

    model = nn.Sequential(nn.Linear(8, 64), Block(), Block(), nn.Linear(64, 2))
    assert register_norm_types(model) == [LlamaStyleRMSNorm]
    assert register_norm_types(model) == []
    plan = tempbalance.plan_balance(model)
    assert plan.norm_owner == {"1.post_norm": "1.up", "2.post_norm": "2.up"}


def test_model_balancing_rejects_unknown_option():
    from tempbalance.errors import ConfigError
    from tempbalance.transformer_layers import model_balancing

    with pytest.raises(ConfigError, match="remove_firts"):
        model_balancing(TinyViT(), remove_firts=False)
