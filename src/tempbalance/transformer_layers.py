"""Transformer structure for balancing: norm layers, fused q/k/v projections, and blocks.

Small pieces the scheduler and the analysis can plug in: which modules are norm layers
(LayerNorm, RMSNorm, ...), how a fused ``qkv`` projection becomes three matrices, which
Transformer block a layer belongs to, and per-block averaging of a metric (Model Balancing).
:func:`model_balancing` packs them into options for :class:`tempbalance.TempBalance` through
its ``metric`` and ``assign`` hooks.
"""

from __future__ import annotations

import logging
import math
import re
from functools import partial
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .analysis import AnalysisOptions, LayerRecord, analyze_layers
from .assign import AssignFn, create_assign, get_metric
from .errors import ConfigError
from .groups import SELECTION_KEYS, LayerSelection, norm_features, plan_balance, register_norm_type
from .layers import LayerRef, MatrixOptions, find_layers, unwrap_model

__all__ = [
    "FUSED_QKV_NAME",
    "is_norm_layer",
    "is_fused_qkv",
    "split_fused_qkv",
    "transformer_layers",
    "merge_split_values",
    "split_parent",
    "find_blocks",
    "block_average",
    "register_norm_types",
    "fused_qkv_parts",
    "SplitQKVMetric",
    "block_averaged_assign",
    "model_balancing",
]

logger = logging.getLogger(__name__)

QKV_SUFFIXES = ("q", "k", "v")

#: Last name component of a fused q/k/v projection (GPT-2 ``c_attn``, ViT/timm ``qkv``,
#: GPT-NeoX / Falcon ``query_key_value``, MPT ``Wqkv``, ``qkv_proj``, ``to_qkv``, ``in_proj``).
FUSED_QKV_NAME = re.compile(r"(?i)^(c_attn|query_key_value|in_proj|w?_?qkv(_proj)?|to_qkv|qkv_?linear)$")

_NORM_TYPES: tuple[type, ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

_NORM_NAME = re.compile(r"Norm(\d+d)?$")


def is_norm_layer(module: nn.Module) -> bool:
    """True for normalisation layers whose parameters follow a weight layer's rate.

    Recognises torch's LayerNorm, RMSNorm, GroupNorm, BatchNorm*, InstanceNorm*, and any
    class whose name ends in ``Norm`` / ``LayerNorm`` / ``RMSNorm`` (Hugging Face's
    ``LlamaRMSNorm``, ``T5LayerNorm``, ...) that holds only parameters of at most one dim.
    """
    if isinstance(module, _NORM_TYPES):
        return True
    if not _NORM_NAME.search(type(module).__name__):
        return False
    params = list(module.parameters(recurse=False))
    return bool(params) and all(p.dim() <= 1 for p in params)


def is_fused_qkv(name: str, module: nn.Module) -> bool:
    """True when ``module`` is a fused q/k/v projection with three equal parts.

    A ``nn.Linear`` with ``out_features == 3 * in_features`` or a GPT-2 ``Conv1D`` with
    ``nf == 3 * nx``, whose last name component matches :data:`FUSED_QKV_NAME`.
    """
    if not FUSED_QKV_NAME.match(name.rsplit(".", 1)[-1]):
        return False
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return False
    if isinstance(module, nn.Linear):
        return w.shape[0] == 3 * w.shape[1]
    if type(module).__name__ == "Conv1D" and getattr(module, "nf", None) == w.shape[1]:
        return w.shape[1] == 3 * w.shape[0]
    return False


def _transposed_columns(
    start: int, stop: int, w: torch.Tensor, module: nn.Module, options: MatrixOptions
) -> torch.Tensor:
    """GPT-2 ``Conv1D`` stores ``(in, out)``: columns ``start:stop`` as a ``(1, stop-start, in)`` stack."""
    return w[:, start:stop].t().unsqueeze(0)


def _split_ref(ref: LayerRef) -> list[LayerRef]:
    w = ref.weight
    transposed = not isinstance(ref.module, nn.Linear)
    part = (w.shape[1] if transposed else w.shape[0]) // 3
    refs = []
    for i, suffix in enumerate(QKV_SUFFIXES):
        start, stop = i * part, (i + 1) * part
        name = f"{ref.name}.{suffix}"
        if transposed:
            new = LayerRef(name, ref.module, ref.kind, w, partial(_transposed_columns, start, stop), ref.frozen)
        else:
            new = LayerRef(name, ref.module, ref.kind, w, ref.matrix_fn, ref.frozen, weight_slice=slice(start, stop))
        new.tied_names = [f"{t}.{suffix}" for t in ref.tied_names]
        refs.append(new)
    return refs


def split_fused_qkv(
    refs: Sequence[LayerRef], predicate: Callable[[str, nn.Module], bool] = is_fused_qkv
) -> list[LayerRef]:
    """Replace every fused q/k/v projection in ``refs`` by three refs ``<name>.q/.k/.v``.

    Each part is an ``(out/3) x in`` matrix: a row slice of a Linear weight
    (``weight_slice``), a column slice of a GPT-2 ``Conv1D`` weight (stored ``in x out``).
    Other refs are kept as they are, in order.

    Args:
        refs: layers from :func:`tempbalance.find_layers`.
        predicate: ``(name, module) -> bool`` deciding what is fused. Default :func:`is_fused_qkv`.
    """
    out: list[LayerRef] = []
    for ref in refs:
        if ref.weight_slice is None and predicate(ref.name, ref.module):
            out.extend(_split_ref(ref))
        else:
            out.append(ref)
    return out


def transformer_layers(
    model: nn.Module,
    types: Iterable[type] | None = None,
    *,
    split_qkv: bool = True,
    include_frozen: bool = True,
) -> list[LayerRef]:
    """:func:`tempbalance.find_layers` with fused q/k/v projections split into three layers.

    Covers ``nn.MultiheadAttention.in_proj_weight`` and fused Linear / GPT-2 ``Conv1D``
    projections (see :func:`is_fused_qkv`); embeddings and ``Conv1D`` are found by
    ``find_layers`` itself. With ``split_qkv=False`` this is exactly ``find_layers``.
    """
    refs = find_layers(model, types, split_qkv=split_qkv, include_frozen=include_frozen)
    return split_fused_qkv(refs) if split_qkv else refs


def split_parent(name: str) -> str | None:
    """``"blk.attn.c_attn.q"`` -> ``"blk.attn.c_attn"``; None for a name without a q/k/v suffix."""
    head, _, last = name.rpartition(".")
    return head if head and last in QKV_SUFFIXES else None


def merge_split_values(values: Mapping[str, float], parents: Iterable[str] | None = None) -> dict[str, float]:
    """Average the values of split ``<name>.q/.k/.v`` entries into one ``<name>`` entry.

    One parameter can have only one learning rate, so a fused projection analysed as three
    matrices gets the mean of their three alphas (NaNs ignored; NaN if all are NaN).

    Args:
        values: ``{layer name: value}``, e.g. alphas from split refs.
        parents: restrict merging to these parent names (default: any ``.q/.k/.v`` trio whose
            three members are all present).

    Returns:
        A new dict in the order of first appearance; other entries are unchanged.
    """
    wanted = None if parents is None else set(parents)
    groups: dict[str, list[float]] = {}
    for name, value in values.items():
        parent = split_parent(name)
        if parent is not None and (wanted is None or parent in wanted):
            groups.setdefault(parent, []).append(value)
    complete = {p for p, vs in groups.items() if len(vs) == len(QKV_SUFFIXES)}
    out: dict[str, float] = {}
    for name, value in values.items():
        parent = split_parent(name)
        if parent in complete:
            if parent not in out:
                out[parent] = _nanmean(groups[parent])
        else:
            out[name] = value
    return out


def _nanmean(values: Sequence[float]) -> float:
    finite = [float(v) for v in values if not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else float("nan")


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential))


def find_blocks(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Map each layer name to the Transformer block (or residual block) that holds it.

    A block is the outermost element of an ``nn.ModuleList`` / ``nn.Sequential`` that has
    submodules of its own (GPT-2 ``transformer.h.3``, BERT ``bert.encoder.layer.3``, Llama
    ``model.layers.3``, a ResNet's ``layer2.1``). A layer outside every block (embeddings,
    ``lm_head``, a plain Linear in a Sequential) is its own block. Name parts that are not
    modules (the ``.q`` suffix of a split projection) are dropped, so the three parts of a
    projection outside every block share one block.

    Args:
        model: the model the names come from (DDP / torch.compile wrappers are unwrapped).
        names: layer names as in ``model.named_modules()``.
    """
    model = unwrap_model(model)
    blocks: dict[str, str] = {}
    for name in names:
        module = model
        path: list[str] = []
        block = None
        for part in name.split("."):
            child = module._modules.get(part) if part else None
            if child is None:
                break
            path.append(part)
            if _is_container(module) and any(True for _ in child.children()):
                block = ".".join(path)
                break
            module = child
        blocks[name] = block if block is not None else (".".join(path) or name)
    return blocks


def block_average(values: Mapping[str, float], blocks: Mapping[str, str]) -> dict[str, float]:
    """Give every layer the mean value of its block (Model Balancing's per-block alpha).

    Args:
        values: ``{layer name: value}`` (e.g. alpha). NaNs are left out of the means; a block
            whose values are all NaN stays NaN.
        blocks: ``{layer name: block name}``, e.g. from :func:`find_blocks`. A layer missing
            here is its own block.

    Returns:
        ``{layer name: block mean}`` with the keys of ``values``, in their order.
    """
    members: dict[str, list[float]] = {}
    for name, value in values.items():
        members.setdefault(blocks.get(name, name), []).append(value)
    means = {block: _nanmean(vs) for block, vs in members.items()}
    return {name: means[blocks.get(name, name)] for name in values}


# --- hooks for tempbalance.TempBalance ----------------------------------------------------------


def _norm_weight_features(module: nn.Module) -> int | None:
    w = getattr(module, "weight", None)
    return int(w.numel()) if isinstance(w, torch.Tensor) and w.dim() == 1 else None


def register_norm_types(model: nn.Module) -> list[type]:
    """Register the norm classes of ``model`` that the scheduler does not know yet.

    Hugging Face models define their own RMSNorm / LayerNorm classes (``LlamaRMSNorm``,
    ``T5LayerNorm``, ...); each class that :func:`is_norm_layer` recognises and
    :func:`tempbalance.register_norm_type` does not is registered, with its feature count read
    from its 1-D ``weight``, so that it follows the Linear before it (``norm_follows="order"``).
    The registry is global (per process).

    Returns:
        The newly registered classes.
    """
    added: list[type] = []
    for module in model.modules():
        cls = type(module)
        if cls in added or not is_norm_layer(module) or norm_features(module) is not None:
            continue
        if _norm_weight_features(module) is None:
            continue
        register_norm_type(cls, _norm_weight_features)
        added.append(cls)
    if added:
        logger.info("registered norm layer types: %s", [c.__name__ for c in added])
    return added


def fused_qkv_parts(ref: LayerRef, predicate: Callable[[str, nn.Module], bool] = is_fused_qkv) -> list[LayerRef] | None:
    """The q, k, v parts of a fused projection ref, or None when ``ref`` is not fused.

    Handles ``nn.MultiheadAttention``'s ``<name>.in_proj`` ref and fused Linear / GPT-2
    ``Conv1D`` projections (``predicate``, default :func:`is_fused_qkv`).
    """
    if ref.weight_slice is not None:
        return None
    if ref.kind == "MultiheadAttention" and ref.name.endswith(".in_proj"):
        e = ref.weight.shape[0] // 3
        base = ref.name[: -len(".in_proj")]
        return [
            LayerRef(f"{base}.{s}", ref.module, ref.kind, ref.weight, ref.matrix_fn, ref.frozen,
                     weight_slice=slice(i * e, (i + 1) * e))
            for i, s in enumerate(QKV_SUFFIXES)
        ]
    return _split_ref(ref) if predicate(ref.name, ref.module) else None


class SplitQKVMetric:
    """A ``metric`` for :class:`tempbalance.TempBalance` that measures fused q/k/v projections
    as three matrices.

    One parameter has one learning rate, so the scheduler balances a fused projection as one
    layer; this metric gives it the mean of the metric over its q, k and v parts (each an
    ``(out/3) x in`` matrix with its own spectrum) instead of the fused ``out x in`` matrix's.
    Every other layer gets the base metric of its record. The rebalance history keeps the
    fused matrix's alpha in ``alpha`` and this value in ``metric``.

    Args:
        model: the model (the fused layers are looked up once, by name).
        metric: the base metric, a name (``"alpha"``, ...) or ``fn(record) -> float``.
        fit, **analysis_options: how the parts are measured; pass the values given to
            TempBalance (``precision`` defaults to ``"float64"`` as there).
    """

    def __init__(self, model: nn.Module, metric: str | Callable[[LayerRecord], float] = "alpha", *,
                 fit: str = "median", **analysis_options: Any):
        self.metric_name, self._metric = get_metric(metric)
        analysis_options.setdefault("precision", "float64")
        try:
            self._options = AnalysisOptions(fit=fit, **analysis_options)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.parts: dict[str, list[LayerRef]] = {}
        for ref in find_layers(model):
            parts = fused_qkv_parts(ref)
            if parts is not None:
                self.parts[ref.name] = parts
        self.__name__ = f"{self.metric_name}_qkv_split"

    def __call__(self, record: LayerRecord) -> float:
        parts = self.parts.get(record.name)
        if parts is None:
            return float(self._metric(record))
        return _nanmean([float(self._metric(r)) for r in analyze_layers(parts, self._options)])


def block_averaged_assign(
    layer_names: Sequence[str],
    blocks: Mapping[str, str],
    assign: str | Callable[[np.ndarray], Any] = "sigmoid",
    **assign_options: Any,
) -> AssignFn:
    """An ``assign`` for :class:`tempbalance.TempBalance` that works on block means (Model Balancing).

    The metric values of the layers of each block are averaged; the assignment function sees
    one value per block (in order of first appearance) and every layer gets its block's factor.

    Args:
        layer_names: the balanced layers in the order the scheduler passes their values
            (``TempBalance(...).layers``, or ``plan_balance(model, ...).names``).
        blocks: ``{layer name: block name}``, e.g. :func:`find_blocks`.
        assign, **assign_options: the assignment applied to block means (default Model
            Balancing's ``"sigmoid"``, options ``tau``, ``s``, ``s_below``).

    The scheduler leaves layers whose metric is not finite out of the values it passes; then
    the values cannot be matched to names, and this falls back to per-layer assignment (with
    a warning).
    """
    base = create_assign(assign, **assign_options)
    names = list(layer_names)
    block_of = [blocks.get(n, n) for n in names]
    order = list(dict.fromkeys(block_of))
    index = np.array([order.index(b) for b in block_of], dtype=np.int64)
    counts = np.bincount(index, minlength=len(order)).astype(np.float64)

    def assign_blocks(values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if values.shape[0] != len(names):
            logger.warning("block_averaged_assign: got %d values for %d layers (a fit failed?); "
                           "assigning per layer this time", values.shape[0], len(names))
            return np.asarray(base(values), dtype=np.float64)
        means = np.bincount(index, weights=values, minlength=len(order)) / counts
        return np.asarray(base(means), dtype=np.float64)[index]

    assign_blocks.__name__ = f"block_{assign if isinstance(assign, str) else getattr(assign, '__name__', 'custom')}"
    return assign_blocks


def model_balancing(
    model: nn.Module,
    *,
    assign: str | Callable[[np.ndarray], Any] = "sigmoid",
    per_block: bool = True,
    split_qkv: bool = True,
    metric: str | Callable[[LayerRecord], float] = "alpha",
    fit: str = "median",
    assign_options: Mapping[str, Any] | None = None,
    analysis_options: Mapping[str, Any] | None = None,
    **selection: Any,
) -> dict[str, Any]:
    """Options for :class:`tempbalance.TempBalance` in the style of Model Balancing (EMNLP 2024).

    Registers the model's custom norm classes (:func:`register_norm_types`), then returns
    ``{"assign": ..., "metric": ..., "fit": ..., **analysis_options, **selection}``: the
    sigmoid assignment (``tau=10``, ``s=1`` unless ``assign_options`` says otherwise) on
    per-block mean alphas (``per_block``), with fused q/k/v projections measured as three
    matrices (``split_qkv``).
    Use it as ``TempBalance(model, optimizer, base, interval=N, **model_balancing(model))`` and
    pass the same selection options to :func:`tempbalance.param_groups`.

    Args:
        model: the model.
        assign: the assignment function (default ``"sigmoid"``).
        per_block: average the metric per Transformer block (:func:`find_blocks`).
        split_qkv: measure fused q/k/v projections as three matrices (:class:`SplitQKVMetric`).
        metric: the base metric (default ``"alpha"``).
        fit: the power-law fit (default ``"median"``).
        assign_options: options of the assignment function.
        analysis_options: ``xmin_pos``, ``hill``, ``precision``, ... for the scheduler and for
            the measurement of the q/k/v parts alike (see :class:`tempbalance.AnalysisOptions`).
        **selection: ``remove_first``, ``remove_last``, ``eigs_thresh``, ``norm_follows``,
            ``types``, ``conv_mode`` (returned too, so the scheduler sees the same layers).
    """
    unknown = sorted(set(selection) - set(SELECTION_KEYS))
    if unknown:
        raise ConfigError(f"model_balancing() got unknown option(s) {unknown}; selection options: {list(SELECTION_KEYS)}")
    register_norm_types(model)
    analysis_options = dict(analysis_options or {})
    options: dict[str, Any] = {"fit": fit, **analysis_options, **selection}
    assign_options = dict(assign_options or {})
    if per_block:
        plan = plan_balance(model, LayerSelection(**selection))
        blocks = find_blocks(model, plan.names)
        options["assign"] = block_averaged_assign(plan.names, blocks, assign, **assign_options)
    else:
        options["assign"] = create_assign(assign, **assign_options)
    options["metric"] = SplitQKVMetric(model, metric, fit=fit, **analysis_options) if split_qkv else metric
    return options
