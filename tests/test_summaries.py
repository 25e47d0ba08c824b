"""Tests of the name-based summaries: block index and module type of the usual Transformer
names, and per-group alpha statistics against numpy."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from tempbalance.summaries import block_index, module_type, summarize


@pytest.mark.parametrize("name, block, kind", [
    ("model.layers.13.self_attn.q_proj", 13, "self_attn.q_proj"),
    ("transformer.h.2.attn.c_proj", 2, "attn.c_proj"),
    ("transformer.h.2.mlp.c_proj", 2, "mlp.c_proj"),
    ("bert.encoder.layer.0.attention.self.query", 0, "attention.self.query"),
    ("blocks.7.attn.qkv.k", 7, "attn.qkv.k"),
    ("layers.3.feed_forward.w1", 3, "feed_forward.w1"),
    ("encoder.block.1.layer.0.SelfAttention.q", 1, "layer.0.SelfAttention.q"),  # the outer block counts
    ("model.embed_tokens", None, "model.embed_tokens"),
    ("lm_head", None, "lm_head"),
    ("layer1.0.conv1", None, "layer1.0.conv1"),  # a ResNet stage is not a numbered Transformer block
])
def test_block_and_module_type(name, block, kind):
    assert block_index(name) == block
    assert module_type(name) == kind


def records(pairs):
    return [SimpleNamespace(name=n, alpha=a) for n, a in pairs]


def test_summarize_by_block_and_module_against_numpy():
    rng = np.random.default_rng(0)
    pairs = [(f"model.layers.{b}.{m}", float(rng.uniform(2, 6))) for b in (2, 0, 1) for m in ("self_attn.q_proj", "mlp.up_proj")]
    pairs += [("model.layers.1.mlp.down_proj", float("nan")), ("lm_head", 4.5), ("model.embed_tokens", 3.5)]
    by_block = summarize(records(pairs), "block")
    assert [g.group for g in by_block] == [0, 1, 2, None]
    for g in by_block:
        alphas = [a for n, a in pairs if block_index(n) == g.group]
        finite = [a for a in alphas if not math.isnan(a)]
        assert (g.layers, g.fitted) == (len(alphas), len(finite))
        assert g.mean_alpha == pytest.approx(np.mean(finite), rel=1e-12)
        assert g.median_alpha == pytest.approx(np.median(finite), rel=1e-12)
        assert (g.min_alpha, g.max_alpha) == (min(finite), max(finite))
    by_module = summarize(records(pairs), "module")
    assert [g.group for g in by_module] == ["self_attn.q_proj", "mlp.up_proj", "mlp.down_proj", "lm_head",
                                             "model.embed_tokens"]
    down = by_module[2]
    assert down.layers == 1 and down.fitted == 0 and math.isnan(down.mean_alpha)
    up = by_module[1]
    assert up.median_alpha == pytest.approx(np.median([a for n, a in pairs if n.endswith("up_proj")]), rel=1e-12)
    with pytest.raises(ValueError, match="by='layer'"):
        summarize(records(pairs), "layer")
