"""The balancing plan: which layers are balanced, which parameters follow each (its own, then
its norm layers'), and which matrices are measured for each — built once from one set of options.

The published rule (reference defaults): every analysable layer in module order, minus the
first and the last, minus layers with fewer than 50 eigenvalues; a BatchNorm follows its conv
and a LayerNorm its Linear. Everything else keeps the global (untuned) learning rate.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from .errors import ConfigError
from .layers import CONV_MODES, LayerRef, MatrixOptions, find_layers, registered_layer_types, unwrap_model
from .norms import is_norm_type, norm_features
from .qkv import qkv_parts

__all__ = [
    "NORM_FOLLOWS", "SELECTION_KEYS", "LayerSelection", "BalancedLayer", "BalancePlan", "output_features", "plan_balance",
]

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

SELECTION_KEYS = ("remove_first", "remove_last", "eigs_thresh", "norm_follows", "types", "conv_mode")


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


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

    def to_plain(self) -> dict[str, Any]:
        """The options as plain values (types by qualified class name), as stored in the
        optimizer's groups by :func:`tempbalance.param_groups`."""
        types = None if self.types is None else [_type_name(t) for t in self.types]
        return {
            "remove_first": self.remove_first, "remove_last": self.remove_last, "eigs_thresh": self.eigs_thresh,
            "norm_follows": self.norm_follows, "types": types, "conv_mode": self.conv_mode,
        }

    @classmethod
    def from_plain(cls, values: dict[str, Any], model: nn.Module) -> "LayerSelection":
        """Inverse of :meth:`to_plain`; class names are resolved among ``model``'s module classes
        (and their bases) and the registered layer types."""
        values = dict(values)
        if values.get("types") is not None:
            known = {_type_name(c): c for c in registered_layer_types()}
            for module in unwrap_model(model).modules():
                known.update({_type_name(c): c for c in type(module).__mro__ if issubclass(c, nn.Module)})
            missing = [name for name in values["types"] if name not in known]
            if missing:
                raise ConfigError(f"the parameter groups select layer types {missing}, which this model does not use")
            values["types"] = tuple(known[name] for name in values["types"])
        return cls(**values)


@dataclass
class BalancedLayer:
    """One balanced layer and the parameters that take its learning rate (and weight decay).

    Attributes:
        name: the layer's module name (``model.named_modules()`` of the unwrapped model).
        ref: the analysed layer.
        norms: names of the norm layers that follow it.
        params: its own parameters (weight, bias, ...) then its norms' parameters.
        norm_params: the subset of ``params`` that belong to norm layers.
        num_eigs: eigenvalues in its spectrum.
        parts: the matrices measured for it: ``[ref]``, or the q, k and v parts of a fused
            projection when the plan splits them (its metric is then the mean of theirs).
    """

    name: str
    ref: LayerRef
    norms: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)
    norm_params: list[nn.Parameter] = field(default_factory=list)
    num_eigs: int = 0
    parts: list[LayerRef] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.parts:
            self.parts = [self.ref]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the layer's weight."""
        return tuple(int(s) for s in self.ref.weight.shape)

    def __repr__(self) -> str:
        norms = f", norms={self.norms}" if self.norms else ""
        parts = f", parts={[p.name for p in self.parts]}" if self.parts != [self.ref] else ""
        return (f"BalancedLayer({self.name!r}, {self.ref.kind} {self.shape}, {self.num_eigs} eigenvalues, "
                f"{len(self.params)} parameters{norms}{parts})")


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
        """Names of the balanced layers, in module order."""
        return [layer.name for layer in self.layers]

    def __repr__(self) -> str:
        shown = ", ".join(self.names[:4]) + (f", ... ({len(self.layers)} layers)" if len(self.layers) > 4 else "")
        return (f"BalancePlan({len(self.layers)} balanced layers [{shown}], {len(self.skipped)} skipped, "
                f"{len(self.norm_owner)} norm layers following)")

    @property
    def refs(self) -> list[LayerRef]:
        """Every matrix measured, layer by layer (see :attr:`BalancedLayer.parts`)."""
        return [part for layer in self.layers for part in layer.parts]

    def group_records(self, records: Sequence[Any]) -> list[list[Any]]:
        """Records of :attr:`refs`, in that order, regrouped into one list per layer."""
        out, start = [], 0
        for layer in self.layers:
            out.append(list(records[start : start + len(layer.parts)]))
            start += len(layer.parts)
        if start != len(records):
            raise ValueError(f"got {len(records)} records for the plan's {start} measured matrices")
        return out

    def owner_by_param(self) -> dict[int, str]:
        """``{id(parameter): balanced layer name}`` for every parameter of a balanced layer."""
        return {id(p): layer.name for layer in self.layers for p in layer.params}

    def without(self, names: Sequence[str], reason: str) -> "BalancePlan":
        """The same plan with the named layers left at the global rate for ``reason``."""
        drop = set(names)
        skipped = {**self.skipped, **{name: reason for name in names}}
        return BalancePlan([x for x in self.layers if x.name not in drop], skipped, self.norm_owner, self.selection)


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


def _norm_owners(model: nn.Module, refs: Sequence[LayerRef], mode: str) -> dict[str, str]:
    if mode == "none":
        return {}
    owners: dict[str, str] = {}
    if mode == "name":
        names = {ref.name for ref in refs}
        for name, module in model.named_modules():
            if is_norm_type(module) and name.replace("bn", "conv") in names:
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
        if last is None or not is_norm_type(module):
            continue
        features = norm_features(module)
        if features is not None and features == output_features(last):
            owners[name] = last.name
    return owners


def _candidates(model: nn.Module, refs: list[LayerRef], selection: LayerSelection) -> tuple[list[LayerRef], dict[str, str]]:
    """The refs left after dropping the first and the last layer, and the reasons."""
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
    return candidates, skipped


def plan_balance(
    model: nn.Module, selection: LayerSelection | None = None, *, split_qkv: bool = False, **options: Any
) -> BalancePlan:
    """Decide which layers of ``model`` are balanced and which parameters follow each.

    Args:
        model: any module (DDP / DataParallel / torch.compile wrappers are unwrapped; names
            are those of the unwrapped model).
        selection: a :class:`LayerSelection`, or give its fields as keyword arguments.
        split_qkv: measure each fused q/k/v projection as its three parts
            (:func:`tempbalance.qkv.qkv_parts`); the layer is still balanced as one (one
            parameter has one learning rate). Default False.

    Returns:
        A :class:`BalancePlan`. Layers whose weight does not require grad are not balanced.
    """
    if selection is None:
        selection = LayerSelection(**options)
    elif options:
        raise TypeError("give either selection= or selection keyword options, not both")
    if not isinstance(split_qkv, bool):
        raise ConfigError(f"split_qkv={split_qkv!r} must be True or False")
    model = unwrap_model(model)
    refs = find_layers(model, selection.types, include_frozen=True)
    candidates, skipped = _candidates(model, refs, selection)
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
            parts = qkv_parts(ref) if split_qkv else None
            chosen.append(BalancedLayer(ref.name, ref, num_eigs=count, parts=parts or []))

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
