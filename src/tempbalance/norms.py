"""Norm layers: the one registry of module types whose parameters follow a weight layer's rate
(and weight decay), how many features each normalises, and the detection of custom norm classes.
"""

from __future__ import annotations

import logging
import re
from typing import Callable

import torch
from torch import nn

__all__ = ["register_norm_type", "norm_features", "is_norm_type", "is_norm_layer", "register_norm_types"]

logger = logging.getLogger(__name__)

FeaturesFn = Callable[[nn.Module], "int | None"]


def _layer_norm_features(module: nn.Module) -> int | None:
    shape = tuple(getattr(module, "normalized_shape", ()))
    return int(shape[0]) if len(shape) == 1 else None


_REGISTRY: dict[type, FeaturesFn] = {
    nn.modules.batchnorm._BatchNorm: lambda m: m.num_features,
    nn.modules.instancenorm._InstanceNorm: lambda m: m.num_features,
    nn.LayerNorm: _layer_norm_features,
    nn.GroupNorm: lambda m: m.num_channels,
}
if hasattr(nn, "RMSNorm"):
    _REGISTRY[nn.RMSNorm] = _layer_norm_features

_NORM_CLASS_NAME = re.compile(r"Norm(\d+d)?$")


def register_norm_type(module_type: type, features_fn: FeaturesFn | None = None) -> None:
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

    _REGISTRY[module_type] = features_fn or default


def _features_fn(module: nn.Module) -> FeaturesFn | None:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def is_norm_type(module: nn.Module) -> bool:
    """True when ``module``'s class (or a base class) is registered as a norm layer."""
    return _features_fn(module) is not None


def norm_features(module: nn.Module) -> int | None:
    """Features normalised by a registered norm layer, or None when ``module`` is not one."""
    fn = _features_fn(module)
    return None if fn is None else fn(module)


def is_norm_layer(module: nn.Module) -> bool:
    """True for a registered norm layer, or a class that looks like one: its name ends in
    ``Norm`` (Hugging Face's ``LlamaRMSNorm``, ``T5LayerNorm``, ...) and it holds parameters of
    at most one dimension. Only registered types follow a layer; see :func:`register_norm_types`."""
    if is_norm_type(module):
        return True
    if not _NORM_CLASS_NAME.search(type(module).__name__):
        return False
    params = list(module.parameters(recurse=False))
    return bool(params) and all(p.dim() <= 1 for p in params)


def _weight_features(module: nn.Module) -> int | None:
    w = getattr(module, "weight", None)
    return int(w.numel()) if isinstance(w, torch.Tensor) and w.dim() == 1 else None


def register_norm_types(model: nn.Module) -> list[type]:
    """Register the norm classes of ``model`` that are not registered yet.

    Each class that :func:`is_norm_layer` recognises by its name and that has a 1-D ``weight``
    is registered with that weight's length as its feature count, so that it follows the Linear
    before it (``norm_follows="order"``). The registry is global (per process).

    Returns:
        The newly registered classes.
    """
    added: list[type] = []
    for module in model.modules():
        cls = type(module)
        if cls in added or not is_norm_layer(module) or norm_features(module) is not None:
            continue
        if _weight_features(module) is None:
            continue
        register_norm_type(cls, _weight_features)
        added.append(cls)
    if added:
        logger.info("registered norm layer types: %s", [c.__name__ for c in added])
    return added
