"""Name -> model factory registry (timm style): ``create_model(name, num_classes, ...)``."""

from __future__ import annotations

import difflib
from typing import Callable

from torch import nn

from ...errors import ConfigError

ModelFactory = Callable[..., nn.Module]
_FACTORIES: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register ``factory(num_classes, in_channels, width, **kwargs)`` under ``name``."""

    def decorate(factory: ModelFactory) -> ModelFactory:
        _FACTORIES[name] = factory
        return factory

    return decorate


def create_model(name: str, num_classes: int, in_channels: int = 3, width: float = 1.0, **kwargs) -> nn.Module:
    """Build a registered model with freshly initialised weights.

    Args:
        name: one of :data:`MODEL_NAMES`.
        num_classes: output classes (>= 1).
        in_channels: input channels (3 for RGB images, 1 for mnist1d / digits).
        width: channel multiplier for the width ablation (1.0 = published width; > 0).
        **kwargs: model-specific extras (e.g. ``in_features`` of ``mlp``).
    """
    if name not in _FACTORIES:
        close = difflib.get_close_matches(name, _FACTORIES, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint}; accepted: {', '.join(sorted(_FACTORIES))}")
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ConfigError(f"num_classes={num_classes!r} must be an integer >= 1")
    if not (isinstance(width, (int, float)) and width > 0):
        raise ConfigError(f"width={width!r} must be a number > 0")
    if not (isinstance(in_channels, int) and in_channels >= 1):
        raise ConfigError(f"in_channels={in_channels!r} must be an integer >= 1")
    return _FACTORIES[name](num_classes=num_classes, in_channels=in_channels, width=width, **kwargs)


def registered_names() -> tuple[str, ...]:
    """Every registered model name, sorted."""
    return tuple(sorted(_FACTORIES))
