"""Figures for the analysis and the training report: ESD with its power-law fit, alpha by
layer, heat maps (layers x epochs) and mean +- std curves; matplotlib is imported lazily.

Figures are drawn on an Agg canvas without ``pyplot``, so no global backend is changed.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from .atomic import atomic_path

__all__ = ["plot_esd", "plot_alpha_summary", "plot_alpha_depth", "plot_heatmap", "plot_curves"]


def _figure(width: float, height: float):
    """A matplotlib ``Figure`` bound to an Agg canvas (imports matplotlib on first use)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'tempbalance[plots]'") from exc
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> None:
    """Write the figure atomically (a temporary file renamed into place; its directory created)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def plot_esd(record: Any, path: str | os.PathLike, *, title: str | None = None) -> None:
    """Log-log histogram of one layer's eigenvalues with the fitted power law.

    Args:
        record: a :class:`tempbalance.LayerRecord` analysed with ``keep_eigenvalues=True``
            (uses ``eigenvalues``, ``alpha``, ``xmin``, ``tail_size``, ``num_eigs``, ``reason``).
        path: the image file to write (format from the extension, e.g. ``.png``).
        title: default: the layer name, alpha and the KS distance (or why the fit failed).

    The histogram is a density over 60 log-spaced bins of the positive eigenvalues; the line is
    the fitted tail density ``(tail_size / N) * (alpha - 1) / xmin * (x / xmin)^-alpha`` for
    ``x >= xmin``; the dashed vertical line marks ``xmin``.
    """
    eigs = getattr(record, "eigenvalues", None)
    if eigs is None:
        raise ValueError(f"layer {record.name!r} has no eigenvalues: analyze with keep_eigenvalues=True")
    eigs = np.asarray(eigs, dtype=np.float64)
    positive = eigs[eigs > 0]
    fig = _figure(5.0, 3.6)
    ax = fig.add_subplot()
    if positive.size:
        lo, hi = positive.min(), positive.max()
        if hi <= lo:
            lo, hi = lo / 1.5, hi * 1.5
        bins = np.logspace(math.log10(lo), math.log10(hi), 61)
        counts, edges = np.histogram(positive, bins=bins)
        density = counts / (eigs.size * np.diff(edges))
        ax.stairs(density, edges, fill=True, alpha=0.5, color="tab:blue", label="ESD")
        alpha, xmin = float(record.alpha), float(record.xmin)
        if math.isfinite(alpha) and math.isfinite(xmin) and xmin > 0:
            x = np.logspace(math.log10(xmin), math.log10(hi), 50)
            scale = record.tail_size / max(eigs.size, 1) * (alpha - 1) / xmin
            ax.plot(x, scale * (x / xmin) ** (-alpha), color="tab:red", lw=1.5, label=f"power law, alpha={alpha:.2f}")
            ax.axvline(xmin, color="tab:red", ls="--", lw=1, label=f"xmin={xmin:.3g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="lower left")
    else:
        ax.text(0.5, 0.5, "no positive eigenvalues", ha="center", va="center", transform=ax.transAxes)
    if title is None:
        if record.reason:
            title = f"{record.name}: no fit ({record.reason})"
        else:
            title = f"{record.name}: alpha={record.alpha:.3f}, D={record.ks_distance:.3f}"
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("eigenvalue lambda = sigma^2")
    ax.set_ylabel("density")
    _save(fig, path)


def plot_alpha_summary(records: Sequence[Any], path: str | os.PathLike) -> None:
    """Bar chart of alpha by layer (in order); failed fits are marked with an ``x``.

    The shaded band 2 <= alpha <= 6 is HT-SR's "well trained" range.
    """
    names = [r.name for r in records]
    alphas = np.array([r.alpha for r in records], dtype=np.float64)
    fig = _figure(max(5.0, 0.18 * len(names) + 1.5), 3.8)
    ax = fig.add_subplot()
    positions = np.arange(len(names))
    ok = np.isfinite(alphas)
    ax.axhspan(2, 6, color="tab:green", alpha=0.1, label="2 <= alpha <= 6")
    ax.bar(positions[ok], alphas[ok], color="tab:blue", label="alpha")
    if (~ok).any():
        ax.plot(positions[~ok], np.zeros(int((~ok).sum())), "x", color="tab:red", label="no fit")
    ax.set_xticks(positions, names, rotation=90, fontsize=max(4, min(8, 400 // max(len(names), 1))))
    ax.set_ylabel("alpha")
    ax.set_title(f"alpha by layer ({int(ok.sum())} of {len(names)} fitted)", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_alpha_depth(records: Sequence[Any], path: str | os.PathLike, *, title: str | None = None) -> None:
    """Alpha against depth (Transformer block index), one line per module type (``self_attn.q_proj``,
    ``mlp.down_proj``, ...; see :func:`tempbalance.summaries.alpha_by_depth`).

    Layers outside numbered blocks (embeddings, the LM head) and failed fits are left out; the
    shaded band 2 <= alpha <= 6 is HT-SR's "well trained" range.

    Raises:
        ValueError: when no record sits in a numbered block.
    """
    from .summaries import alpha_by_depth

    series = alpha_by_depth(records)
    if not series:
        raise ValueError("no layer sits in a numbered block (names like model.layers.N.*, transformer.h.N.*, blocks.N.*)")
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    ax.axhspan(2, 6, color="tab:green", alpha=0.1, label="2 <= alpha <= 6")
    for kind, (blocks, alphas) in series.items():
        ax.plot(blocks, alphas, marker="o", ms=3, lw=1.2, label=kind)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel("alpha")
    ax.set_title(title or f"alpha by depth ({len(series)} module types)", fontsize=9)
    ax.legend(fontsize=6, ncol=max(1, len(series) // 8), loc="best")
    _save(fig, path)


def plot_heatmap(
    values: Any,
    row_labels: Sequence[str],
    col_labels: Sequence[Any],
    path: str | os.PathLike,
    *,
    title: str = "",
    cbar_label: str = "",
) -> None:
    """Heat map of a 2-D array (rows = layers, columns = epochs); NaN cells are left blank.

    Raises:
        ValueError: when ``values`` is not 2-D or the labels do not match its shape.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"plot_heatmap needs a 2-D array, got shape {data.shape}")
    if len(row_labels) != data.shape[0] or len(col_labels) != data.shape[1]:
        raise ValueError(
            f"labels ({len(row_labels)} rows, {len(col_labels)} columns) do not match values of shape {data.shape}"
        )
    fig = _figure(max(5.0, 0.12 * data.shape[1] + 3), max(3.0, 0.16 * data.shape[0] + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(np.arange(data.shape[0]), list(row_labels), fontsize=max(4, min(8, 300 // max(data.shape[0], 1))))
    step = max(1, data.shape[1] // 20)
    cols = np.arange(0, data.shape[1], step)
    ax.set_xticks(cols, [str(col_labels[i]) for i in cols], fontsize=7)
    fig.colorbar(image, ax=ax, label=cbar_label)
    ax.set_title(title, fontsize=9, wrap=True)
    _save(fig, path)


def plot_curves(
    series: Mapping[str, tuple[Any, Any, Any]],
    path: str | os.PathLike,
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
) -> None:
    """Line plot of several ``name -> (x, mean, std or None)`` series, std as a shaded band.

    Raises:
        ValueError: when a series' x, mean and std lengths differ.
    """
    fig = _figure(5.5, 3.6)
    ax = fig.add_subplot()
    for name, (x, mean, std) in series.items():
        x = np.asarray(x, dtype=np.float64)
        mean = np.asarray(mean, dtype=np.float64)
        if x.shape != mean.shape:
            raise ValueError(f"series {name!r}: x has shape {x.shape} but mean has {mean.shape}")
        (line,) = ax.plot(x, mean, label=name, lw=1.4)
        if std is not None:
            std = np.asarray(std, dtype=np.float64)
            if std.shape != mean.shape:
                raise ValueError(f"series {name!r}: std has shape {std.shape} but mean has {mean.shape}")
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9, wrap=True)
    if series:
        ax.legend(fontsize=7)
    _save(fig, path)
