"""FARMS spectra: a layer's eigenvalues pooled over fixed-aspect-ratio windows of its matrices.

FARMS (ICML 2025, arXiv 2506.06280) removes the bias of a matrix's aspect ratio on alpha by
fitting the pooled spectrum of many submatrices of one shape. This module turns a layer's
``(batch, m, n)`` matrix stack into the stack of its windows; the eigenvalues of all windows of
one shape (across layers) are then one batched Gram + ``eigvalsh`` (:mod:`tempbalance.spectrum`).
The placement rules are written down in ``docs/farms.md``.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import ConfigError
from .layers import LayerRef

if TYPE_CHECKING:
    from .analysis import AnalysisOptions

__all__ = ["ESD_MODES", "check_window_options", "window_offsets", "matrix_windows", "conv_blocks", "farms_windows"]

ESD_MODES = ("full", "farms")


def check_window_options(esd: str, window_rows: int, window_q: float, windows_per_dim: int) -> None:
    """Validate the ``esd`` mode and the FARMS window settings.

    Raises:
        ConfigError: naming the bad value and what is accepted.
    """
    if esd not in ESD_MODES:
        raise ConfigError(f"esd={esd!r} is not one of {ESD_MODES}")
    for name, value in (("window_rows", window_rows), ("windows_per_dim", windows_per_dim)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"{name}={value!r} must be an integer >= 1")
    if isinstance(window_q, bool) or not (
        isinstance(window_q, numbers.Real) and math.isfinite(window_q) and window_q >= 1
    ):
        raise ConfigError(
            f"window_q={window_q!r} must be a finite number >= 1 (windows are at least as wide as tall; "
            "a tall window has the spectrum of its transpose)"
        )


def window_offsets(size: int, window: int, count: int) -> tuple[int, list[int]]:
    """Where FARMS's fixed-number-of-windows placement puts the windows along one side.

    Args:
        size: length of the side (rows or columns).
        window: window length along it.
        count: windows wanted along it (``windows_per_dim``, >= 1).

    Returns:
        ``(length, offsets)``: a side no longer than its window gives ``(size, [0])`` (the whole
        side); otherwise ``step = max(1, (size - window) // (count - 1))``, ``min(count,
        max(1, (size - window) // step + 1))`` windows at offsets ``min(i * step, size - window)``
        (one window at offset 0 when ``count == 1``).
    """
    if size <= window:
        return size, [0]
    if count == 1:
        return window, [0]
    slack = size - window
    step = max(1, slack // (count - 1))
    number = min(count, max(1, slack // step + 1))
    return window, [min(i * step, slack) for i in range(number)]


def matrix_windows(
    stack: torch.Tensor, window_rows: int = 100, window_q: float = 2.0, windows_per_dim: int = 10
) -> torch.Tensor:
    """The FARMS windows of each matrix of a stack, as stored (rows = out, columns = in).

    Windows are ``window_rows x int(window_rows * window_q)``, placed along each side by
    :func:`window_offsets` (a side shorter than its window uses the whole side).

    Args:
        stack: ``(batch, m, n)``.

    Returns:
        ``(batch * row_windows * col_windows, h, w)``, matrix-major then row offset then column
        offset; the stack itself when one window covers each whole matrix, else a copy.
    """
    batch, m, n = stack.shape
    h, rows = window_offsets(m, window_rows, windows_per_dim)
    w, cols = window_offsets(n, int(window_rows * window_q), windows_per_dim)
    if (h, w) == (m, n):
        return stack
    row_index = (torch.tensor(rows)[:, None] + torch.arange(h)).to(stack.device)
    col_index = (torch.tensor(cols)[:, None] + torch.arange(w)).to(stack.device)
    windows = stack[:, row_index[:, None, :, None], col_index[None, :, None, :]]  # (batch, kr, kc, h, w)
    return windows.reshape(-1, h, w)


def conv_blocks(stack: torch.Tensor, window_q: float = 2.0) -> torch.Tensor:
    """FARMS's blocks of per-kernel-position conv matrices.

    Each matrix is oriented rows >= cols (transposed when ``out < in``) and cut into
    ``floor(rows / h)`` non-overlapping blocks of ``h = max(1, int(cols // window_q))`` consecutive
    rows and all columns, from row 0; the ``rows mod h`` last rows are in no block.

    Args:
        stack: ``(batch, m, n)`` per-position matrices.

    Returns:
        ``(batch * blocks, h, cols)``, matrix-major (a view of ``stack`` when no transpose and no
        left-over rows).
    """
    if stack.shape[1] < stack.shape[2]:
        stack = stack.transpose(1, 2)
    batch, rows, cols = stack.shape
    h = max(1, int(cols // window_q))
    blocks = rows // h
    return stack[:, : blocks * h].reshape(batch * blocks, h, cols)


def _uses_conv_rule(ref: LayerRef, conv_mode: str) -> bool:
    """Per-position matrices of a Conv / ConvTranspose layer take the conv rule; everything else
    (Linear, Embedding, attention projections, flattened convs) the window rule."""
    return conv_mode == "per_position" and isinstance(ref.module, nn.modules.conv._ConvNd)


def farms_windows(ref: LayerRef, stack: torch.Tensor, options: "AnalysisOptions") -> torch.Tensor:
    """The stack whose pooled spectrum is the layer's FARMS ESD.

    Convs (per-position matrices): :func:`conv_blocks`; other layers: :func:`matrix_windows`.
    The entries in no window are never part of the spectrum, but a NaN or inf anywhere in the
    matrices still marks the layer's spectrum as non-finite, as for the plain ESD (its first
    window is then a copy with a NaN).

    Args:
        ref: the layer.
        stack: its ``(batch, m, n)`` matrices (:meth:`LayerRef.matrices`, in the compute dtype).
        options: ``window_rows``, ``window_q``, ``windows_per_dim`` and ``conv_mode`` are read.
    """
    if _uses_conv_rule(ref, options.conv_mode):
        windows = conv_blocks(stack, options.window_q)
    else:
        windows = matrix_windows(stack, options.window_rows, options.window_q, options.windows_per_dim)
    if windows is not stack and not bool(torch.isfinite(stack).all()):
        windows = windows.clone()
        windows[0, 0, 0] = float("nan")
    return windows
