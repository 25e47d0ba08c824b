"""Tests of the spectral-norm regulariser against float64 SVD and autograd of sigma_1^2 / 2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tempbalance.regularize import SpectralNormRegularizer, power_iteration


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)


def test_power_iteration_matches_float64_svd():
    torch.manual_seed(1)
    w = torch.randn(20, 30, dtype=torch.float64)
    sigma, u, v = power_iteration(w, torch.randn(20, dtype=torch.float64), iterations=500)
    big_u, s, big_vh = torch.linalg.svd(w)
    assert sigma.item() == pytest.approx(s[0].item(), rel=1e-10)
    assert abs(float(u @ big_u[:, 0])) == pytest.approx(1.0, abs=1e-8)
    assert abs(float(v @ big_vh[0])) == pytest.approx(1.0, abs=1e-8)


def test_apply_adds_gradient_of_half_squared_spectral_norm():
    model = _tiny_model()
    coef = 0.05
    reg = SpectralNormRegularizer(model, coef, power_iterations=300)
    _zero_grads(model)
    reg.apply()
    for name, p in model.named_parameters():
        if p.ndim < 2:
            assert torch.count_nonzero(p.grad) == 0, f"{name}: 1-D parameters must not be regularised"
            continue
        # independent reference: autograd of coef/2 * ||W||_2^2 in float64, conv reshaped out x (in*k*k)
        w = p.detach().double().requires_grad_(True)
        (coef / 2 * torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2) ** 2).backward()
        torch.testing.assert_close(p.grad.double(), w.grad, rtol=1e-4, atol=1e-6)


def test_apply_adds_to_existing_gradient_and_skips_missing_grads():
    model = _tiny_model()
    reg = SpectralNormRegularizer(model, 0.1, power_iterations=300)
    conv, linear = model[0], model[3]
    conv.weight.grad = torch.ones_like(conv.weight)
    linear.weight.grad = None
    reg.apply()
    assert linear.weight.grad is None
    w = conv.weight.detach().double().reshape(8, -1)
    big_u, s, big_vh = torch.linalg.svd(w, full_matrices=False)
    expected = 1.0 + 0.1 * s[0] * torch.outer(big_u[:, 0], big_vh[0])
    torch.testing.assert_close(conv.weight.grad.double().reshape(8, -1), expected, rtol=1e-4, atol=1e-6)


def test_persistent_u_converges_with_one_iteration_per_call():
    model = _tiny_model()
    reg = SpectralNormRegularizer(model, 0.0, power_iterations=1)
    for _ in range(200):
        _zero_grads(model)
        reg.apply()
    true_sigma = torch.linalg.matrix_norm(model[3].weight.detach().double(), ord=2).item()
    assert reg.last_sigmas["3.weight"] == pytest.approx(true_sigma, rel=1e-4)
    # coef 0 leaves the gradients alone
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_state_dict_round_trip_gives_identical_updates():
    model_a, model_b = _tiny_model(), _tiny_model()
    reg_a = SpectralNormRegularizer(model_a, 0.01)
    for _ in range(3):
        _zero_grads(model_a)
        reg_a.apply()
    reg_b = SpectralNormRegularizer(model_b, 0.01, seed=123)
    reg_b.load_state_dict(reg_a.state_dict())
    _zero_grads(model_a)
    _zero_grads(model_b)
    reg_a.apply()
    reg_b.apply()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


def test_frozen_parameters_are_not_tracked():
    model = _tiny_model()
    model[0].weight.requires_grad_(False)
    reg = SpectralNormRegularizer(model, 0.01)
    assert [name for name, _ in reg.params] == ["3.weight"]


@pytest.mark.parametrize("coef", [-1.0, float("nan"), float("inf"), "0.1"])
def test_bad_coefficient_is_rejected(coef):
    with pytest.raises(ValueError, match="coef"):
        SpectralNormRegularizer(_tiny_model(), coef)


def test_bad_power_iterations_is_rejected():
    with pytest.raises(ValueError, match="power_iterations"):
        SpectralNormRegularizer(_tiny_model(), 0.1, power_iterations=0)
