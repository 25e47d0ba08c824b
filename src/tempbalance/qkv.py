"""Fused q/k/v projections: the name rule that recognises them and the one splitter that turns
such a layer into its three ``(out/3) x in`` matrices ``<name>.q``, ``.k``, ``.v``.

The splitter reads only a :class:`tempbalance.LayerRef`'s name, kind and weight shape, so it also
works for a ref whose module is a stand-in (a tensor read from a checkpoint file, with ``kind``
``"Linear"`` for an ``out x in`` weight or ``"Conv1D"`` for GPT-2's ``in x out`` storage).
"""

from __future__ import annotations

import re
from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn

from .layers import LayerRef, MatrixOptions

__all__ = [
    "QKV_SUFFIXES",
    "FUSED_QKV_NAME",
    "is_fused_qkv_name",
    "fused_qkv_layout",
    "is_fused_qkv",
    "qkv_parts",
    "split_fused_qkv",
    "split_parent",
]

QKV_SUFFIXES = ("q", "k", "v")

#: Last name component of a fused q/k/v projection (GPT-2 ``c_attn``, ViT/timm ``qkv``,
#: GPT-NeoX / Falcon ``query_key_value``, MPT ``Wqkv``, ``qkv_proj``, ``to_qkv``, ``in_proj``).
FUSED_QKV_NAME = re.compile(r"(?i)^(c_attn|query_key_value|in_proj|w?_?qkv(_proj)?|to_qkv|qkv_?linear)$")

Predicate = Callable[[str, nn.Module], bool]


def is_fused_qkv_name(name: str) -> bool:
    """True when the last component of a module or tensor name is that of a fused q/k/v
    projection (:data:`FUSED_QKV_NAME`); a trailing ``.weight`` is ignored, so state-dict keys
    work as well (``"h.0.attn.c_attn.weight"``)."""
    if name.endswith(".weight"):
        name = name[: -len(".weight")]
    return bool(FUSED_QKV_NAME.match(name.rsplit(".", 1)[-1]))


def fused_qkv_layout(kind: str, shape: Sequence[int], module: nn.Module | None = None) -> str | None:
    """How a 2-D weight splits into three equal q/k/v parts: ``"rows"`` (stored ``out x in``,
    ``out == 3 * in``: a Linear), ``"columns"`` (stored ``in x out``, ``out == 3 * in``: GPT-2's
    ``Conv1D``), or None when it does not (another kind, or unequal parts as in grouped-query
    attention). ``module``, when a real Linear, counts as ``kind="Linear"`` (subclasses too)."""
    if len(shape) != 2:
        return None
    rows, cols = int(shape[0]), int(shape[1])
    if kind == "Conv1D":
        return "columns" if cols == 3 * rows else None
    if kind == "Linear" or isinstance(module, nn.Linear):
        return "rows" if rows == 3 * cols else None
    return None


def is_fused_qkv(name: str, module: nn.Module) -> bool:
    """True when ``module`` is a fused q/k/v projection with three equal parts: a Linear with
    ``out_features == 3 * in_features`` or a GPT-2 ``Conv1D`` with ``nf == 3 * nx``, whose name
    passes :func:`is_fused_qkv_name`."""
    w = getattr(module, "weight", None)
    if not is_fused_qkv_name(name) or not isinstance(w, torch.Tensor):
        return False
    conv1d = type(module).__name__ == "Conv1D" and getattr(module, "nf", None) == (w.shape[1] if w.dim() == 2 else None)
    return fused_qkv_layout("Conv1D" if conv1d else type(module).__name__, tuple(w.shape), module) is not None


def _transposed_columns(
    start: int, stop: int, w: torch.Tensor, module: nn.Module, options: MatrixOptions
) -> torch.Tensor:
    """GPT-2 ``Conv1D`` stores ``(in, out)``: columns ``start:stop`` as a ``(1, stop-start, in)`` stack."""
    return w[:, start:stop].t().unsqueeze(0)


def _parts(ref: LayerRef, base: str, layout: str) -> list[LayerRef]:
    w = ref.weight
    size = (w.shape[1] if layout == "columns" else w.shape[0]) // 3
    prefix = f"{base}." if base else ""
    refs = []
    for i, suffix in enumerate(QKV_SUFFIXES):
        start, stop = i * size, (i + 1) * size
        name = f"{prefix}{suffix}"
        if layout == "columns":
            part = LayerRef(name, ref.module, ref.kind, w, partial(_transposed_columns, start, stop), ref.frozen)
        else:
            part = LayerRef(name, ref.module, ref.kind, w, ref.matrix_fn, ref.frozen, weight_slice=slice(start, stop))
        part.tied_names = [f"{t}.{suffix}" for t in ref.tied_names]
        refs.append(part)
    return refs


def qkv_parts(ref: LayerRef, predicate: Predicate | None = None) -> list[LayerRef] | None:
    """The q, k, v parts of a fused projection, or None when ``ref`` is not one.

    ``nn.MultiheadAttention``'s ``<name>.in_proj`` ref gives ``<name>.q/.k/.v`` (row blocks);
    a fused Linear / GPT-2 ``Conv1D`` named ``X`` gives ``X.q/.k/.v`` (row / column blocks).

    Args:
        ref: one layer (a part already, ``weight_slice`` set, is never split again).
        predicate: ``(name, module) -> bool`` deciding what is fused (e.g. :func:`is_fused_qkv`).
            Default: :func:`is_fused_qkv_name` and :func:`fused_qkv_layout` on the ref's kind and
            weight shape (no module needed).
    """
    if ref.weight_slice is not None:
        return None
    shape = tuple(ref.weight.shape)
    if ref.kind == "MultiheadAttention" and ref.name.rsplit(".", 1)[-1] == "in_proj":
        return _parts(ref, ref.name.rpartition(".")[0], "rows") if len(shape) == 2 and shape[0] % 3 == 0 else None
    kind = "Conv1D" if type(ref.module).__name__ == "Conv1D" else ref.kind  # also a checkpoint file's stand-in
    layout = fused_qkv_layout(kind, shape, ref.module)
    fused = predicate(ref.name, ref.module) if predicate is not None else is_fused_qkv_name(ref.name)
    return _parts(ref, ref.name, layout) if fused and layout is not None else None


def split_fused_qkv(refs: Sequence[LayerRef], predicate: Predicate | None = None) -> list[LayerRef]:
    """Replace every fused q/k/v projection in ``refs`` by its three parts (:func:`qkv_parts`);
    other refs are kept as they are, in order."""
    out: list[LayerRef] = []
    for ref in refs:
        parts = qkv_parts(ref, predicate)
        out.extend(parts if parts is not None else [ref])
    return out


def split_parent(name: str) -> str | None:
    """``"blk.attn.c_attn.q"`` -> ``"blk.attn.c_attn"``; None for a name without a q/k/v suffix."""
    head, _, last = name.rpartition(".")
    return head if head and last in QKV_SUFFIXES else None
