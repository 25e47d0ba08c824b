"""The one q/k/v splitter and its name rule, on refs whose module is a stand-in (tensors read from
a checkpoint file): the parts are the row / column blocks of the weight, checked against slicing
written out here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tempbalance.layers import LayerRef, MatrixOptions, find_layers
from tempbalance.qkv import fused_qkv_layout, is_fused_qkv, is_fused_qkv_name, qkv_parts, split_fused_qkv

OPTS = MatrixOptions()


def _rows(w, module, options):
    return w.reshape(1, w.shape[0], -1)


def _columns(w, module, options):
    return w.t().unsqueeze(0)


@pytest.mark.parametrize(
    "name, fused",
    [
        ("transformer.h.0.attn.c_attn", True),
        ("transformer.h.0.attn.c_attn.weight", True),
        ("blocks.3.attn.qkv", True),
        ("gpt_neox.layers.0.attention.query_key_value.weight", True),
        ("layers.0.Wqkv", True),
        ("mha.in_proj", True),
        ("blocks.3.mlp.fc1", False),
        ("blocks.3.attn.q_proj.weight", False),
    ],
)
def test_the_name_rule(name, fused):
    assert is_fused_qkv_name(name) is fused


def test_layout_from_kind_and_shape():
    assert fused_qkv_layout("Linear", (192, 64)) == "rows"
    assert fused_qkv_layout("Conv1D", (64, 192)) == "columns"
    assert fused_qkv_layout("Linear", (160, 64)) is None  # grouped-query: unequal parts
    assert fused_qkv_layout("Conv2d", (192, 64)) is None
    assert fused_qkv_layout("Linear", (192, 64, 1)) is None


def test_stand_in_refs_split_like_the_stored_weight():
    torch.manual_seed(0)
    stand_in = nn.Module()  # no weight, no class of its own: only name, kind and shape count
    rows = LayerRef("h.0.attn.qkv", stand_in, "Linear", torch.randn(192, 64), _rows)
    columns = LayerRef("h.0.attn.c_attn", stand_in, "Conv1D", torch.randn(64, 192), _columns)
    for ref, block in ((rows, lambda w, j: w[64 * j: 64 * (j + 1)]), (columns, lambda w, j: w[:, 64 * j: 64 * (j + 1)].t())):
        parts = qkv_parts(ref)
        assert [p.name for p in parts] == [f"{ref.name}.{s}" for s in "qkv"]
        for j, part in enumerate(parts):
            assert torch.equal(part.matrices(OPTS)[0], block(ref.weight, j))
            assert part.stack_shape(OPTS) == (1, 64, 64)
        assert qkv_parts(parts[0]) is None  # a part is never split again
    assert qkv_parts(LayerRef("h.0.mlp.c_fc", stand_in, "Conv1D", torch.randn(64, 192), _columns)) is None


def test_module_rule_and_multihead_attention():
    assert is_fused_qkv("blk.qkv", nn.Linear(8, 24)) and not is_fused_qkv("blk.qkv", nn.Conv1d(8, 24, 1))
    model = nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 48))
    model[1].qkv = nn.Linear(16, 48)
    names = [r.name for r in split_fused_qkv(find_layers(model))]
    assert names == ["0.q", "0.k", "0.v", "0.out_proj", "1", "1.qkv.q", "1.qkv.k", "1.qkv.v"]
    assert [r.name for r in split_fused_qkv(find_layers(model), predicate=lambda n, m: False)][:3] == ["0.q", "0.k", "0.v"]
