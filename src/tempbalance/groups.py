"""Which layers TempBalance balances, which norm layer belongs to which of them, and the
optimizer parameter groups that give each balanced layer a learning rate of its own.

The published rule (reference defaults): every analysable layer in module order, minus the
first and the last, minus layers with fewer than 50 eigenvalues; a BatchNorm follows its conv
and a LayerNorm its Linear. Everything else keeps the global (untuned) learning rate.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import ConfigError
from .layers import CONV_MODES, LayerRef, MatrixOptions, find_layers, unwrap_model

__all__ = [
    "NORM_FOLLOWS",
    "LayerSelection",
    "BalancedLayer",
    "BalancePlan",
    "register_norm_type",
    "norm_features",
    "output_features",
    "plan_balance",
    "param_groups",
]

logger = logging.getLogger(__name__)

NORM_FOLLOWS = ("order", "name", "none")
"""How a norm layer finds the layer whose learning rate it takes:

- ``"order"`` (default): the analysed layer just before it in ``named_modules()`` order, when
  the norm's feature count equals that layer's output features (BatchNorm after its conv,
  LayerNorm after its Linear, in any naming scheme).
- ``"name"``: the reference's rule: the norm named ``X`` follows the layer named
  ``X.replace("bn", "conv")`` (``layer1.0.bn1`` -> ``layer1.0.conv1``). A norm with no such layer
  keeps the global rate, e.g. a ResNet shortcut's BatchNorm (``shortcut.1``), which ``"order"``
  gives to the shortcut conv.
- ``"none"`` (or ``None``): every norm keeps the global rate.
"""


# --- norm layers --------------------------------------------------------------------------


def _layer_norm_features(module: nn.Module) -> int | None:
    shape = tuple(getattr(module, "normalized_shape", ()))
    return int(shape[0]) if len(shape) == 1 else None


_NORM_TYPES: dict[type, Callable[[nn.Module], int | None]] = {
    nn.modules.batchnorm._BatchNorm: lambda m: m.num_features,
    nn.modules.instancenorm._InstanceNorm: lambda m: m.num_features,
    nn.LayerNorm: _layer_norm_features,
    nn.GroupNorm: lambda m: m.num_channels,
}
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES[nn.RMSNorm] = _layer_norm_features


def register_norm_type(module_type: type, features_fn: Callable[[nn.Module], int | None] | None = None) -> None:
    """Treat ``module_type`` (and subclasses) as a norm layer that follows an analysed layer.

    Args:
        module_type: an ``nn.Module`` subclass.
        features_fn: ``fn(module) -> int | None``, the number of features it normalises
            (compared with the preceding layer's output features in ``"order"`` mode). Default:
            ``module.num_features``, else ``module.normalized_shape`` when one-dimensional.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_norm_type expects an nn.Module subclass, got {module_type!r}")

    def default(m: nn.Module) -> int | None:
        n = getattr(m, "num_features", None)
        return int(n) if n is not None else _layer_norm_features(m)

    _NORM_TYPES[module_type] = features_fn or default


def _norm_fn(module: nn.Module) -> Callable[[nn.Module], int | None] | None:
    for cls in type(module).__mro__:
        if cls in _NORM_TYPES:
            return _NORM_TYPES[cls]
    return None


def norm_features(module: nn.Module) -> int | None:
    """Features normalised by a norm layer, or None when ``module`` is not a norm layer."""
    fn = _norm_fn(module)
    return None if fn is None else fn(module)


def output_features(ref: LayerRef) -> int | None:
    """Output features of an analysed layer (conv ``out_channels``, Linear ``out_features``,
    GPT-2 Conv1D ``nf``, Embedding ``embedding_dim``); None for a fused attention projection."""
    if ref.kind == "MultiheadAttention":
        return None
    for attr in ("out_channels", "out_features", "nf", "embedding_dim"):
        value = getattr(ref.module, attr, None)
        if isinstance(value, int):
            return value
    return int(ref.weight.shape[0])


# --- layer selection ----------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSelection:
    """Which layers are balanced (validated on construction).

    Attributes:
        remove_first: leave the first analysable layer at the global rate. Default True.
        remove_last: leave the last analysable layer at the global rate. Default True.
        eigs_thresh: leave layers with fewer eigenvalues than this at the global rate. Default 50.
        norm_follows: ``"order"`` (default), ``"name"`` or ``"none"``; see :data:`NORM_FOLLOWS`.
        types: module types considered (default: every type :func:`tempbalance.find_layers`
            analyses; the reference considers only ``(nn.Conv2d, nn.Linear)``, which is the same
            set on CNNs such as ResNet and VGG).
        conv_mode: ``"per_position"`` (default) or ``"flatten"``; sets the eigenvalue count.
    """

    remove_first: bool = True
    remove_last: bool = True
    eigs_thresh: int = 50
    norm_follows: str | None = "order"
    types: tuple[type, ...] | None = None
    conv_mode: str = "per_position"

    def __post_init__(self) -> None:
        for key in ("remove_first", "remove_last"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key}={getattr(self, key)!r} must be True or False")
        t = self.eigs_thresh
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
            raise ConfigError(f"eigs_thresh={t!r} must be an integer >= 0 (the reference uses 50)")
        object.__setattr__(self, "eigs_thresh", int(t))
        mode = "none" if self.norm_follows is None else self.norm_follows
        if mode not in NORM_FOLLOWS:
            raise ConfigError(f"norm_follows={self.norm_follows!r} is not one of {NORM_FOLLOWS} (or None)")
        object.__setattr__(self, "norm_follows", mode)
        if self.types is not None:
            types = tuple(self.types)
            bad = [t for t in types if not (isinstance(t, type) and issubclass(t, nn.Module))]
            if bad or not types:
                raise ConfigError(f"types={self.types!r} must be a non-empty sequence of nn.Module subclasses")
            object.__setattr__(self, "types", types)
        if self.conv_mode not in CONV_MODES:
            raise ConfigError(f"conv_mode={self.conv_mode!r} is not one of {CONV_MODES}")


SELECTION_KEYS = ("remove_first", "remove_last", "eigs_thresh", "norm_follows", "types", "conv_mode")


@dataclass
class BalancedLayer:
    """One balanced layer and the parameters that take its learning rate.

    Attributes:
        name: the layer's module name (``model.named_modules()`` of the unwrapped model).
        ref: the analysed layer.
        norms: names of the norm layers that follow it.
        params: its own parameters (weight, bias, ...) then its norms' parameters.
        norm_params: the subset of ``params`` that belong to norm layers.
        num_eigs: eigenvalues in its spectrum.
    """

    name: str
    ref: LayerRef
    norms: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)
    norm_params: list[nn.Parameter] = field(default_factory=list)
    num_eigs: int = 0


@dataclass
class BalancePlan:
    """The balanced layers of a model and who owns which parameter.

    Attributes:
        layers: the balanced layers, in module order.
        skipped: ``{layer name: reason}`` for analysable layers left at the global rate.
        norm_owner: ``{norm name: layer name}`` for every norm that follows an analysed layer
            (balanced or not).
        selection: the options used.
    """

    layers: list[BalancedLayer]
    skipped: dict[str, str]
    norm_owner: dict[str, str]
    selection: LayerSelection

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def owner_by_param(self) -> dict[int, str]:
        """``{id(parameter): balanced layer name}`` for every parameter of a balanced layer."""
        return {id(p): layer.name for layer in self.layers for p in layer.params}


def _norm_owners(model: nn.Module, refs: Sequence[LayerRef], mode: str) -> dict[str, str]:
    if mode == "none":
        return {}
    owners: dict[str, str] = {}
    if mode == "name":
        names = {ref.name for ref in refs}
        for name, module in model.named_modules():
            if _norm_fn(module) is not None and name.replace("bn", "conv") in names:
                owners[name] = name.replace("bn", "conv")
        return owners
    by_module: dict[int, LayerRef] = {}
    for ref in refs:
        by_module.setdefault(id(ref.module), ref)
    last: LayerRef | None = None
    for name, module in model.named_modules():
        ref = by_module.get(id(module))
        if ref is not None:
            last = ref
            continue
        fn = _norm_fn(module)
        if fn is None or last is None:
            continue
        features = fn(module)
        if features is not None and features == output_features(last):
            owners[name] = last.name
    return owners


def plan_balance(model: nn.Module, selection: LayerSelection | None = None, **options: Any) -> BalancePlan:
    """Decide which layers of ``model`` are balanced and which parameters follow each.

    Args:
        model: any module (DDP / DataParallel / torch.compile wrappers are unwrapped; names
            are those of the unwrapped model).
        selection: a :class:`LayerSelection`, or give its fields as keyword arguments.

    Returns:
        A :class:`BalancePlan`. Layers whose weight does not require grad are not balanced.
    """
    if selection is None:
        selection = LayerSelection(**options)
    elif options:
        raise TypeError("give either selection= or selection keyword options, not both")
    model = unwrap_model(model)
    refs = find_layers(model, selection.types, include_frozen=True)
    skipped: dict[str, str] = {}
    candidates = list(refs)
    if selection.remove_last and refs:
        # The last layer in module order; a tied weight (embedding = output head) is listed
        # under its first module, so its position is that of its last module.
        position = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
        by_name = {n: i for i, (n, _) in enumerate(model.named_modules())}

        def last_position(ref: LayerRef) -> int:
            return max([position[id(ref.module)], *(by_name[t] for t in ref.tied_names if t in by_name)])

        last = max(refs, key=last_position)
        skipped[last.name] = "last layer"
        candidates = [r for r in candidates if r is not last]
    if selection.remove_first and refs:
        tied = refs[0].name in skipped
        skipped[refs[0].name] = "first and last layer (tied weight)" if tied else "first layer"
        candidates = [r for r in candidates if r is not refs[0]]
    mopts = MatrixOptions(conv_mode=selection.conv_mode)
    chosen: list[BalancedLayer] = []
    for ref in candidates:
        count = ref.num_eigs(mopts)
        if count < selection.eigs_thresh:
            skipped[ref.name] = f"{count} eigenvalues < eigs_thresh={selection.eigs_thresh}"
        elif ref.frozen:
            skipped[ref.name] = "frozen (weight does not require grad)"
        elif ref.weight_slice is not None:
            skipped[ref.name] = "part of a fused weight (cannot have a learning rate of its own)"
        else:
            chosen.append(BalancedLayer(ref.name, ref, num_eigs=count))

    owners = _norm_owners(model, refs, selection.norm_follows)
    by_name = {layer.name: layer for layer in chosen}
    claimed: set[int] = set()
    for layer in chosen:
        for p in layer.ref.module.parameters(recurse=False):
            if id(p) not in claimed:
                claimed.add(id(p))
                layer.params.append(p)
    modules = dict(model.named_modules())
    for norm_name, owner in owners.items():
        layer = by_name.get(owner)
        if layer is None:
            continue
        layer.norms.append(norm_name)
        for p in modules[norm_name].parameters(recurse=False):
            if id(p) not in claimed:
                claimed.add(id(p))
                layer.params.append(p)
                layer.norm_params.append(p)
    return BalancePlan(chosen, skipped, owners, selection)


# --- optimizer parameter groups -----------------------------------------------------------


_NON_NEGATIVE_OPTIONS = ("lr", "weight_decay", "momentum", "dampening", "eps")


def _is_no_decay(p: nn.Parameter, norm_ids: set[int]) -> bool:
    return p.ndim <= 1 or id(p) in norm_ids


def param_groups(
    model: nn.Module,
    *,
    no_decay_norm_bias: bool = False,
    remove_first: bool = True,
    remove_last: bool = True,
    eigs_thresh: int = 50,
    norm_follows: str | None = "order",
    types: Iterable[type] | None = None,
    conv_mode: str = "per_position",
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for TempBalance: one group per balanced layer, the rest apart.

    Pass the result to any optimizer in place of ``model.parameters()``::

        optimizer = torch.optim.SGD(tempbalance.param_groups(model, weight_decay=5e-4),
                                    lr=0.1, momentum=0.9)

    Args:
        model: the model (wrappers are unwrapped; every parameter appears exactly once, as in
            ``model.parameters()``, frozen ones included).
        no_decay_norm_bias: put biases, norm parameters and every other parameter with fewer
            than two dimensions in separate groups with ``weight_decay=0.0``.
        remove_first, remove_last, eigs_thresh, norm_follows, types, conv_mode: which layers
            are balanced; see :class:`LayerSelection`. Pass the same values to
            :class:`tempbalance.TempBalance`.
        **group_options: options copied into every group (``lr``, ``weight_decay``,
            ``momentum``, ...); they override the optimizer's defaults.

    Returns:
        A list of dicts. Each balanced layer's group has ``"name"`` and ``"tb_layer"`` set to
        the layer's module name (its no-decay group, if any, is named ``"<layer>.no_decay"``);
        the remaining parameters form the group ``"rest"`` (and ``"rest.no_decay"``). Empty
        groups are left out.
    """
    if not isinstance(no_decay_norm_bias, bool):
        raise ConfigError(f"no_decay_norm_bias={no_decay_norm_bias!r} must be True or False")
    for key in ("params", "name", "tb_layer"):
        if key in group_options:
            raise ConfigError(f"param_groups() sets {key!r} itself; do not pass it as a group option")
    for key in _NON_NEGATIVE_OPTIONS:
        value = group_options.get(key)
        if isinstance(value, numbers.Real) and not (math.isfinite(value) and value >= 0):
            # torch validates these only in an optimizer's defaults, never in per-group options
            raise ConfigError(f"{key}={value!r} must be a finite number >= 0")
    plan = plan_balance(
        model,
        LayerSelection(
            remove_first=remove_first,
            remove_last=remove_last,
            eigs_thresh=eigs_thresh,
            norm_follows=norm_follows,
            types=types,
            conv_mode=conv_mode,
        ),
    )
    groups: list[dict[str, Any]] = []
    no_decay_options = {**group_options, "weight_decay": 0.0}

    def add(params: list[nn.Parameter], name: str, layer: str | None, options: dict[str, Any]) -> None:
        if not params:
            return
        group: dict[str, Any] = {"params": params, "name": name, **options}
        if layer is not None:
            group["tb_layer"] = layer
        groups.append(group)

    claimed: set[int] = set()
    for layer in plan.layers:
        claimed.update(id(p) for p in layer.params)
        if no_decay_norm_bias:
            norm_ids = {id(p) for p in layer.norm_params}
            add([p for p in layer.params if not _is_no_decay(p, norm_ids)], layer.name, layer.name, group_options)
            add([p for p in layer.params if _is_no_decay(p, norm_ids)], f"{layer.name}.no_decay", layer.name, no_decay_options)
        else:
            add(list(layer.params), layer.name, layer.name, group_options)

    unwrapped = unwrap_model(model)
    norm_ids = {
        id(p)
        for name, module in unwrapped.named_modules()
        if _norm_fn(module) is not None
        for p in module.parameters(recurse=False)
    }
    rest = [p for p in unwrapped.parameters() if id(p) not in claimed]
    if no_decay_norm_bias:
        add([p for p in rest if not _is_no_decay(p, norm_ids)], "rest", None, group_options)
        add([p for p in rest if _is_no_decay(p, norm_ids)], "rest.no_decay", None, no_decay_options)
    else:
        add(rest, "rest", None, group_options)
    if not plan.layers:
        logger.warning("param_groups: no layer of %s qualifies for balancing; %s", type(unwrapped).__name__, plan.skipped)
    return groups

