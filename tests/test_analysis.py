"""Tests of ``analyze()``: alphas and norms against an independent float64 SVD + numpy
re-derivation, robustness (NaN/inf, zero, rank-1, equal eigenvalues, half precision),
no side effects, and the report's exports."""

from __future__ import annotations

import csv
import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tempbalance as tb
from tempbalance.analysis import AnalysisOptions
from tests.helpers.reference import hill_median_reference, svd_eigs


def reference_eigs(module: nn.Module, conv_norm: float = 0.5) -> np.ndarray:
    """float64 SVD of W (Linear) or of each W[:, :, i, j] scaled by sqrt(conv_norm) (Conv2d)."""
    w = module.weight.detach().double().numpy()
    if w.ndim == 2:
        mats = [w]
    else:
        flat = w.reshape(w.shape[0], w.shape[1], -1)
        mats = [flat[:, :, p] * math.sqrt(conv_norm) for p in range(flat.shape[2])]
    return np.sort(np.concatenate([np.linalg.svd(m, compute_uv=False) ** 2 for m in mats]))


def reference_median_alpha(eigs: np.ndarray) -> float:
    i = len(eigs) // 2
    tail = eigs[i:]
    return 1 + len(tail) / (np.log(tail).sum() - len(tail) * np.log(tail[0]))


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3),
        nn.BatchNorm2d(32),
        nn.Conv2d(32, 32, 1),
        nn.Flatten(),
        nn.Linear(128, 64),
        nn.Linear(64, 10),
    )


def test_median_alpha_matches_float64_svd_reference():
    model = small_cnn()
    report = tb.analyze(model)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(report) == len(layers)
    for record, module in zip(report, layers):
        eigs = reference_eigs(module)
        assert record.num_eigs == eigs.size
        assert record.alpha == pytest.approx(reference_median_alpha(eigs), rel=1e-5)
        assert record.lambda_max == pytest.approx(eigs[-1], rel=1e-5)
        assert record.norm == pytest.approx(eigs.sum(), rel=1e-5)
        assert record.log_norm == pytest.approx(math.log10(eigs.sum()), rel=1e-5)
        assert record.log_spectral_norm == pytest.approx(math.log10(eigs[-1]), rel=1e-5)
        assert record.stable_rank == pytest.approx(eigs.sum() / eigs[-1], rel=1e-5)
        assert record.alpha_weighted == pytest.approx(record.alpha * record.log_spectral_norm, rel=1e-12)
        p = eigs / eigs.sum()
        entropy = -(p * np.log(p)).sum() / np.log(len(eigs))
        assert record.entropy == pytest.approx(entropy, rel=1e-4)


def test_frobenius_norm_includes_conv_norm():
    conv = nn.Conv2d(8, 8, 3)
    record = tb.analyze(conv, conv_norm=0.25)[0]
    assert record.norm == pytest.approx(0.25 * float(conv.weight.detach().double().pow(2).sum()), rel=1e-5)
    base = tb.analyze(conv)[0]
    assert record.alpha == pytest.approx(base.alpha, rel=1e-5)


def test_precision_float64_matches_reference_tightly():
    model = small_cnn()
    report = tb.analyze(model, precision="float64")
    for record, module in zip(report, [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]):
        assert record.alpha == pytest.approx(reference_median_alpha(reference_eigs(module)), rel=1e-10)


def test_weights_unchanged_and_no_autograd():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for fit in ("median", "ks", "fix-finger"):
        report = tb.analyze(model, fit=fit, keep_eigenvalues=True)
        for record in report:
            assert isinstance(record.alpha, float)
            assert not isinstance(record.eigenvalues, torch.Tensor)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_give_nan_with_reason(bad):
    model = small_cnn()
    with torch.no_grad():
        model[6].weight[3, 5] = bad
    report = tb.analyze(model)
    record = report["6"]
    assert math.isnan(record.alpha) and math.isnan(record.lambda_max)
    assert "non-finite" in record.reason and not record.ok
    assert all(r.ok for r in report if r.name != "6")


def test_all_zero_weights():
    lin = nn.Linear(32, 32)
    nn.init.zeros_(lin.weight)
    record = tb.analyze(lin)[0]
    assert math.isnan(record.alpha) and record.reason
    assert record.lambda_max == 0 and record.norm == 0
    assert math.isnan(record.log_norm) and math.isnan(record.stable_rank)


def test_rank_one_needs_filter_zeros():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 1) @ torch.randn(1, 64))
    record = tb.analyze(lin)[0]
    assert math.isnan(record.alpha) and "filter_zeros" in record.reason
    assert record.stable_rank == pytest.approx(1.0, rel=1e-4)
    filtered = tb.analyze(lin, filter_zeros=True, zero_threshold=1.0)[0]  # only the one large eigenvalue
    assert math.isnan(filtered.alpha) and "too few" in filtered.reason


def test_one_by_one_conv_and_identical_eigenvalues():
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, 1)
    record = tb.analyze(conv)[0]
    assert record.num_matrices == 1 and record.num_eigs == 24
    assert record.alpha == pytest.approx(reference_median_alpha(reference_eigs(conv)), rel=1e-5)
    orthogonal = nn.Linear(32, 32, bias=False)
    nn.init.orthogonal_(orthogonal.weight)
    for fit in ("median", "ks", "fix-finger"):
        rec = tb.analyze(orthogonal, fit=fit)[0]
        assert math.isnan(rec.alpha) and "equal" in rec.reason, fit
        assert rec.stable_rank == pytest.approx(32, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(dtype):
    model = small_cnn().to(dtype)
    report = tb.analyze(model)
    for record, module in zip(report, [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]):
        assert module.weight.dtype == dtype
        assert record.alpha == pytest.approx(reference_median_alpha(reference_eigs(module)), rel=1e-5)


def test_to_dict_csv_pandas():
    model = small_cnn()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    report = tb.analyze(model)
    d = report.to_dict()
    assert list(d) == report.names == ["0", "2", "4", "6", "7"]
    assert d["2"]["alpha"] == report["2"].alpha and d["2"]["shape"] == [32, 16, 3, 3]
    assert "eigenvalues" not in d["2"]

    buffer = io.StringIO()
    report.to_csv(buffer)
    rows = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert [r["name"] for r in rows] == report.names
    assert rows[0]["alpha"] == "nan" and "non-finite" in rows[0]["reason"]
    assert float(rows[1]["alpha"]) == report["2"].alpha
    assert rows[1]["shape"] == "32x16x3x3" and rows[1]["reason"] == ""

    frame = report.to_pandas()
    assert list(frame["name"]) == report.names
    assert np.isnan(frame["alpha"][0])
    np.testing.assert_allclose(frame["alpha"][1:], [r.alpha for r in report[1:]])
    assert report.alphas()["4"] == report["4"].alpha


def test_to_csv_path(tmp_path):
    path = tmp_path / "out.csv"
    tb.analyze(small_cnn()).to_csv(str(path))
    assert path.read_text().splitlines()[0].startswith("name,kind,shape")


def test_keep_eigenvalues_and_to_dict_with_eigenvalues():
    model = small_cnn()
    report = tb.analyze(model, keep_eigenvalues=True, precision="float64")
    np.testing.assert_allclose(report["6"].eigenvalues, reference_eigs(model[6]), rtol=1e-10)
    assert len(report.to_dict(with_eigenvalues=True)["6"]["eigenvalues"]) == report["6"].num_eigs
    assert tb.analyze(model)["6"].eigenvalues is None


def test_report_lookup_and_option_errors():
    report = tb.analyze(small_cnn())
    with pytest.raises(KeyError, match="no analysed layer named 'nope'"):
        report["nope"]
    with pytest.raises(TypeError, match="unknown option"):
        tb.analyze(small_cnn(), xminpos=2)
    with pytest.raises(ValueError, match="fit='hill'"):
        tb.analyze(small_cnn(), fit="hill")
    with pytest.raises(ValueError, match="precision='half'"):
        tb.analyze(small_cnn(), precision="half")
    with pytest.raises(TypeError, match="expects an nn.Module, a checkpoint path"):
        tb.analyze(42)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file or directory: 'resnet18'"):
        tb.analyze("resnet18")
    with pytest.raises(ValueError, match="zero_threshold"):
        AnalysisOptions(zero_threshold=-1)


def test_unknown_option_error_lists_every_option():
    with pytest.raises(TypeError) as error:
        tb.analyze(small_cnn(), xminpos=2)
    message = str(error.value)
    listed = message.split("accepted:", 1)[1]
    every = [
        "fit", "types", "split_qkv", "include_frozen", "progress",  # analyze()'s own keywords
        "xmin_pos", "hill", "filter_zeros", "zero_threshold", "precision", "conv_mode", "conv_norm", "keep_eigenvalues",
        "device", "batch_bytes", "journal", "allow_pickle",  # checkpoint sources
    ]
    assert [name for name in every if f"'{name}'" not in listed] == []
    fields = [f.name for f in dataclasses.fields(AnalysisOptions)]  # options added later are listed too
    assert [name for name in fields if f"'{name}'" not in listed] == []


def test_checkpoint_only_keywords_refused_for_a_module():
    with pytest.raises(TypeError, match="device= is for checkpoint sources"):
        tb.analyze(small_cnn(), device="cpu")


def test_tied_weight_found_under_every_name():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 64)
            self.head = nn.Linear(64, 100, bias=False)
            self.head.weight = self.emb.weight

    report = tb.analyze(LM())
    assert report.names == ["emb"]
    assert report["head"] is report["emb"]


def test_progress_object_is_advanced_once_per_layer():
    class Counter:
        count = 0

        def update(self, n):
            self.count += n

    counter = Counter()
    refs = tb.find_layers(small_cnn())
    tb.analyze_layers(refs, AnalysisOptions(), counter)
    assert counter.count == len(refs)


def test_small_batches_give_the_same_records(monkeypatch):
    from tempbalance import analysis

    model = small_cnn()
    whole = tb.analyze(model, fit="ks")
    monkeypatch.setattr(analysis, "_BATCH_ELEMENTS", 100)
    pieces = tb.analyze(model, fit="ks")
    assert [r.to_dict() for r in pieces] == [r.to_dict() for r in whole]


def test_tied_frozen_and_wrapped_models():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 64)
            self.mid = nn.Linear(64, 64)
            self.head = nn.Linear(64, 100, bias=False)
            self.head.weight = self.emb.weight

    class DistributedDataParallel(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    lm = LM()
    lm.mid.requires_grad_(False)
    report = tb.analyze(DistributedDataParallel(lm))
    assert report.names == ["emb", "mid"]
    assert report["emb"].tied_names == ["head"] and report["mid"].frozen
    assert tb.analyze(lm, include_frozen=False).names == ["emb"]


def test_split_qkv_in_analyze():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4)
    report = tb.analyze(mha, split_qkv=True)
    assert report.names == ["q", "k", "v", "out_proj"]
    w = mha.in_proj_weight.detach().double().numpy()
    for i, name in enumerate("qkv"):
        eigs = np.sort(np.linalg.svd(w[i * 64 : (i + 1) * 64], compute_uv=False) ** 2)
        assert report[name].alpha == pytest.approx(reference_median_alpha(eigs), rel=1e-5)


# ---------------------------------------------------------------- bad weights, property


def _poisoned_linear(kind: str) -> nn.Linear:
    layer = nn.Linear(64, 100)
    with torch.no_grad():
        if kind == "nan":
            layer.weight[7, 3] = float("nan")
        elif kind == "inf":
            layer.weight[0, 0] = float("-inf")
        elif kind == "zero":
            layer.weight.zero_()
        elif kind == "rank1":
            layer.weight.copy_(torch.randn(100, 1) @ torch.randn(1, 64))
    return layer


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nan", "inf", "zero", "rank1"])
def test_analyze_gives_nan_alpha_with_a_reason_and_leaves_other_layers_alone(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), _poisoned_linear(kind), nn.Linear(100, 80))
    records = {r.name: r for r in tb.analyze(model)}
    bad = records["1"]
    assert math.isnan(bad.alpha) and isinstance(bad.reason, str) and bad.reason
    for name in ("0", "2"):
        good = records[name]
        assert good.reason is None
        assert good.alpha == pytest.approx(hill_median_reference(svd_eigs(model[int(name)].weight)), rel=1e-4)


@pytest.mark.slow
def test_analyze_too_few_eigenvalues_and_depthwise_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 2, 1), nn.Conv2d(2, 32, 3), nn.Conv2d(32, 32, 3, groups=32))
    records = {r.name: r for r in tb.analyze(model, precision="float64")}
    few = records["0"]  # 1x1 conv, 2 eigenvalues: no fit
    assert few.num_eigs == 2 and math.isnan(few.alpha) and "too few" in few.reason
    # depthwise: one 1x1 matrix per channel and kernel position, pooled (conv_norm 0.5)
    depthwise = records["2"]
    eigs = 0.5 * model[2].weight.detach().double().flatten().numpy() ** 2
    assert depthwise.num_eigs == eigs.size == 288
    assert depthwise.alpha == pytest.approx(hill_median_reference(eigs), rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_match_a_float64_reference(dtype):
    torch.manual_seed(1)
    layer = nn.Linear(96, 128).to(dtype)
    reference = hill_median_reference(svd_eigs(layer.weight))
    (record,) = tb.analyze(layer)
    assert record.alpha == pytest.approx(reference, rel=1e-3)
    (record64,) = tb.analyze(layer, precision="float64")
    assert record64.alpha == pytest.approx(reference, rel=1e-9)
    assert layer.weight.dtype == dtype  # the model is not changed


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(4, 72),
    n=st.integers(4, 72),
    log_scale=st.floats(-4, 4),
    log_factor=st.floats(-3, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_alpha_finite_above_one_and_scale_invariant(m, n, log_scale, log_factor, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, n, generator=generator, dtype=torch.float64) * 10.0**log_scale
    layer = nn.Linear(n, m, bias=False).double()
    scaled = nn.Linear(n, m, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        scaled.weight.copy_(weight * 10.0**log_factor)
    (a,) = tb.analyze(layer, precision="float64")
    (b,) = tb.analyze(scaled, precision="float64")
    assert math.isfinite(a.alpha) and a.alpha > 1.0
    assert b.alpha == pytest.approx(a.alpha, rel=1e-7)
    assert a.alpha == pytest.approx(hill_median_reference(svd_eigs(weight)), rel=1e-7)
