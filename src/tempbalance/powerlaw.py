"""Power-law fits of the tail of an eigenvalue spectrum: median Hill, KS goodness-of-fit,
fix-finger. Each takes a sorted 1-D float64 tensor and returns one :class:`PowerLawFit`.

Conventions (see docs/method): for a candidate ``xmin = lambda_i`` the tail is
``lambda_i .. lambda_{N-1}``, of size ``n = N - i`` (xmin counted), and

    alpha = 1 + n / sum_{j >= i} ln(lambda_j / xmin)                      ("reference")
    alpha = 1 + (n - 1) / sum_{j > i} ln(lambda_j / xmin)                 ("textbook")
    D     = max_{k < n} | 1 - (lambda_{i+k} / xmin)^(1 - alpha) - k / n |  (KS distance)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "PowerLawFit",
    "FIT_METHODS",
    "HILL_CONVENTIONS",
    "fit_power_law",
    "fit_median",
    "fit_ks",
    "fit_fix_finger",
    "ks_distance",
]

HILL_CONVENTIONS = ("reference", "textbook")
EQUAL_RTOL = 1e-5  # a tail whose largest/smallest ratio is below 1 + EQUAL_RTOL counts as all-equal
_KS_CHUNK_ELEMENTS = 1 << 16  # work-array size per chunk of xmin candidates (512 KiB float64: stays in cache)
_KS_LEVELS = (32, 256)  # tail points per candidate of the successive lower-bound passes of the KS scan
_KS_SEEDS = 4  # candidates (smallest lower bounds) whose exact KS distance sets the pruning bar


@dataclass(frozen=True)
class PowerLawFit:
    """Result of one power-law tail fit.

    Attributes:
        alpha: the tail exponent (NaN when the fit could not be made).
        xmin: the eigenvalue where the tail starts (NaN on failure).
        ks_distance: Kolmogorov-Smirnov distance between the tail and the fitted law.
        tail_size: eigenvalues in the tail, xmin included (0 on failure).
        num_eigs: eigenvalues the fit saw (after any zero filtering).
        reason: why the fit failed, or None.
    """

    alpha: float
    xmin: float
    ks_distance: float
    tail_size: int
    num_eigs: int
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None

    @classmethod
    def failed(cls, reason: str, num_eigs: int) -> "PowerLawFit":
        nan = float("nan")
        return cls(nan, nan, nan, 0, num_eigs, reason)


def _check_hill(hill: str) -> None:
    if hill not in HILL_CONVENTIONS:
        raise ValueError(f"hill={hill!r} is not one of {HILL_CONVENTIONS}")


def _precheck(eigs: torch.Tensor) -> str | None:
    n = eigs.numel()
    if n < 3:
        return f"too few eigenvalues to fit ({n}; need at least 3)"
    if not bool(torch.isfinite(eigs).all()):
        return "non-finite eigenvalues"
    return None


def _tail_problem(tail: torch.Tensor) -> str | None:
    xmin, top = float(tail[0]), float(tail[-1])
    if not xmin > 0:
        return "xmin is 0 (rank-deficient matrix); set filter_zeros=True to fit the non-zero eigenvalues"
    if top <= xmin * (1 + EQUAL_RTOL):
        return "tail eigenvalues are all equal (no power law to fit)"
    return None


def _hill_alpha(log_tail: torch.Tensor, hill: str) -> float:
    n = log_tail.numel()
    s = float((log_tail - log_tail[0]).sum())
    return 1.0 + (n if hill == "reference" else n - 1) / s


def ks_distance(tail: torch.Tensor, alpha: float) -> float:
    """KS distance ``max_k |1 - (tail_k / tail_0)^(1 - alpha) - k / n|`` of a sorted tail."""
    n = tail.numel()
    k = torch.arange(n, dtype=tail.dtype, device=tail.device)
    theory = 1 - torch.exp((1 - alpha) * torch.log(tail / tail[0]))
    return float((theory - k / n).abs().max())


def fit_median(eigs: torch.Tensor, xmin_pos: float = 2, hill: str = "reference") -> PowerLawFit:
    """The reference default ("median", PL_Alpha_Hill): ``xmin = lambda[floor(N / xmin_pos)]``.

    Args:
        eigs: 1-D ascending float64 eigenvalues.
        xmin_pos: the tail starts at index ``floor(N / xmin_pos)``; 2 = the median.
        hill: ``"reference"`` (n counts xmin, as the reference code) or ``"textbook"``.
    """
    _check_hill(hill)
    if not (isinstance(xmin_pos, (int, float)) and xmin_pos >= 1 and math.isfinite(xmin_pos)):
        raise ValueError(f"xmin_pos={xmin_pos!r} must be a finite number >= 1")
    problem = _precheck(eigs)
    if problem:
        return PowerLawFit.failed(problem, eigs.numel())
    total = eigs.numel()
    start = int(total // xmin_pos)
    tail = eigs[start:]
    if tail.numel() < 2:
        return PowerLawFit.failed(f"tail too short ({tail.numel()} eigenvalues)", total)
    problem = _tail_problem(tail)
    if problem:
        return PowerLawFit.failed(problem, total)
    alpha = _hill_alpha(torch.log(tail), hill)
    return PowerLawFit(alpha, float(tail[0]), ks_distance(tail, alpha), tail.numel(), total)


def _ks_rows(
    logs: torch.Tensor, one_minus_alpha: torch.Tensor, inv_n: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """``max_j |(lambda_j / lambda_r)^(1 - alpha_r) + (j - r) / n_r - 1|`` over the column indices
    ``cols`` for each candidate index ``r`` in ``rows`` (a column left of ``r`` contributes 0).

    Shapes: ``one_minus_alpha``, ``inv_n``, ``rows``: ``(R,)``; ``cols``: ``(C,)`` shared by all
    rows or ``(R, C)`` per row; returns ``(R,)``.
    """
    work = logs[cols] - logs[rows].unsqueeze(1)
    work.clamp_(min=0).mul_(one_minus_alpha.unsqueeze(1)).exp_()
    steps = (cols - rows.unsqueeze(1)).clamp_(min=0).to(logs.dtype)
    work.addcmul_(steps, inv_n.unsqueeze(1)).sub_(1).abs_()
    return work.amax(dim=1)


def _ks_exact(logs: torch.Tensor, one_minus_alpha: torch.Tensor, inv_n: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Exact KS distance of each candidate in ``rows`` (ascending indices into ``logs``; the
    other arguments aligned with it), in chunks whose work array holds about
    ``_KS_CHUNK_ELEMENTS`` values, so it stays in cache."""
    total = logs.numel()
    out = torch.empty(rows.numel(), dtype=logs.dtype, device=logs.device)
    row_list = rows.tolist()
    start = 0
    while start < len(row_list):
        first = row_list[start]
        stop = min(len(row_list), start + max(1, _KS_CHUNK_ELEMENTS // (total - first)))
        cols = torch.arange(first, total, device=logs.device)
        out[start:stop] = _ks_rows(logs, one_minus_alpha[start:stop], inv_n[start:stop], rows[start:stop], cols)
        start = stop
    return out


def _ks_lower_bound(
    logs: torch.Tensor, one_minus_alpha: torch.Tensor, inv_n: torch.Tensor, rows: torch.Tensor, points: int
) -> torch.Tensor:
    """A lower bound of each candidate's KS distance: the same statistic over ``points``
    evenly spaced positions of its own tail (a maximum over a subset of the exact terms)."""
    total = logs.numel()
    out = torch.empty(rows.numel(), dtype=logs.dtype, device=logs.device)
    offsets = torch.arange(points, device=logs.device)
    chunk = max(1, _KS_CHUNK_ELEMENTS // points)
    for start in range(0, rows.numel(), chunk):
        r = rows[start : start + chunk]
        stride = torch.clamp((total - r) // points, min=1)
        cols = torch.clamp(r.unsqueeze(1) + stride.unsqueeze(1) * offsets, max=total - 1)
        out[start : start + chunk] = _ks_rows(
            logs, one_minus_alpha[start : start + chunk], inv_n[start : start + chunk], r, cols
        )
    return out


def _candidate_scan(eigs: torch.Tensor, first: int, last: int, hill: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Alpha and KS distance for every xmin candidate index in ``[first, last)``.

    Candidates whose fit is undefined (including a tail whose largest/smallest ratio is below
    ``1 + EQUAL_RTOL``) get ``D = inf``; candidates with ``alpha <= 1`` get ``D = 1`` (as
    WeightWatcher does). The scan is exact but pruned: the exact distance of
    the ``_KS_SEEDS`` candidates with the smallest cheap lower bound (the statistic on a few
    evenly spaced tail points) sets a bar; each refinement level (``_KS_LEVELS`` points per
    tail) drops candidates whose bound exceeds the bar, and the rest are evaluated exactly.
    Pruned entries of the returned distances hold a lower bound above the minimum, so
    ``argmin`` picks the same candidate as a full scan.
    """
    total = eigs.numel()
    logs = torch.log(eigs)
    # sum_{j >= i} ln(lambda_j / lambda_i) from suffix sums of logs taken relative to the largest
    # eigenvalue (small terms first, so a nearly flat tail does not cancel catastrophically).
    shifted = logs - logs[-1]
    suffix = torch.flip(torch.cumsum(torch.flip(shifted, [0]), 0), [0])
    idx = torch.arange(first, last, device=eigs.device)
    n = (total - idx).to(eigs.dtype)
    sums = suffix[first:last] - n * shifted[first:last]
    numer = n if hill == "reference" else n - 1
    alpha = 1 + numer / sums
    # a tail spanning less than a factor 1 + EQUAL_RTOL is round-off around one value, not a law
    # (its alpha would be ~1e5 * n); WeightWatcher / powerlaw would still score it
    distinct = eigs[-1] > eigs[first:last] * (1 + EQUAL_RTOL)
    valid = torch.isfinite(alpha) & (sums > 0) & distinct
    regular = valid & (alpha > 1)
    dist = torch.where(valid, torch.ones_like(alpha), torch.full_like(alpha, float("inf")))
    pos = torch.nonzero(regular).flatten()
    if pos.numel() == 0:
        return alpha, dist
    one_minus_alpha, inv_n, rows = 1 - alpha[pos], 1 / n[pos], idx[pos]
    if pos.numel() <= 4 * _KS_SEEDS:
        dist[pos] = _ks_exact(logs, one_minus_alpha, inv_n, rows)
        return alpha, dist
    result = torch.empty_like(one_minus_alpha)
    alive = torch.arange(pos.numel(), device=eigs.device)  # candidates not yet pruned
    bar = math.inf
    for level, points in enumerate(_KS_LEVELS):
        bound = _ks_lower_bound(logs, one_minus_alpha[alive], inv_n[alive], rows[alive], points)
        result[alive] = bound
        if level == 0:  # alive is every candidate here
            seeds = torch.sort(torch.topk(bound, _KS_SEEDS, largest=False).indices).values
            exact = _ks_exact(logs, one_minus_alpha[seeds], inv_n[seeds], rows[seeds])
            result[seeds] = exact
            bar = float(exact.min()) * (1 + 1e-12)  # margin: exp may round differently per pass
            keep = bound <= bar
            keep[seeds] = False
        else:
            keep = bound <= bar
        alive = alive[keep]
    if alive.numel():
        result[alive] = _ks_exact(logs, one_minus_alpha[alive], inv_n[alive], rows[alive])
    dist[pos] = result
    return alpha, dist


def _best_candidate(eigs: torch.Tensor, first: int, last: int, hill: str) -> PowerLawFit:
    total = eigs.numel()
    alpha, dist = _candidate_scan(eigs, first, last, hill)
    best = int(torch.argmin(dist))
    if not math.isfinite(float(dist[best])):
        return PowerLawFit.failed("no xmin candidate gives a defined fit (eigenvalues all equal)", total)
    i = first + best
    return PowerLawFit(float(alpha[best]), float(eigs[i]), float(dist[best]), total - i, total)


def fit_ks(eigs: torch.Tensor, hill: str = "reference") -> PowerLawFit:
    """Clauset et al. (2009) goodness-of-fit: every eigenvalue but the largest is an xmin
    candidate; the fit with the smallest KS distance wins (WeightWatcher's default fit).

    Only positive eigenvalues can be xmin; zeros (rank deficiency) are skipped as candidates.
    """
    _check_hill(hill)
    problem = _precheck(eigs)
    if problem:
        return PowerLawFit.failed(problem, eigs.numel())
    first = int(torch.searchsorted(eigs, torch.zeros((), dtype=eigs.dtype, device=eigs.device), right=True))
    if eigs.numel() - first < 3:
        return PowerLawFit.failed(f"too few positive eigenvalues to fit ({eigs.numel() - first})", eigs.numel())
    return _best_candidate(eigs, first, eigs.numel() - 1, hill)


def fit_fix_finger(
    eigs: torch.Tensor,
    hill: str = "reference",
    bins: int = 100,
    window: tuple[float, float] = (0.95, 1.5),
) -> PowerLawFit:
    """"Fix-finger": xmin searched only near the peak of the ESD.

    The peak is ``10 ** e`` with ``e`` the left edge of the fullest of ``bins`` equal bins of
    ``log10(lambda)`` (as the reference). Candidates are the eigenvalues in
    ``[window[0] * peak, window[1] * peak]``, both bounds compared in linear units (the
    reference compares a log10 lower bound against linear values, so its lower bound is
    effectively absent); the one with the smallest KS distance wins. When no eigenvalue falls
    in the window, the one nearest the peak is used.
    """
    _check_hill(hill)
    problem = _precheck(eigs)
    if problem:
        return PowerLawFit.failed(problem, eigs.numel())
    total = eigs.numel()
    first_pos = int(torch.searchsorted(eigs, torch.zeros((), dtype=eigs.dtype, device=eigs.device), right=True))
    positive = eigs[first_pos:]
    if positive.numel() < 3:
        return PowerLawFit.failed(f"too few positive eigenvalues to fit ({positive.numel()})", total)
    logs = torch.log10(positive)
    lo, hi = float(logs[0]), float(logs[-1])
    if hi <= lo:
        return PowerLawFit.failed("tail eigenvalues are all equal (no power law to fit)", total)
    counts = torch.histc(logs, bins=bins, min=lo, max=hi)
    peak = 10 ** (lo + (hi - lo) * int(torch.argmax(counts)) / bins)
    bounds = torch.tensor([window[0] * peak, window[1] * peak], dtype=eigs.dtype, device=eigs.device)
    first, last = (int(v) for v in torch.searchsorted(eigs, bounds))
    last = min(max(last, first), total - 1)
    if first >= last:
        nearest = first_pos + int(torch.argmin((positive[:-1] - peak).abs()))
        first, last = nearest, nearest + 1
    first = max(first, first_pos)
    return _best_candidate(eigs, first, last, hill)


FitFn = Callable[..., PowerLawFit]
FIT_METHODS: dict[str, FitFn] = {
    "median": fit_median,
    "ks": fit_ks,
    "fix-finger": fit_fix_finger,
}


def fit_power_law(
    eigs: torch.Tensor,
    method: str = "median",
    *,
    xmin_pos: float = 2,
    hill: str = "reference",
    filter_zeros: bool = False,
    zero_threshold: float = 1e-5,
) -> PowerLawFit:
    """Fit the tail of a sorted eigenvalue spectrum.

    Args:
        eigs: 1-D, ascending (any float dtype; computed in float64).
        method: ``"median"`` (default, the reference), ``"ks"`` or ``"fix-finger"``.
        xmin_pos: ``"median"`` only: tail starts at ``floor(N / xmin_pos)``.
        hill: ``"reference"`` or ``"textbook"`` numerator convention.
        filter_zeros: drop eigenvalues ``<= zero_threshold`` first (default False).
        zero_threshold: the cut for ``filter_zeros``; default 1e-5.
    """
    if method not in FIT_METHODS:
        raise ValueError(f"fit={method!r} is not one of {tuple(FIT_METHODS)}")
    eigs = eigs.to(torch.float64)
    if filter_zeros:
        eigs = eigs[eigs > zero_threshold]
    if method == "median":
        return fit_median(eigs, xmin_pos=xmin_pos, hill=hill)
    return FIT_METHODS[method](eigs, hill=hill)
