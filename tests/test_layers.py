"""Tests of layer discovery and weight -> matrix stacks, against float64 SVD references
built independently here (per kernel position, per group, per q/k/v slice)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tempbalance.layers import MatrixOptions, find_layers, register_layer_type, registered_layer_types, unwrap_model
from tempbalance.spectrum import pooled_spectra


def svd_eigs(mats) -> np.ndarray:
    """Sorted squared singular values (float64) of a list of 2-D arrays, pooled."""
    out = [np.linalg.svd(np.asarray(m, dtype=np.float64), compute_uv=False) ** 2 for m in mats]
    return np.sort(np.concatenate(out))


def conv_reference(w: torch.Tensor, groups: int, mode: str, conv_norm: float) -> np.ndarray:
    """Conv weight (out, in/g, *k): per group, per kernel position an (out/g) x (in/g) matrix."""
    w = w.detach().double().numpy()
    out_ch = w.shape[0]
    opg = out_ch // groups
    mats = []
    for g in range(groups):
        block = w[g * opg : (g + 1) * opg]  # (opg, in/g, *k)
        if mode == "flatten":
            mats.append(block.reshape(opg, -1))
        else:
            flat = block.reshape(opg, block.shape[1], -1)
            for pos in range(flat.shape[2]):
                mats.append(flat[:, :, pos] * math.sqrt(conv_norm))
    return svd_eigs(mats)


def conv_transpose_reference(w: torch.Tensor, groups: int, mode: str, conv_norm: float) -> np.ndarray:
    """ConvTranspose weight (in, out/g, *k): per group the block of in/g rows; its transpose
    (out/g x in/g per position) has the same singular values."""
    w = w.detach().double().numpy()
    ipg = w.shape[0] // groups
    mats = []
    for g in range(groups):
        block = w[g * ipg : (g + 1) * ipg]  # (in/g, out/g, *k)
        if mode == "flatten":
            mats.append(np.moveaxis(block, 1, 0).reshape(block.shape[1], -1))
        else:
            flat = block.reshape(ipg, block.shape[1], -1)
            for pos in range(flat.shape[2]):
                mats.append(flat[:, :, pos].T * math.sqrt(conv_norm))
    return svd_eigs(mats)


def layer_eigs(module: nn.Module, options: MatrixOptions = MatrixOptions(), precision: str = "float64") -> np.ndarray:
    refs = find_layers(module)
    assert len(refs) == 1
    dtype = torch.float64 if precision == "float64" else None
    return pooled_spectra([refs[0].matrices(options, dtype)], precision)[0].numpy()


CONVS = [
    (nn.Conv1d(6, 10, 3), 1),
    (nn.Conv2d(6, 10, 3), 1),
    (nn.Conv3d(4, 6, 2), 1),
    (nn.Conv2d(8, 12, 3, groups=4), 4),
    (nn.Conv2d(8, 8, 3, groups=8), 8),  # depthwise
    (nn.Conv2d(16, 5, 1), 1),  # 1x1
    (nn.Conv2d(3, 20, (3, 2)), 1),  # tall per-position matrices
]
TRANSPOSED = [
    (nn.ConvTranspose1d(6, 10, 3), 1),
    (nn.ConvTranspose2d(6, 10, 3), 1),
    (nn.ConvTranspose3d(4, 6, 2), 1),
    (nn.ConvTranspose2d(8, 12, 3, groups=4), 4),
    (nn.ConvTranspose2d(6, 6, 3, groups=6), 6),
]


@pytest.mark.parametrize("mode", ["per_position", "flatten"])
@pytest.mark.parametrize("conv_norm", [0.5, 1.0])
@pytest.mark.parametrize("index", range(len(CONVS)))
def test_conv_eigenvalues_match_svd_reference(index, conv_norm, mode):
    torch.manual_seed(index)
    conv, groups = CONVS[index]
    options = MatrixOptions(conv_mode=mode, conv_norm=conv_norm)
    ours = layer_eigs(conv, options)
    ref = conv_reference(conv.weight, groups, mode, conv_norm)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12 * ref.max())


@pytest.mark.parametrize("mode", ["per_position", "flatten"])
@pytest.mark.parametrize("index", range(len(TRANSPOSED)))
def test_conv_transpose_eigenvalues_match_svd_reference(index, mode):
    torch.manual_seed(10 + index)
    conv, groups = TRANSPOSED[index]
    options = MatrixOptions(conv_mode=mode)
    ours = layer_eigs(conv, options)
    ref = conv_transpose_reference(conv.weight, groups, mode, 0.5)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12 * ref.max())


def test_per_position_count_and_float32_agreement():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, 3)
    ref = conv_reference(conv.weight, 1, "per_position", 0.5)
    assert ref.size == 9 * 32
    ours = layer_eigs(conv, precision="auto")
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6 * ref.max())


class Conv1D(nn.Module):
    """Hugging Face GPT-2 style: weight stored (in, out), ``nf`` = out."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


def test_gpt2_conv1d_is_found_and_transposed():
    torch.manual_seed(0)
    layer = Conv1D(nf=12, nx=5)
    refs = find_layers(nn.Sequential(layer))
    assert [r.kind for r in refs] == ["Conv1D"]
    stack = refs[0].matrices(MatrixOptions())
    assert tuple(stack.shape) == (1, 12, 5)  # out x in
    torch.testing.assert_close(stack[0], layer.weight.detach().t())
    np.testing.assert_allclose(layer_eigs(layer), svd_eigs([layer.weight.detach()]), rtol=1e-10)


def test_linear_and_embedding_match_svd():
    torch.manual_seed(0)
    lin, emb = nn.Linear(7, 13), nn.Embedding(20, 6)
    np.testing.assert_allclose(layer_eigs(lin), svd_eigs([lin.weight.detach()]), rtol=1e-10)
    np.testing.assert_allclose(layer_eigs(emb), svd_eigs([emb.weight.detach()]), rtol=1e-10)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 4)
        self.ln = nn.LayerNorm(4)


def test_find_layers_order_kinds_and_skips_non_matrix_modules():
    refs = find_layers(Net())
    assert [r.name for r in refs] == ["conv", "emb", "fc"]
    assert [r.kind for r in refs] == ["Conv2d", "Embedding", "Linear"]
    assert [r.name for r in find_layers(Net(), types=[nn.Linear])] == ["fc"]
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        find_layers(Net(), types=[int])


class DistributedDataParallel(nn.Module):
    """Stands in for torch DDP: the real model under ``.module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


@pytest.mark.slow  # constructing torch.compile imports dynamo (~8 s)
def test_wrappers_are_unwrapped():
    net = Net()
    names = [r.name for r in find_layers(net)]
    assert [r.name for r in find_layers(DistributedDataParallel(net))] == names
    compiled = torch.compile(net)  # constructing is enough: it is never run
    assert unwrap_model(compiled) is net
    assert [r.name for r in find_layers(compiled)] == names
    assert unwrap_model(DistributedDataParallel(compiled)) is net


def test_a_plain_module_attribute_is_not_unwrapped():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(3, 3)
            self.other = nn.Linear(3, 2)

    holder = Holder()
    assert unwrap_model(holder) is holder
    assert [r.name for r in find_layers(holder)] == ["module", "other"]


def test_tied_weights_analysed_once():
    emb = nn.Embedding(30, 8)
    head = nn.Linear(8, 30, bias=False)
    head.weight = emb.weight
    refs = find_layers(nn.ModuleDict({"emb": emb, "head": head}))
    assert [r.name for r in refs] == ["emb"]
    assert refs[0].tied_names == ["head"]


def test_frozen_layers_marked_and_optionally_dropped():
    net = Net()
    net.fc.weight.requires_grad_(False)
    refs = find_layers(net)
    assert {r.name: r.frozen for r in refs} == {"conv": False, "emb": False, "fc": True}
    assert [r.name for r in find_layers(net, include_frozen=False)] == ["conv", "emb"]


def test_user_registered_layer_type():
    class Bilinear2(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 5, 6))

    assert find_layers(nn.Sequential(Bilinear2())) == []
    assert Bilinear2 not in registered_layer_types()
    register_layer_type(Bilinear2, lambda w, module, options: w.reshape(4, 5, 6))
    try:
        assert registered_layer_types()[-1] is Bilinear2 and nn.Linear in registered_layer_types()
        refs = find_layers(nn.Sequential(Bilinear2()))
        assert [r.kind for r in refs] == ["Bilinear2"]
        w = refs[0].weight.detach()
        eigs = pooled_spectra([refs[0].matrices(MatrixOptions(), torch.float64)], "float64")[0].numpy()
        np.testing.assert_allclose(eigs, svd_eigs(list(w)), rtol=1e-10)
    finally:
        from tempbalance import layers

        layers._REGISTRY.pop(Bilinear2)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer_type(int)


def test_registered_subclass_uses_default_linear_matrices():
    class MyLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 2, 3))

    register_layer_type(MyLinear)
    try:
        stack = find_layers(MyLinear())[0].matrices(MatrixOptions())
        assert tuple(stack.shape) == (1, 6, 6)
    finally:
        from tempbalance import layers

        layers._REGISTRY.pop(MyLinear)


def test_multihead_attention_fused_and_split():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(embed_dim=8, num_heads=2)
    refs = find_layers(mha)
    assert [r.name for r in refs] == ["in_proj", "out_proj"]
    w = mha.in_proj_weight.detach()
    fused = pooled_spectra([refs[0].matrices(MatrixOptions(), torch.float64)], "float64")[0].numpy()
    np.testing.assert_allclose(fused, svd_eigs([w]), rtol=1e-10)

    split = find_layers(mha, split_qkv=True)
    assert [r.name for r in split] == ["q", "k", "v", "out_proj"]
    spectra = pooled_spectra([r.matrices(MatrixOptions(), torch.float64) for r in split[:3]], "float64")
    for i, eigs in enumerate(spectra):
        np.testing.assert_allclose(eigs.numpy(), svd_eigs([w[i * 8 : (i + 1) * 8]]), rtol=1e-10)


def test_multihead_attention_separate_projections():
    mha = nn.MultiheadAttention(embed_dim=8, num_heads=2, kdim=5, vdim=6)
    refs = find_layers(mha)
    assert [r.name for r in refs] == ["q", "k", "v", "out_proj"]
    assert [tuple(r.matrices(MatrixOptions()).shape) for r in refs[:3]] == [(1, 8, 8), (1, 8, 5), (1, 8, 6)]


def test_matrix_options_validation():
    with pytest.raises(ValueError, match="conv_mode='bad'"):
        MatrixOptions(conv_mode="bad")
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="conv_norm"):
            MatrixOptions(conv_norm=bad)


def test_matrices_are_detached_views_that_never_touch_the_weight():
    conv = nn.Conv2d(4, 6, 3)
    before = conv.weight.detach().clone()
    stack = find_layers(conv)[0].matrices(MatrixOptions())
    assert not stack.requires_grad
    stack.mul_(0)
    torch.testing.assert_close(conv.weight.detach(), before, rtol=0, atol=0)


# ----------------------------------------------------------------------------- tensors of a checkpoint file


def test_tensor_layer_names_follow_find_layers():
    from tempbalance.layers import tensor_layer_name

    assert tensor_layer_name("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj"
    assert tensor_layer_name("attn.in_proj_weight") == "attn.in_proj"
    assert tensor_layer_name("attn.k_proj_weight") == "attn.k"
    for key in ("fc.bias", "bn.running_mean", "transformer.h.0.attn.bias", "pos_embed", "weight_g"):
        assert tensor_layer_name(key) is None
    model = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(8, 2))
    names = [r.name for r in find_layers(model)]
    assert [tensor_layer_name(k) for k in model.state_dict() if tensor_layer_name(k)] == names


@pytest.mark.parametrize("module", [nn.Linear(12, 7), nn.Embedding(30, 6), nn.Conv1d(5, 9, 3), nn.Conv2d(6, 10, 3),
                                    nn.Conv3d(4, 6, 2), nn.Conv2d(16, 5, 1)])
def test_tensor_role_from_shape_matches_the_module(module):
    """A tensor alone (no module) gives the module's matrices and spectrum (float64 SVD reference)."""
    from tempbalance.layers import tensor_layer_ref

    ref = tensor_layer_ref("layer.weight", module.weight.detach())
    assert ref.name == "layer" and not ref.frozen
    options = MatrixOptions()
    stack = ref.matrices(options, torch.float64)
    assert tuple(stack.shape) == find_layers(module)[0].stack_shape(options)
    w = module.weight.detach()
    expected = svd_eigs([w.numpy()]) if w.dim() == 2 else conv_reference(w, 1, "per_position", 0.5)
    np.testing.assert_allclose(pooled_spectra([stack], "float64")[0].numpy(), expected, rtol=1e-10, atol=1e-12)
    meta = tensor_layer_ref("layer.weight", torch.empty(w.shape, device="meta"))
    assert meta.stack_shape(options) == tuple(stack.shape)  # planning from shapes alone


def test_skipped_tensors_and_gpt2_orientation():
    from tempbalance.layers import tensor_layer_ref

    assert tensor_layer_ref("x.weight", torch.randn(7)) is None  # 1-D: a norm
    assert tensor_layer_ref("x.weight", torch.zeros(4, 4, dtype=torch.int8)) is None  # integer
    assert tensor_layer_ref("x.weight", torch.randn(1, 2, 2, 2, 2, 2)) is None  # 6-D
    assert tensor_layer_ref("x.bias", torch.randn(4, 4)) is None
    w = torch.randn(6, 18)  # GPT-2 c_attn, stored (in, out)
    ref = tensor_layer_ref("h.0.attn.c_attn.weight", w)
    assert tuple(ref.matrices(MatrixOptions()).shape) == (1, 18, 6)  # (out, in), as the module's
    assert tensor_layer_ref("h.0.attn.c_attn.weight", torch.randn(18, 6)).matrices(MatrixOptions()).shape[1] == 18
