"""Spectral-norm regularisation (SNR, Yoshida & Miyato 2017) applied on the gradients.

Adds ``coef * sigma_1 * u_1 v_1^T`` (the gradient of ``coef / 2 * sigma_1^2``) to every weight with 2+ dims.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["SpectralNormRegularizer", "power_iteration"]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(torch.finfo(x.dtype).tiny)


def power_iteration(
    matrix: torch.Tensor, u: torch.Tensor, iterations: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Estimate the top singular triple of ``matrix`` (m x n) by power iteration from ``u`` (m,).

    Returns ``(sigma_1, u_1, v_1)``: a 0-dim tensor, ``(m,)`` and ``(n,)`` unit vectors, all in
    ``matrix``'s dtype and device. ``sigma_1 = u_1^T W v_1``.
    """
    if iterations < 1:
        raise ValueError(f"iterations={iterations!r} must be >= 1")
    u = _unit(u)
    for _ in range(iterations):
        v = _unit(matrix.t() @ u)
        u = _unit(matrix @ v)
    sigma = u @ (matrix @ v)
    return sigma, u, v


class SpectralNormRegularizer:
    """Spectral-norm regularisation on the gradient, for every parameter with 2+ dims.

    Call :meth:`apply` after ``loss.backward()`` and before ``optimizer.step()``. Each weight
    ``W`` (a conv weight ``(out, in, kh, kw)`` is reshaped to ``out x (in*kh*kw)``) gets
    ``coef * sigma_1 * u_1 v_1^T`` added to its ``.grad``, with ``sigma_1, u_1, v_1`` from
    ``power_iterations`` power-iteration steps started from the previous call's ``u`` (kept per
    parameter, so one step per call converges over training, as in Yoshida & Miyato).

    The term is applied whatever the optimizer's weight decay. (The TempBalance reference's first
    public release applied it only when weight decay was 0, i.e. never in its own configs; that
    was fixed in 2025. This class does not reproduce the bug.)

    Args:
        model: the model whose parameters are regularised (those with ``requires_grad``).
        coef: the regularisation coefficient (>= 0), e.g. 0.01.
        power_iterations: power-iteration steps per :meth:`apply` (>= 1), default 1.
        seed: seed of the private generator for the initial ``u`` vectors (the global RNG is
            untouched), default 0.
    """

    def __init__(self, model: nn.Module, coef: float, power_iterations: int = 1, seed: int = 0):
        if not (isinstance(coef, (int, float)) and math.isfinite(coef) and coef >= 0):
            raise ValueError(f"coef={coef!r} must be a finite number >= 0")
        if not (isinstance(power_iterations, int) and power_iterations >= 1):
            raise ValueError(f"power_iterations={power_iterations!r} must be an integer >= 1")
        self.coef = float(coef)
        self.power_iterations = power_iterations
        self.params: list[tuple[str, nn.Parameter]] = [
            (name, p) for name, p in model.named_parameters() if p.ndim >= 2 and p.requires_grad
        ]
        generator = torch.Generator().manual_seed(seed)
        self._u: dict[str, torch.Tensor] = {
            name: _unit(torch.randn(p.shape[0], generator=generator, dtype=torch.float32)).to(p.device)
            for name, p in self.params
        }
        self.last_sigmas: dict[str, float] = {}

    @torch.no_grad()
    def apply(self) -> None:
        """Add ``coef * sigma_1 u_1 v_1^T`` to the ``.grad`` of every tracked parameter that has one."""
        sigmas: dict[str, torch.Tensor] = {}
        for name, p in self.params:
            if p.grad is None:
                continue
            matrix = p.detach().reshape(p.shape[0], -1).float()
            u0 = self._u[name].to(device=matrix.device)
            sigma, u, v = power_iteration(matrix, u0, self.power_iterations)
            self._u[name] = u
            sigmas[name] = sigma
            if self.coef:
                p.grad.add_((self.coef * sigma * torch.outer(u, v)).reshape(p.shape).to(p.grad.dtype))
        self.last_sigmas = {name: float(s) for name, s in sigmas.items()}

    def state_dict(self) -> dict[str, Any]:
        """The persistent ``u`` vectors (CPU copies) and settings."""
        return {
            "coef": self.coef,
            "power_iterations": self.power_iterations,
            "u": {name: u.detach().cpu().clone() for name, u in self._u.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the ``u`` vectors saved by :meth:`state_dict` (names must match this model)."""
        missing = sorted(set(self._u) - set(state["u"]))
        if missing:
            raise ValueError(f"regularizer state has no u vector for {missing[:5]} (saved for another model?)")
        self.coef = float(state.get("coef", self.coef))
        self.power_iterations = int(state.get("power_iterations", self.power_iterations))
        devices = {name: p.device for name, p in self.params}
        self._u = {name: state["u"][name].to(devices[name]) for name in self._u}
