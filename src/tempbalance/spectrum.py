"""Eigenvalues of many weight matrices at once.

lambda = sigma^2 of each matrix, computed as the eigenvalues of the Gram matrix of its
smaller side (``eigvalsh``), with matrices of one shape from all layers solved in one call.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import torch

__all__ = ["PRECISIONS", "compute_dtype", "gram_eigenvalues", "gram_lower_", "iter_pooled_spectra", "pooled_spectra"]

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


def _gram_blocks(side: int) -> int:
    """Row blocks of the lower-triangle Gram product: 4 from side 512, 2 from 256, else 1."""
    return 4 if side >= 512 else 2 if side >= 256 else 1


def gram_lower_(mats: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the Gram matrices ``mats @ mats^T`` of a wide stack into ``out``, lower triangle
    only (the upper block triangle is zeroed; ``eigvalsh`` reads the lower one).

    Computed in row blocks (block ``b`` against the rows up to its end), which skips up to
    3/8 of the multiply-adds of the full product for large sides.

    Args:
        mats: ``(batch, m, n)`` with ``m <= n``.
        out: ``(batch, m, m)`` contiguous, same dtype and device.
    """
    side = mats.shape[1]
    blocks = _gram_blocks(side)
    edges = [side * b // blocks for b in range(blocks + 1)]
    for b in range(blocks):
        lo, hi = edges[b], edges[b + 1]
        torch.matmul(mats[:, lo:hi], mats[:, :hi].transpose(1, 2), out=out[:, lo:hi, :hi])
        if hi < side:
            out[:, lo:hi, hi:] = 0
    return out


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
        matrices = matrices.transpose(1, 2)
    side = matrices.shape[1]
    gram = gram_lower_(matrices, torch.empty(matrices.shape[0], side, side, dtype=matrices.dtype, device=matrices.device))
    return torch.linalg.eigvalsh(gram).clamp_(min=0)


@torch.no_grad()
def iter_pooled_spectra(
    stacks: Sequence[torch.Tensor], precision: str = "auto"
) -> Iterator[tuple[list[int], list[torch.Tensor | None]]]:
    """Like :func:`pooled_spectra`, but yields ``(indices, spectra)`` one shape bucket at a
    time (so callers can report progress and free memory as they go).

    The Gram matrices of a bucket (lower triangles, see :func:`gram_lower_`) are written
    straight into one preallocated batch (no copy of the weights) and solved with one
    ``eigvalsh`` call. A stack with a NaN or inf entry
    (seen on the Gram diagonal, ``sum_j w_ij^2``) gets ``None`` instead of a spectrum.
    """
    buckets: dict[tuple, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for index, stack in enumerate(stacks):
        if stack.dim() != 3:
            raise ValueError(f"stack {index}: expected a (batch, m, n) tensor, got shape {tuple(stack.shape)}")
        dtype = compute_dtype(stack.dtype, precision)
        mats = stack.detach()
        if mats.shape[1] > mats.shape[2]:
            mats = mats.transpose(1, 2)
        key = (mats.shape[1], mats.shape[2], dtype, mats.device)
        buckets[key].append((index, mats))

    for (side, _, dtype, device), members in buckets.items():
        gram = torch.empty(sum(m.shape[0] for _, m in members), side, side, dtype=dtype, device=device)
        start = 0
        for _, mats in members:
            mats = mats.to(dtype)
            gram_lower_(mats, gram[start : start + mats.shape[0]])
            start += mats.shape[0]
        finite = torch.isfinite(torch.diagonal(gram, dim1=1, dim2=2)).all(dim=1)
        all_finite = bool(finite.all())
        if not all_finite:
            gram[~finite] = 0  # solvable placeholder; those stacks report None
        eigs = torch.linalg.eigvalsh(gram).clamp_(min=0)
        del gram
        finite_list = finite.tolist() if not all_finite else None
        indices, spectra = [], []
        start = 0
        for index, mats in members:
            count = mats.shape[0]
            indices.append(index)
            if finite_list is not None and not all(finite_list[start : start + count]):
                spectra.append(None)
            else:
                spectra.append(torch.sort(eigs[start : start + count].reshape(-1).to(torch.float64)).values)
            start += count
        del eigs
        yield indices, spectra


@torch.no_grad()
def pooled_spectra(stacks: Sequence[torch.Tensor], precision: str = "auto") -> list[torch.Tensor | None]:
    """The pooled, sorted eigenvalue spectrum of each of several matrix stacks.

    Stacks whose matrices share (smaller side, larger side, dtype, device) are solved in one
    batched ``eigvalsh`` call; a tall matrix is transposed first (same eigenvalues).

    Args:
        stacks: one ``(batch_i, m_i, n_i)`` tensor per layer.
        precision: see :func:`compute_dtype`.

    Returns:
        One 1-D float64 tensor per stack, on that stack's device, ascending, of length
        ``batch_i * min(m_i, n_i)``; ``None`` for a stack with NaN or inf entries.
    """
    results: list[torch.Tensor | None] = [None] * len(stacks)
    for indices, spectra in iter_pooled_spectra(stacks, precision):
        for index, eigs in zip(indices, spectra):
            results[index] = eigs
    return results  # type: ignore[return-value]
