"""Which modules are analysed, and how a module's weight becomes a stack of matrices.

A registry maps module types to a *matrix function* that turns the weight into a
``(batch, m, n)`` stack whose pooled eigenvalues form the layer's spectrum (ESD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

__all__ = [
    "LayerRef",
    "MatrixOptions",
    "register_layer_type",
    "registered_layer_types",
    "unwrap_model",
    "find_layers",
    "tensor_layer_name",
    "tensor_layer_ref",
]

CONV_MODES = ("per_position", "flatten")


@dataclass(frozen=True)
class MatrixOptions:
    """How a weight is turned into matrices.

    Attributes:
        conv_mode: ``"per_position"`` (default): one ``out x in`` matrix per kernel position
            (and per group), eigenvalues pooled. ``"flatten"``: one ``out x (in * k)`` matrix
            per group.
        conv_norm: convolution matrices are scaled by ``sqrt(conv_norm)`` (so eigenvalues by
            ``conv_norm``) in ``"per_position"`` mode. Default 0.5, as in the reference and
            in WeightWatcher.
    """

    conv_mode: str = "per_position"
    conv_norm: float = 0.5

    def __post_init__(self) -> None:
        if self.conv_mode not in CONV_MODES:
            raise ValueError(f"conv_mode={self.conv_mode!r} is not one of {CONV_MODES}")
        if not (isinstance(self.conv_norm, (int, float)) and self.conv_norm > 0 and math.isfinite(self.conv_norm)):
            raise ValueError(f"conv_norm={self.conv_norm!r} must be a finite number > 0")


MatrixFn = Callable[[torch.Tensor, nn.Module, MatrixOptions], torch.Tensor]


@dataclass
class LayerRef:
    """One analysable weight matrix (or stack) of a model.

    Attributes:
        name: the module's name in ``model.named_modules()`` (with a ``.q``/``.k``/``.v``
            suffix for a split fused projection).
        module: the module itself.
        kind: the module's class name (``"Conv2d"``, ``"Linear"``, ...).
        weight: the parameter analysed (never modified).
        matrix_fn: turns ``weight`` into a ``(batch, m, n)`` stack.
        frozen: ``True`` when ``weight.requires_grad`` is False.
        tied_names: names of other modules sharing this exact weight (analysed once, here).
        weight_slice: rows of ``weight`` used (for split fused projections), or None.
    """

    name: str
    module: nn.Module
    kind: str
    weight: torch.Tensor
    matrix_fn: MatrixFn
    frozen: bool = False
    tied_names: list[str] = field(default_factory=list)
    weight_slice: slice | None = None

    def matrices(self, options: MatrixOptions, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``(batch, m, n)`` stack for this layer (a detached view or copy).

        ``dtype``: convert the weight first (before any scaling), e.g. to the dtype the
        spectrum is computed in, so half-precision weights are not rounded again.
        """
        w = self.weight.detach()
        if self.weight_slice is not None:
            w = w[self.weight_slice]
        if dtype is not None:
            w = w.to(dtype)
        return self.matrix_fn(w, self.module, options)

    def stack_shape(self, options: MatrixOptions) -> tuple[int, int, int]:
        """``(batch, m, n)`` of :meth:`matrices`, from shapes alone (the matrix function runs on
        a meta tensor; one that needs real values runs on the weight). Equal on every rank,
        also for sharded (DTensor) weights."""
        meta = torch.empty(tuple(self.weight.shape), dtype=self.weight.dtype, device="meta")
        if self.weight_slice is not None:
            meta = meta[self.weight_slice]
        try:
            stack = self.matrix_fn(meta, self.module, options)
        except (RuntimeError, NotImplementedError, TypeError):  # a custom matrix function that needs real data
            stack = self.matrices(options)
        if stack.dim() != 3:
            raise ValueError(
                f"layer {self.name!r}: its matrix function returned shape {tuple(stack.shape)}, expected (batch, m, n)"
            )
        return int(stack.shape[0]), int(stack.shape[1]), int(stack.shape[2])

    def num_eigs(self, options: MatrixOptions) -> int:
        """Eigenvalues in this layer's pooled spectrum (from shapes alone)."""
        batch, m, n = self.stack_shape(options)
        return batch * min(m, n)


def _linear_matrices(w: torch.Tensor, module: nn.Module, options: MatrixOptions) -> torch.Tensor:
    """Linear / Embedding: ``W`` as stored, ``(1, out, in)``."""
    return w.reshape(1, w.shape[0], -1)


def _transposed_linear_matrices(w: torch.Tensor, module: nn.Module, options: MatrixOptions) -> torch.Tensor:
    """GPT-2 style ``Conv1D`` stores ``(in, out)``; return ``(1, out, in)``."""
    return w.t().unsqueeze(0)


def _grouped_conv_matrices(w: torch.Tensor, groups: int, options: MatrixOptions) -> torch.Tensor:
    """Conv weight ``(out, in/g, *k)`` to ``(g * prod(k), out/g, in/g)`` (scaled) or
    ``(g, out/g, in/g * prod(k))`` when flattened."""
    out_ch, in_per_group = w.shape[0], w.shape[1]
    kernel = math.prod(w.shape[2:])
    out_per_group = out_ch // groups
    w = w.reshape(groups, out_per_group, in_per_group, kernel)
    if options.conv_mode == "flatten":
        return w.reshape(groups, out_per_group, in_per_group * kernel)
    view = w.permute(0, 3, 1, 2).reshape(groups * kernel, out_per_group, in_per_group)
    if w.device.type == "meta":  # a shape probe (LayerRef.stack_shape): no values to scale
        return view
    # one pass into a contiguous stack (a strided view would slow every later matmul)
    out = torch.empty(view.shape, dtype=w.dtype, device=w.device)
    return torch.mul(view, math.sqrt(options.conv_norm), out=out)


def _conv_matrices(w: torch.Tensor, module: nn.Module, options: MatrixOptions) -> torch.Tensor:
    return _grouped_conv_matrices(w, getattr(module, "groups", 1), options)


def _conv_transpose_matrices(w: torch.Tensor, module: nn.Module, options: MatrixOptions) -> torch.Tensor:
    """ConvTranspose weight is ``(in, out/g, *k)``: regroup to ``(out, in/g, *k)`` first."""
    groups = getattr(module, "groups", 1)
    in_ch, out_per_group = w.shape[0], w.shape[1]
    in_per_group = in_ch // groups
    k = w.shape[2:]
    w = w.reshape(groups, in_per_group, out_per_group, *k).transpose(1, 2)
    w = w.reshape(groups * out_per_group, in_per_group, *k)
    return _grouped_conv_matrices(w, groups, options)


_REGISTRY: dict[type, MatrixFn] = {
    nn.Linear: _linear_matrices,
    nn.Embedding: _linear_matrices,
    nn.Conv1d: _conv_matrices,
    nn.Conv2d: _conv_matrices,
    nn.Conv3d: _conv_matrices,
    nn.ConvTranspose1d: _conv_transpose_matrices,
    nn.ConvTranspose2d: _conv_transpose_matrices,
    nn.ConvTranspose3d: _conv_transpose_matrices,
}


def register_layer_type(module_type: type, matrix_fn: MatrixFn | None = None) -> None:
    """Make ``module_type`` (and its subclasses) analysable.

    Args:
        module_type: an ``nn.Module`` subclass with a ``weight`` parameter.
        matrix_fn: ``fn(weight, module, options) -> Tensor (batch, m, n)``. Default: the
            weight reshaped to ``(1, weight.shape[0], -1)`` as for ``nn.Linear``.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_layer_type expects an nn.Module subclass, got {module_type!r}")
    _REGISTRY[module_type] = matrix_fn or _linear_matrices


def registered_layer_types() -> tuple[type, ...]:
    """The module types analysed by default (registration order)."""
    return tuple(_REGISTRY)


def _is_gpt2_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): weight ``(in, out)``, attribute ``nf`` = out."""
    if type(module).__name__ != "Conv1D":
        return False
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2 and getattr(module, "nf", None) == w.shape[1]


def _matrix_fn_for(module: nn.Module) -> MatrixFn | None:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    if _is_gpt2_conv1d(module):
        return _transposed_linear_matrices
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip wrappers: torch.compile's ``_orig_mod`` and DDP/DataParallel ``.module``.

    FSDP2 (``fully_shard``) modifies the model in place and needs no unwrapping.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and type(model).__name__ in (
            "DistributedDataParallel",
            "DataParallel",
            "FullyShardedDataParallel",
        ):
            model = inner
            continue
    return model


def _module_types(types: Iterable[type] | None) -> tuple[type, ...] | None:
    if types is None:
        return None
    types = tuple(types)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"layer types must be nn.Module subclasses, got {t!r}")
    return types


def find_layers(
    model: nn.Module,
    types: Iterable[type] | None = None,
    *,
    split_qkv: bool = False,
    include_frozen: bool = True,
) -> list[LayerRef]:
    """All analysable layers of ``model`` in ``named_modules()`` order.

    Args:
        model: any module; DDP / DataParallel / torch.compile wrappers are unwrapped.
        types: restrict to these module types (and subclasses). Default: every registered
            type plus GPT-2 ``Conv1D`` and ``nn.MultiheadAttention``'s fused projection.
        split_qkv: split ``nn.MultiheadAttention.in_proj_weight`` into q, k, v layers.
        include_frozen: keep layers whose weight does not require grad (marked ``frozen``).

    Returns:
        One :class:`LayerRef` per distinct weight tensor. A weight shared by several modules
        (tied embeddings) is listed once under its first name, the others in ``tied_names``.
    """
    wanted = _module_types(types)
    model = unwrap_model(model)
    refs: list[LayerRef] = []
    by_weight: dict[int, LayerRef] = {}
    for name, module in model.named_modules():
        if wanted is not None and not isinstance(module, wanted):
            continue
        for ref in _refs_for_module(name, module, split_qkv):
            if not include_frozen and ref.frozen:
                continue
            key = id(ref.weight) if ref.weight_slice is None else (id(ref.weight), ref.name)
            if key in by_weight:
                by_weight[key].tied_names.append(ref.name)
                continue
            by_weight[key] = ref
            refs.append(ref)
    return refs


def _kind(module: nn.Module) -> str:
    """The module's class name, skipping classes that ``torch.distributed`` mixes in
    (FSDP2 turns a ``Conv2d`` into an ``FSDPConv2d``)."""
    for cls in type(module).__mro__:
        if not cls.__module__.startswith("torch.distributed."):
            return cls.__name__
    return type(module).__name__


def _refs_for_module(name: str, module: nn.Module, split_qkv: bool) -> Iterator[LayerRef]:
    if isinstance(module, nn.MultiheadAttention):
        prefix = f"{name}." if name else ""
        w = module.in_proj_weight
        if w is None:  # separate q/k/v projection weights (kdim != embed_dim)
            for suffix, attr in (("q", "q_proj_weight"), ("k", "k_proj_weight"), ("v", "v_proj_weight")):
                p = getattr(module, attr)
                yield LayerRef(f"{prefix}{suffix}", module, "MultiheadAttention", p, _linear_matrices, not p.requires_grad)
            return
        if split_qkv:
            e = module.embed_dim
            for i, suffix in enumerate("qkv"):
                yield LayerRef(
                    f"{prefix}{suffix}", module, "MultiheadAttention", w, _linear_matrices,
                    not w.requires_grad, weight_slice=slice(i * e, (i + 1) * e),
                )
        else:
            yield LayerRef(f"{prefix}in_proj", module, "MultiheadAttention", w, _linear_matrices, not w.requires_grad)
        return
    fn = _matrix_fn_for(module)
    if fn is None:
        return
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        return
    yield LayerRef(name, module, _kind(module), w, fn, not w.requires_grad)


# --- tensors read from a checkpoint file (no module, no architecture) ---------------------------

#: ``kind`` of a checkpoint tensor, by its number of dimensions.
TENSOR_KINDS = {2: "matrix", 3: "conv1d", 4: "conv2d", 5: "conv3d"}

#: Layer names of GPT-2's ``Conv1D`` modules (weights stored ``(in, out)``).
GPT2_CONV1D_NAMES = ("c_attn", "c_proj", "c_fc")

#: ``nn.MultiheadAttention`` parameter names and the layer names :func:`find_layers` gives them.
_ATTENTION_WEIGHTS = {"in_proj_weight": "in_proj", "q_proj_weight": "q", "k_proj_weight": "k", "v_proj_weight": "v"}


class Conv1D(nn.Module):
    """Shape-only stand-in for Hugging Face's GPT-2 ``Conv1D`` (weight stored ``(in, out)``,
    ``nf`` = out), on the meta device: what :func:`tensor_layer_ref` gives GPT-2's ``c_attn`` /
    ``c_proj`` / ``c_fc`` tensors, so that the fused q/k/v rule (``transformer_layers.is_fused_qkv``)
    splits them by columns as it splits the real module."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf, device="meta"), requires_grad=False)


def tensor_layer_name(key: str) -> str | None:
    """The layer name :func:`find_layers` gives the module whose weight is stored under ``key``.

    ``"blocks.0.fc.weight"`` -> ``"blocks.0.fc"``; ``nn.MultiheadAttention`` parameters
    ``"attn.in_proj_weight"`` -> ``"attn.in_proj"``, ``"attn.q_proj_weight"`` -> ``"attn.q"``
    (``k``, ``v`` alike). None for any other key (biases, norms' ``bias``, buffers such as
    ``running_mean`` or GPT-2's ``attn.bias`` mask).
    """
    head, _, last = key.rpartition(".")
    if last == "weight":
        return head or None
    if last in _ATTENTION_WEIGHTS:
        return f"{head}.{_ATTENTION_WEIGHTS[last]}" if head else _ATTENTION_WEIGHTS[last]
    return None


def _stand_in(name: str, shape: tuple[int, ...]) -> tuple[nn.Module, MatrixFn]:
    """A meta-device module of the class the shape (and a GPT-2 name) implies, and its matrix function."""
    if len(shape) == 2:
        rows, cols = shape
        if name.rpartition(".")[2] in GPT2_CONV1D_NAMES and rows != 3 * cols:  # GPT-2 Conv1D, stored (in, out)
            return Conv1D(rows, cols), _transposed_linear_matrices
        return nn.Linear(cols, rows, bias=False, device="meta"), _linear_matrices
    conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[len(shape)]
    return conv(shape[1], shape[0], tuple(shape[2:]), bias=False, device="meta"), _conv_matrices


def tensor_layer_ref(key: str, weight: torch.Tensor) -> LayerRef | None:
    """A :class:`LayerRef` for a tensor read from a checkpoint file; its role comes from its shape.

    2-D -> one matrix (Linear, Embedding and GPT-2 ``Conv1D`` weights have the same spectrum
    either way round; GPT-2's ``c_attn`` / ``c_proj`` / ``c_fc`` are read as ``Conv1D``, stored
    ``(in, out)``, unless a ``c_attn`` is ``(3e, e)``, so that a fused q/k/v is split by columns
    and square matrices are formed on the module's side, to the bit); 3-D / 4-D / 5-D -> a Conv1d / Conv2d / Conv3d weight ``(out, in, *k)``,
    one ``out x in`` matrix per kernel position as for modules (``groups`` is not stored in a
    file: read as 1). The record is named as :func:`find_layers` names the module
    (:func:`tensor_layer_name`), so a file and its module give the same report.

    Args:
        key: the tensor's key in the state dict (wrapper prefixes already removed).
        weight: the tensor, or a meta tensor of its shape and dtype (shapes alone: planning).

    Returns:
        None for tensors that are not analysed: keys that are not weights, tensors of fewer than
        2 or more than 5 dimensions, and integer or bool tensors (e.g. quantised weights).
    """
    name = tensor_layer_name(key)
    if name is None or weight.dim() not in TENSOR_KINDS or not weight.dtype.is_floating_point:
        return None
    module, fn = _stand_in(name, tuple(weight.shape))
    attention = key.rpartition(".")[2] in _ATTENTION_WEIGHTS
    kind = "MultiheadAttention" if attention else TENSOR_KINDS[weight.dim()]
    return LayerRef(name, module, kind, weight, fn, frozen=False)
