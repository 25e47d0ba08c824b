"""Eigenvalues of many weight matrices at once.

lambda = sigma^2 of each matrix, computed as the eigenvalues of the Gram matrix of its
smaller side (``eigvalsh``), with matrices of one shape from all layers solved in one call.
The products run in full float32 precision whatever the user's TF32 / bf16 matmul setting,
and a batch the eigensolver fails on is solved again on the CPU in float64.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = [
    "PRECISIONS",
    "compute_dtype",
    "full_float32_precision",
    "gram_eigenvalues",
    "gram_lower_",
    "iter_pooled_spectra",
    "pooled_spectra",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "float64")

_forced_lock = threading.Lock()
_forced: dict[str, list[Any]] = {}  # flag -> [depth, the user's value], while forced
_fallback_logged = False


def _per_backend_flags() -> bool:
    """torch >= 2.9: one float32 precision setting per backend (``torch.backends.*.fp32_precision``)."""
    return hasattr(torch.backends.mkldnn, "matmul")


def _matmul_flag(device_type: str) -> tuple[str, Callable[[], Any], Callable[[Any], None], Any] | None:
    """``(name, get, set, full-precision value)`` of the flag that lets float32 matmuls on
    ``device_type`` run in lower precision (TF32 on CUDA, bf16 on oneDNN CPUs), or None."""
    backends = torch.backends
    if _per_backend_flags():
        owner = {"cuda": backends.cuda.matmul, "cpu": backends.mkldnn.matmul}.get(device_type)
        if owner is None:
            return None
        return (
            device_type,
            lambda: owner.fp32_precision,
            lambda value: setattr(owner, "fp32_precision", value),
            "ieee",
        )

    # torch < 2.9: one flag; cuda.matmul.allow_tf32 reads and writes the same setting
    return "legacy", torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, "highest"


@contextmanager
def full_float32_precision(device: str | torch.device) -> Iterator[None]:
    """Run float32 matrix products on ``device`` in full float32 precision inside the block.

    Sets the flag that ``torch.set_float32_matmul_precision`` / ``torch.backends.cuda.matmul.allow_tf32``
    (CUDA) or oneDNN's bf16 mode (CPU) control, and restores the user's value on exit, also when
    the block raises. Safe from several threads (the first to enter saves the user's value, the
    last to leave restores it); the flag is process-wide, so other threads' float32 matmuls on that
    device run in full precision meanwhile. Convolution flags (``cudnn.allow_tf32``) are left alone:
    no convolution runs here.
    """
    flag = _matmul_flag(torch.device(device).type)
    if flag is None:
        yield
        return
    name, get, set_, full = flag
    with _forced_lock:
        state = _forced.get(name)
        if state is None:
            _forced[name] = [1, get()]
            set_(full)
        else:
            state[0] += 1
    try:
        yield
    finally:
        with _forced_lock:
            state = _forced[name]
            state[0] -= 1
            if state[0] == 0:
                del _forced[name]
                set_(state[1])


def _is_solver_failure(error: BaseException) -> bool:
    """A failed eigensolve (no convergence, a cuSOLVER / MAGMA status), not a memory or device error."""
    if isinstance(error, torch.linalg.LinAlgError):
        return True
    if not isinstance(error, RuntimeError) or isinstance(error, torch.cuda.OutOfMemoryError):
        return False
    text = str(error).lower()
    return any(word in text for word in ("cusolver", "magma", "syev", "converge"))


def _eigvalsh_or_cpu_float64(gram: torch.Tensor, rebuild: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``eigvalsh(gram)``; if the solver fails, ``eigvalsh(rebuild())`` where ``rebuild`` gives the
    same Gram matrices in float64 on the CPU (logged once per process at warning level)."""
    global _fallback_logged
    try:
        return torch.linalg.eigvalsh(gram)
    except RuntimeError as error:
        if not _is_solver_failure(error):
            raise
        level = logging.DEBUG if _fallback_logged else logging.WARNING
        _fallback_logged = True
        logger.log(
            level,
            "eigvalsh failed on %d %dx%d %s Gram matrices on %s (%s); solved again on the CPU in float64"
            " (later failures are logged at debug level)",
            gram.shape[0], gram.shape[1], gram.shape[2], str(gram.dtype).replace("torch.", ""), gram.device,
            str(error).splitlines()[0] if str(error) else type(error).__name__,
        )
    return torch.linalg.eigvalsh(rebuild())


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


_GRAM_LEAF = 128  # rows of the diagonal blocks computed as full products


def gram_lower_(mats: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the Gram matrices ``mats @ mats^T`` of a wide stack into ``out``, lower triangle
    only (the blocks above the diagonal blocks are zeroed; ``eigvalsh`` reads the lower triangle).

    Computed by halving: the two diagonal halves recursively, the block below them as one
    product, down to diagonal blocks of 128 rows, which are full products. For large sides that
    skips close to half of the multiply-adds of the full product (48% at side 4096) while every
    product stays large.

    Args:
        mats: ``(batch, m, n)`` with ``m <= n``.
        out: ``(batch, m, m)``, same dtype and device.
    """
    _gram_lower_rows(mats, out, 0, mats.shape[1])
    return out


def _gram_lower_rows(mats: torch.Tensor, out: torch.Tensor, lo: int, hi: int) -> None:
    """:func:`gram_lower_` for rows ``lo:hi`` (a module-level recursion: a nested one would be a
    reference cycle that keeps ``mats`` and ``out`` alive until the garbage collector runs)."""
    if hi - lo <= _GRAM_LEAF:
        rows = mats[:, lo:hi]
        torch.matmul(rows, rows.transpose(1, 2), out=out[:, lo:hi, lo:hi])
        return
    mid = (lo + hi) // 2
    _gram_lower_rows(mats, out, lo, mid)
    _gram_lower_rows(mats, out, mid, hi)
    torch.matmul(mats[:, mid:hi], mats[:, lo:mid].transpose(1, 2), out=out[:, mid:hi, lo:mid])
    out[:, lo:mid, mid:hi] = 0


@torch.no_grad()
def gram_eigenvalues(matrices: torch.Tensor) -> torch.Tensor:
    """Squared singular values of a stack of matrices.

    Args:
        matrices: ``(batch, m, n)``, floating point, any device.

    Returns:
        ``(batch, min(m, n))`` eigenvalues of the smaller Gram matrix, ascending, in the
        input's dtype and device, with round-off negatives clamped to 0. Full float32
        precision (:func:`full_float32_precision`); solved on the CPU in float64 if the
        eigensolver fails.
    """
    if matrices.dim() != 3:
        raise ValueError(f"expected a (batch, m, n) stack, got shape {tuple(matrices.shape)}")
    if matrices.shape[1] > matrices.shape[2]:
        matrices = matrices.transpose(1, 2)
    batch, side = matrices.shape[:2]

    def rebuild() -> torch.Tensor:
        cpu = matrices.detach().to("cpu", torch.float64)
        return gram_lower_(cpu, torch.empty(batch, side, side, dtype=torch.float64))

    with full_float32_precision(matrices.device):
        gram = gram_lower_(matrices, torch.empty(batch, side, side, dtype=matrices.dtype, device=matrices.device))
        eigs = _eigvalsh_or_cpu_float64(gram, rebuild)
    return eigs.to(matrices.device, matrices.dtype).clamp_(min=0)


@torch.no_grad()
def iter_pooled_spectra(
    stacks: Sequence[torch.Tensor], precision: str = "auto"
) -> Iterator[tuple[list[int], list[torch.Tensor | None]]]:
    """Like :func:`pooled_spectra`, but yields ``(indices, spectra)`` one shape bucket at a
    time (so callers can report progress and free memory as they go).

    The Gram matrices of a bucket (lower triangles, see :func:`gram_lower_`) are written
    straight into one preallocated batch (no copy of the weights) and solved with one
    ``eigvalsh`` call, in full float32 precision (:func:`full_float32_precision`). A stack with
    a NaN or inf entry (seen on the Gram diagonal, ``sum_j w_ij^2``) gets ``None`` instead of a
    spectrum. If the eigensolver fails on a bucket, that bucket's Gram matrices are rebuilt and
    solved on the CPU in float64 (a warning the first time), and its spectra are those values.
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
        total = sum(m.shape[0] for _, m in members)

        def build(on: torch.device, as_dtype: torch.dtype) -> torch.Tensor:
            gram = torch.empty(total, side, side, dtype=as_dtype, device=on)
            start = 0
            for _, mats in members:
                gram_lower_(mats.to(on, as_dtype), gram[start : start + mats.shape[0]])
                start += mats.shape[0]
            return gram

        with full_float32_precision(device):
            gram = build(device, dtype)
            finite = torch.isfinite(torch.diagonal(gram, dim1=1, dim2=2)).all(dim=1)
            all_finite = bool(finite.all())
            if not all_finite:
                gram[~finite] = 0  # solvable placeholder; those stacks report None

            def rebuild() -> torch.Tensor:
                again = build(torch.device("cpu"), torch.float64)
                again[~finite.cpu()] = 0
                return again

            eigs = _eigvalsh_or_cpu_float64(gram, rebuild).to(device).clamp_(min=0)
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
