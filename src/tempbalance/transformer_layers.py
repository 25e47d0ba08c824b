"""Transformer structure for balancing: which Transformer block a layer belongs to, per-block
averaging of a metric (Model Balancing), and :func:`model_balancing`, which packs them into
options for :class:`tempbalance.TempBalance`.

Norm-layer detection lives in :mod:`tempbalance.norms` and the fused q/k/v splitter in
:mod:`tempbalance.qkv`; both are re-exported here.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from torch import nn

from .analysis import AnalysisOptions, LayerRecord, analyze_layers
from .assign import create_assign, get_metric
from .errors import ConfigError
from .layers import LayerRef, find_layers, unwrap_model
from .norms import is_norm_layer, register_norm_types
from .plan import SELECTION_KEYS, LayerSelection, plan_balance
from .qkv import FUSED_QKV_NAME, QKV_SUFFIXES, is_fused_qkv, qkv_parts, split_fused_qkv, split_parent

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


def transformer_layers(
    model: nn.Module,
    types: Iterable[type] | None = None,
    *,
    split_qkv: bool = True,
    include_frozen: bool = True,
) -> list[LayerRef]:
    """:func:`tempbalance.find_layers` with fused q/k/v projections split into three layers.

    Covers ``nn.MultiheadAttention.in_proj_weight`` and fused Linear / GPT-2 ``Conv1D``
    projections (the one splitter, :func:`tempbalance.qkv.split_fused_qkv`); embeddings and
    ``Conv1D`` are found by ``find_layers`` itself. With ``split_qkv=False`` this is exactly
    ``find_layers``.
    """
    refs = find_layers(model, types, include_frozen=include_frozen)
    return split_fused_qkv(refs) if split_qkv else refs


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


def fused_qkv_parts(ref: LayerRef, predicate: Callable[[str, nn.Module], bool] = is_fused_qkv) -> list[LayerRef] | None:
    """The q, k, v parts of a fused projection ref, or None (:func:`tempbalance.qkv.qkv_parts`
    with the module-based default :func:`is_fused_qkv`)."""
    return qkv_parts(ref, predicate)


class SplitQKVMetric:
    """The metric of a fused q/k/v projection as the mean over its q, k and v matrices.

    Kept for code written before ``TempBalance(split_qkv=True)``: given as ``metric=`` to
    :class:`tempbalance.TempBalance`, it is read as ``split_qkv=True`` with its base metric, so
    the parts are measured with every other layer (from the snapshot in the asynchronous mode,
    split across ranks under DDP). Called on a record by itself, it measures the parts of that
    record's layer from the live weights.

    Args:
        model: the model (the fused layers are looked up once, by name).
        metric: the base metric, a name (``"alpha"``, ...) or ``fn(record) -> float``.
        fit, **analysis_options: how the parts are measured when called directly
            (``precision`` defaults to ``"float64"`` as in TempBalance).
    """

    def __init__(self, model: nn.Module, metric: str | Callable[[LayerRecord], float] = "alpha", *,
                 fit: str = "median", **analysis_options: Any):
        self.metric_name, self._metric = get_metric(metric)
        self.qkv_base_metric = metric
        analysis_options.setdefault("precision", "float64")
        try:
            self._options = AnalysisOptions(fit=fit, **analysis_options)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.parts: dict[str, list[LayerRef]] = {}
        for ref in find_layers(model):
            parts = qkv_parts(ref)
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
) -> Callable[..., np.ndarray]:
    """An ``assign`` for :class:`tempbalance.TempBalance` that works on block means (Model Balancing).

    The metric values of the layers of each block are averaged; the assignment function sees
    one value per block (in order of first appearance) and every layer gets its block's factor.
    The scheduler passes the layer names with the values (``names=``), so layers left out (a
    failed fit) do not shift the blocks.

    Args:
        layer_names: the balanced layers (``TempBalance(...).layers``); used when the function
            is called with values alone, in that order.
        blocks: ``{layer name: block name}``, e.g. :func:`find_blocks`; a name missing here is
            its own block.
        assign, **assign_options: the assignment applied to block means (default Model
            Balancing's ``"sigmoid"``, options ``tau``, ``s``, ``s_below``).

    Called without names on a number of values other than ``len(layer_names)``, it falls back
    to per-layer assignment (with a warning).
    """
    base = create_assign(assign, **assign_options)
    default_names = list(layer_names)

    def assign_blocks(values: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if names is None and values.shape[0] != len(default_names):
            logger.warning("block_averaged_assign: got %d values for %d layers and no names; "
                           "assigning per layer this time", values.shape[0], len(default_names))
            return np.asarray(base(values), dtype=np.float64)
        block_of = [blocks.get(n, n) for n in (default_names if names is None else names)]
        order = list(dict.fromkeys(block_of))
        index = np.array([order.index(b) for b in block_of], dtype=np.int64)
        counts = np.bincount(index, minlength=len(order)).astype(np.float64)
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
    ``{"assign": ..., "metric": ..., "split_qkv": ..., "fit": ..., **analysis_options,
    **selection}``: the sigmoid assignment (``tau=10``, ``s=1`` unless ``assign_options`` says
    otherwise) on per-block mean metrics (``per_block``), with fused q/k/v projections measured
    as three matrices (``split_qkv``). Use it as
    ``TempBalance(model, optimizer, base, interval=N, **model_balancing(model))``; the selection
    is returned too, so pass it to :func:`tempbalance.param_groups` as well.

    Args:
        model: the model.
        assign: the assignment function (default ``"sigmoid"``).
        per_block: average the metric per Transformer block (:func:`find_blocks`).
        split_qkv: measure fused q/k/v projections as three matrices (the layer's metric is
            their mean).
        metric: the base metric (default ``"alpha"``).
        fit: the power-law fit (default ``"median"``).
        assign_options: options of the assignment function.
        analysis_options: ``xmin_pos``, ``hill``, ``precision``, ... for the scheduler (see
            :class:`tempbalance.AnalysisOptions`).
        **selection: ``remove_first``, ``remove_last``, ``eigs_thresh``, ``norm_follows``,
            ``types``, ``conv_mode``.
    """
    unknown = sorted(set(selection) - set(SELECTION_KEYS))
    if unknown:
        raise ConfigError(f"model_balancing() got unknown option(s) {unknown}; selection options: {list(SELECTION_KEYS)}")
    register_norm_types(model)
    options: dict[str, Any] = {"fit": fit, **dict(analysis_options or {}), **selection}
    assign_options = dict(assign_options or {})
    if per_block:
        plan = plan_balance(model, LayerSelection(**selection))
        blocks = find_blocks(model, plan.names)
        options["assign"] = block_averaged_assign(plan.names, blocks, assign, **assign_options)
    else:
        options["assign"] = create_assign(assign, **assign_options)
    options["metric"] = metric
    options["split_qkv"] = split_qkv
    return options
