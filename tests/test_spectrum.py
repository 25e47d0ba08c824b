"""Tests of the batched Gram eigensolver: eigenvalues equal float64 SVD (numpy), shape
buckets keep the order, precision rules, clamping and no autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tempbalance.spectrum import compute_dtype, gram_eigenvalues, iter_pooled_spectra, pooled_spectra


def svd_sq(m: torch.Tensor) -> np.ndarray:
    return np.sort(np.linalg.svd(m.detach().double().numpy(), compute_uv=False) ** 2)


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 9, 4), (1, 6, 6), (4, 1, 7)])
def test_gram_eigenvalues_equal_svd(shape):
    torch.manual_seed(0)
    mats = torch.randn(*shape, dtype=torch.float64)
    eigs = gram_eigenvalues(mats)
    assert eigs.shape == (shape[0], min(shape[1:]))
    for b in range(shape[0]):
        np.testing.assert_allclose(eigs[b].numpy(), svd_sq(mats[b]), rtol=1e-10, atol=1e-12)


def test_gram_eigenvalues_rejects_non_stack():
    with pytest.raises(ValueError, match=r"\(batch, m, n\)"):
        gram_eigenvalues(torch.randn(4, 4))


def test_pooled_spectra_buckets_keep_order_and_pool():
    torch.manual_seed(1)
    stacks = [
        torch.randn(9, 8, 6),
        torch.randn(1, 20, 8),
        torch.randn(2, 6, 8),  # same bucket as the first (transposed)
        torch.randn(1, 8, 20),  # same bucket as the second
        torch.randn(3, 5, 5),
    ]
    spectra = pooled_spectra(stacks, "float64")
    for stack, eigs in zip(stacks, spectra):
        assert eigs.dtype == torch.float64
        assert eigs.numel() == stack.shape[0] * min(stack.shape[1:])
        assert bool((eigs[1:] >= eigs[:-1]).all())
        ref = np.sort(np.concatenate([svd_sq(m) for m in stack]))
        np.testing.assert_allclose(eigs.numpy(), ref, rtol=1e-9, atol=1e-12)


def test_iter_pooled_spectra_yields_every_index_once():
    stacks = [torch.randn(1, 4, 4), torch.randn(1, 3, 5), torch.randn(2, 4, 4)]
    seen = []
    for indices, spectra in iter_pooled_spectra(stacks):
        assert len(indices) == len(spectra)
        seen.extend(indices)
    assert sorted(seen) == [0, 1, 2]


@pytest.mark.parametrize(
    "weight_dtype,precision,expected",
    [
        (torch.float16, "auto", torch.float32),
        (torch.bfloat16, "auto", torch.float32),
        (torch.float32, "auto", torch.float32),
        (torch.float64, "auto", torch.float64),
        (torch.float32, "float64", torch.float64),
        (torch.float64, "float32", torch.float32),
    ],
)
def test_compute_dtype(weight_dtype, precision, expected):
    assert compute_dtype(weight_dtype, precision) == expected


def test_bad_precision_is_named():
    with pytest.raises(ValueError, match="precision='half'"):
        compute_dtype(torch.float32, "half")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_is_upcast(dtype):
    torch.manual_seed(2)
    mats = torch.randn(2, 16, 24).to(dtype)
    eigs = pooled_spectra([mats])[0]
    ref = np.sort(np.concatenate([svd_sq(m.float()) for m in mats]))
    np.testing.assert_allclose(eigs.numpy(), ref, rtol=1e-4, atol=1e-5 * ref.max())


def test_rank_deficient_eigenvalues_are_clamped_non_negative():
    torch.manual_seed(3)
    low_rank = (torch.randn(64, 2) @ torch.randn(2, 64)).unsqueeze(0)
    eigs = pooled_spectra([low_rank], "float32")[0]
    assert bool((eigs >= 0).all())
    np.testing.assert_allclose(eigs[-2:].numpy(), svd_sq(low_rank[0])[-2:], rtol=1e-4)


def test_no_autograd_graph_and_input_untouched():
    mats = torch.randn(2, 5, 7, requires_grad=True)
    before = mats.detach().clone()
    eigs = pooled_spectra([mats])[0]
    assert eigs.grad_fn is None and not eigs.requires_grad
    assert torch.equal(mats.detach(), before)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_stack_gets_none_and_others_are_solved(bad):
    torch.manual_seed(4)
    good, broken, other = torch.randn(3, 6, 9), torch.randn(2, 6, 9), torch.randn(1, 9, 6)
    broken[1, 2, 3] = bad
    spectra = pooled_spectra([good, broken, other], "float64")
    assert spectra[1] is None
    ref = np.sort(np.concatenate([svd_sq(m) for m in good]))
    np.testing.assert_allclose(spectra[0].numpy(), ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(spectra[2].numpy(), svd_sq(other[0]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("side", [100, 256, 300, 512, 600])
def test_blocked_gram_lower_triangle_equals_full_product(side):
    from tempbalance.spectrum import gram_lower_

    torch.manual_seed(side)
    mats = torch.randn(2, side, side + 7, dtype=torch.float64)
    out = torch.full((2, side, side), float("nan"), dtype=torch.float64)
    gram_lower_(mats, out)
    full = mats @ mats.transpose(1, 2)
    torch.testing.assert_close(torch.tril(out), torch.tril(full), rtol=1e-12, atol=1e-10)
    assert torch.isfinite(out).all()  # the skipped upper blocks are zeroed, not left as garbage
    eigs = gram_eigenvalues(mats)
    np.testing.assert_allclose(eigs[0].numpy(), svd_sq(mats[0]), rtol=1e-9, atol=1e-9)
