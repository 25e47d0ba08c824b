"""Eigenvalues of many weight matrices at once.

lambda = sigma^2 of each matrix, computed as the eigenvalues of the Gram matrix of its
smaller side (``eigvalsh``), with matrices of one shape from all layers solved in one call.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

__all__ = ["PRECISIONS", "compute_dtype", "gram_eigenvalues", "pooled_spectra"]

PRECISIONS = ("auto", "float32", "float64")


def compute_dtype(weight_dtype: torch.dtype, precision: str = "auto") -> torch.dtype:
    """The dtype the spectrum is computed in.

    ``"auto"``: the weight's own precision, with float16/bfloat16 (and any non-float
    dtype) upcast to float32. ``"float32"`` / ``"float64"``: forced.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    if precision == "float64":
        return torch.float64
    if precision == "float32":
        return torch.float32
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


@torch.no_grad()
def gram_eigenvalues(matrices: torch.Tensor) -> torch.Tensor:
    """Squared singular values of a stack of matrices.

    Args:
        matrices: ``(batch, m, n)``, floating point, any device.

    Returns:
        ``(batch, min(m, n))`` eigenvalues of the smaller Gram matrix, ascending, in the
        input's dtype and device, with round-off negatives clamped to 0.
    """
    if matrices.dim() != 3:
        raise ValueError(f"expected a (batch, m, n) stack, got shape {tuple(matrices.shape)}")
    if matrices.shape[1] > matrices.shape[2]:
        gram = matrices.transpose(1, 2) @ matrices
    else:
        gram = matrices @ matrices.transpose(1, 2)
    return torch.linalg.eigvalsh(gram).clamp_(min=0)


@torch.no_grad()
def pooled_spectra(stacks: Sequence[torch.Tensor], precision: str = "auto") -> list[torch.Tensor]:
    """The pooled, sorted eigenvalue spectrum of each of several matrix stacks.

    Stacks whose matrices share (smaller side, larger side, dtype, device) are solved in one
    batched ``eigvalsh`` call; a tall matrix is transposed first (same eigenvalues).

    Args:
        stacks: one ``(batch_i, m_i, n_i)`` tensor per layer.
        precision: see :func:`compute_dtype`.

    Returns:
        One 1-D float64 tensor per stack, on that stack's device, ascending, of length
        ``batch_i * min(m_i, n_i)``.
    """
    buckets: dict[tuple, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for index, stack in enumerate(stacks):
        dtype = compute_dtype(stack.dtype, precision)
        mats = stack.detach()
        if mats.shape[1] > mats.shape[2]:
            mats = mats.transpose(1, 2)
        key = (mats.shape[1], mats.shape[2], dtype, mats.device)
        buckets[key].append((index, mats))

    results: list[torch.Tensor | None] = [None] * len(stacks)
    for (_, _, dtype, _), members in buckets.items():
        batch = torch.cat([m.to(dtype) for _, m in members]) if len(members) > 1 else members[0][1].to(dtype)
        eigs = gram_eigenvalues(batch)
        start = 0
        for index, mats in members:
            count = mats.shape[0]
            results[index] = torch.sort(eigs[start : start + count].reshape(-1).to(torch.float64)).values
            start += count
        del batch, eigs
    return results  # type: ignore[return-value]
