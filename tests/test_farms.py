"""Tests of the FARMS spectra (``esd="farms"``): the windows against an independent float64 numpy
re-derivation of the placement rules (Linear and conv), the aspect-ratio property on random
matrices and convs, windows larger than the matrix, NaN/inf weights, and the default left unchanged.
(TempBalance, the harness, the CLI, the report and sweeps on FARMS: in their own test files.)"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import tempbalance as tb
from tempbalance.analysis import AnalysisOptions
from tempbalance.errors import ConfigError
from tempbalance.farms import window_offsets
from tempbalance.train.models import create_model


# ----------------------------------------------------------------- independent re-derivation


def reference_sides(size: int, window: int, k: int) -> list[tuple[int, int]]:
    """(start, stop) of the windows along one side, written from the rule in the issue."""
    if size <= window:
        return [(0, size)]
    if k == 1:
        return [(0, window)]
    row_step = max(1, (size - window) // (k - 1))
    count = min(k, max(1, (size - window) // row_step + 1))
    return [(min(i * row_step, size - window), min(i * row_step, size - window) + window) for i in range(count)]


def reference_linear_eigs(w: np.ndarray, r: int = 100, q: float = 2.0, k: int = 10) -> np.ndarray:
    """float64 SVD of every window of a rows x cols matrix, squared, pooled, sorted."""
    c = int(r * q)
    eigs = []
    for r0, r1 in reference_sides(w.shape[0], r, k):
        for c0, c1 in reference_sides(w.shape[1], c, k):
            eigs.append(np.linalg.svd(w[r0:r1, c0:c1], compute_uv=False) ** 2)
    return np.sort(np.concatenate(eigs))


def reference_conv_eigs(w: np.ndarray, q: float = 2.0, conv_norm: float = 0.5) -> np.ndarray:
    """Per kernel position: W[:, :, pos] * sqrt(conv_norm), oriented rows >= cols, cut into
    floor(rows / h) blocks of h = max(1, floor(cols / q)) rows; float64 SVD of each block."""
    flat = w.reshape(w.shape[0], w.shape[1], -1)
    eigs = []
    for pos in range(flat.shape[2]):
        mat = flat[:, :, pos] * math.sqrt(conv_norm)
        if mat.shape[0] < mat.shape[1]:
            mat = mat.T
        rows, cols = mat.shape
        h = max(1, math.floor(cols / q))
        for b in range(rows // h):
            eigs.append(np.linalg.svd(mat[b * h : (b + 1) * h], compute_uv=False) ** 2)
    return np.sort(np.concatenate(eigs))


def reference_median_alpha(eigs: np.ndarray) -> float:
    i = len(eigs) // 2
    tail = eigs[i:]
    return 1 + len(tail) / (np.log(tail).sum() - len(tail) * np.log(tail[0]))


def spiked(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A Gaussian matrix plus a few strong rank-1 spikes (a heavier tail than pure noise)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    for _ in range(3):
        u = torch.randn(rows, 1, generator=g, dtype=torch.float64)
        w += 3 * u @ torch.randn(1, cols, generator=g, dtype=torch.float64)
    return w / math.sqrt(cols)


def linear_with(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


# ----------------------------------------------------------------- placement


def test_window_offsets_hand_worked():
    # 512 rows, 100-row windows, 10 per side: step 412 // 9 = 45, 412 // 45 + 1 = 10 windows
    assert window_offsets(512, 100, 10) == (100, [45 * i for i in range(10)])
    # slack 5: step max(1, 5 // 9) = 1, min(10, 5 // 1 + 1) = 6 windows at 0..5
    assert window_offsets(105, 100, 10) == (100, [0, 1, 2, 3, 4, 5])
    assert window_offsets(100, 100, 10) == (100, [0])
    assert window_offsets(64, 100, 10) == (64, [0])  # shorter than the window: the whole side
    assert window_offsets(1000, 100, 1) == (100, [0])
    assert window_offsets(1000, 100, 2) == (100, [0, 900])


@pytest.mark.parametrize(
    "shape, options",
    [
        ((300, 700), {}),
        ((150, 260), {}),  # slack 50 / 60: overlapping windows, step 5 / 6
        ((64, 500), {}),  # rows shorter than the window: 64-row windows
        ((450, 120), {}),  # columns shorter than the window: 120-column windows
        ((333, 517), {"window_rows": 40, "window_q": 1.5, "windows_per_dim": 4}),
        ((90, 90), {"window_rows": 30, "window_q": 1.0, "windows_per_dim": 1}),
    ],
)
def test_linear_windows_match_float64_reference(shape, options):
    weight = spiked(*shape, seed=sum(shape))
    layer = linear_with(weight)
    record = tb.analyze(layer, esd="farms", precision="float64", keep_eigenvalues=True, **options)[0]
    eigs = reference_linear_eigs(
        weight.numpy(), options.get("window_rows", 100), options.get("window_q", 2.0), options.get("windows_per_dim", 10)
    )
    assert record.num_eigs == eigs.size
    np.testing.assert_allclose(record.eigenvalues, eigs, rtol=1e-9, atol=1e-12 * eigs[-1])
    assert record.alpha == pytest.approx(reference_median_alpha(eigs), rel=1e-9)
    assert record.lambda_max == pytest.approx(eigs[-1], rel=1e-9)
    assert record.norm == pytest.approx(eigs.sum(), rel=1e-9)
    # float32 (the default precision) agrees to float32 accuracy
    single = tb.analyze(layer.float(), esd="farms", **options)[0]
    assert single.alpha == pytest.approx(record.alpha, rel=1e-4)


@pytest.mark.parametrize(
    "shape, window_q",
    [
        ((32, 16, 3, 3), 2.0),  # rows > cols: 16 x 8 -> blocks of 8 x 16, 4 per position
        ((16, 32, 3, 3), 2.0),  # out < in: transposed to 32 x 16 first
        ((24, 10, 3, 3), 2.0),  # h = 5, 24 // 5 = 4 blocks, 4 rows in no block
        ((20, 7, 1, 1), 2.0),  # cols / Q = 3.5 not an integer: h = 3, 6 blocks, 2 rows left over
        ((40, 7, 3), 1.5),  # Conv1d, h = floor(7 / 1.5) = 4
        ((12, 12, 3, 3), 1.0),  # square blocks: each matrix whole
        ((30, 3, 3, 3), 2.0),  # a stem conv: h = max(1, 1) = 1, 1-row blocks
    ],
)
def test_conv_blocks_match_float64_reference(shape, window_q):
    torch.manual_seed(sum(shape))
    cls = {3: nn.Conv1d, 4: nn.Conv2d}[len(shape)]
    conv = cls(shape[1], shape[0], shape[2:], bias=False).double()
    record = tb.analyze(conv, esd="farms", window_q=window_q, keep_eigenvalues=True)[0]
    eigs = reference_conv_eigs(conv.weight.detach().numpy(), q=window_q)
    assert record.num_eigs == eigs.size
    np.testing.assert_allclose(record.eigenvalues, eigs, rtol=1e-9, atol=1e-12 * eigs[-1])
    assert record.alpha == pytest.approx(reference_median_alpha(eigs), rel=1e-9)


def test_conv_rule_is_not_used_for_flattened_convs_and_window_options_are_used():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 150, 5, bias=False).double()  # flattened: 150 x 400, a plain matrix
    record = tb.analyze(conv, esd="farms", conv_mode="flatten", keep_eigenvalues=True)[0]
    eigs = reference_linear_eigs(conv.weight.detach().numpy().reshape(150, -1))
    np.testing.assert_allclose(record.eigenvalues, eigs, rtol=1e-9, atol=1e-12 * eigs[-1])
    assert record.matrix_shape == (100, 200)


def test_windows_larger_than_the_matrix_give_the_plain_spectrum():
    torch.manual_seed(1)
    layer = nn.Linear(80, 50)  # 50 x 80 < one 100 x 200 window
    plain, farms = tb.analyze(layer)[0], tb.analyze(layer, esd="farms")[0]
    assert farms.to_dict() == plain.to_dict()
    small = tb.analyze(nn.Linear(30, 20), esd="farms", window_rows=20, window_q=1.5)[0]
    assert small.matrix_shape == (20, 30) and small.num_matrices == 1


# ----------------------------------------------------------------- the aspect-ratio property


def test_aspect_ratio_bias_removed_on_gaussian_matrices():
    # Measured (float64, generator seed 0), shapes 256x256, 256x512, 512x256, 128x1024, 2048x256, 256x1024:
    # plain 2.113 2.716 2.696 4.560 4.401 3.493 (spread 2.45); FARMS 2.677 2.703 2.706 2.693 2.698 2.694
    # (spread 0.029). Seeds 0-4: plain spreads 2.37-2.46, FARMS 0.025-0.043.
    g = torch.Generator().manual_seed(0)
    plain, farms = [], []
    for shape in [(256, 256), (256, 512), (512, 256), (128, 1024), (2048, 256), (256, 1024)]:
        layer = linear_with(torch.randn(shape, generator=g, dtype=torch.float64))
        plain.append(tb.analyze(layer, precision="float64")[0].alpha)
        farms.append(tb.analyze(layer, esd="farms", precision="float64")[0].alpha)
    assert max(plain) - min(plain) > 2.0
    assert max(farms) - min(farms) < 0.1
    assert all(2.6 < a < 2.8 for a in farms)


def test_aspect_ratio_bias_removed_on_convs():
    # Measured (float64, generator seed 0), 3x3 convs out x in 64x64, 128x64, 256x64, 64x256, 128x128:
    # plain 2.124 2.687 3.413 3.391 2.113 (spread 1.30); FARMS 2.692 2.711 2.690 2.689 2.693 (spread 0.023).
    # Seeds 0-4: plain spreads 1.29-1.38, FARMS 0.023-0.104.
    g = torch.Generator().manual_seed(0)
    plain, farms = [], []
    for shape in [(64, 64, 3, 3), (128, 64, 3, 3), (256, 64, 3, 3), (64, 256, 3, 3), (128, 128, 3, 3)]:
        conv = nn.Conv2d(shape[1], shape[0], 3, bias=False).double()
        with torch.no_grad():
            conv.weight.copy_(torch.randn(shape, generator=g, dtype=torch.float64))
        plain.append(tb.analyze(conv, precision="float64")[0].alpha)
        farms.append(tb.analyze(conv, esd="farms", precision="float64")[0].alpha)
    assert max(plain) - min(plain) > 1.0
    assert max(farms) - min(farms) < 0.15


# ----------------------------------------------------------------- bad weights, bad options


@pytest.mark.parametrize("where", [(3, 5), (510, 511)])  # inside a window; in no window (rows 505-511)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_give_nan_alpha_with_reason(where, value):
    weight = torch.randn(512, 512)
    weight[where] = value
    layer = linear_with(weight)
    before = layer.weight.detach().clone()
    record = tb.analyze(layer, esd="farms")[0]
    assert math.isnan(record.alpha) and "non-finite" in record.reason
    assert torch.equal(torch.isnan(layer.weight), torch.isnan(before))  # weights untouched
    finite = torch.isfinite(before)
    assert torch.equal(layer.weight.detach()[finite], before[finite])


def test_non_finite_conv_entry_in_left_over_rows_is_still_seen():
    conv = nn.Conv2d(7, 20, 1, bias=False)  # 20 x 7: h = 3, rows 18 and 19 in no block
    with torch.no_grad():
        conv.weight[19, 2, 0, 0] = float("inf")
    record = tb.analyze(conv, esd="farms")[0]
    assert math.isnan(record.alpha) and "non-finite" in record.reason
    assert torch.isinf(conv.weight).sum() == 1


@pytest.mark.parametrize(
    "options, words",
    [
        ({"esd": "farm"}, "esd='farm'"),
        ({"window_rows": 0}, "window_rows=0"),
        ({"window_rows": 2.5}, "window_rows=2.5"),
        ({"windows_per_dim": True}, "windows_per_dim=True"),
        ({"window_q": 0.5}, "window_q=0.5"),
        ({"window_q": float("nan")}, "window_q=nan"),
    ],
)
def test_bad_options_are_named(options, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        AnalysisOptions(**options)


# ----------------------------------------------------------------- the default stays the same


def _records(report):
    return [json.dumps(r.to_dict(), sort_keys=True) for r in report]  # NaN-safe equality


def test_default_full_esd_ignores_the_window_options():
    model = create_model("resnet18", 10, width=0.125)
    default = tb.analyze(model)
    assert AnalysisOptions().esd == "full"
    assert _records(tb.analyze(model, esd="full", window_rows=7, window_q=3.0, windows_per_dim=2)) == _records(default)
    farms = tb.analyze(model, esd="farms")
    assert _records(farms) != _records(default)
