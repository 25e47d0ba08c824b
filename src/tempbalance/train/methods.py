"""The training methods compared in the paper, as a registry: name -> builder of
(optimizer, per-epoch scheduler, gradient regulariser) from a model and a :class:`TrainConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..regularize import SpectralNormRegularizer

if TYPE_CHECKING:  # config.py imports this registry to validate method names
    from .config import TrainConfig

__all__ = [
    "MethodParts", "METHODS", "register_method", "build_method", "global_lr", "balanced_rates", "balanced_weight_decays",
]


@dataclass
class MethodParts:
    """What a method contributes to the training loop.

    Attributes:
        optimizer: steps once per batch.
        scheduler: steps once per epoch, after the epoch (a ``TempBalance`` for the ``tb`` methods,
            which steps its base schedule itself); has ``state_dict()``/``load_state_dict()``.
        regularizer: a :class:`SpectralNormRegularizer` to ``apply()`` after ``backward()``, or None.
        balancer: the ``TempBalance`` object when the method balances (same as ``scheduler``), else None;
            its learning rate (``tb`` methods), its weight decay (``alphadecay``) or both.
    """

    optimizer: torch.optim.Optimizer
    scheduler: Any
    regularizer: SpectralNormRegularizer | None = None
    balancer: Any = None


MethodBuilder = Callable[[nn.Module, "TrainConfig"], MethodParts]
METHODS: dict[str, MethodBuilder] = {}


def register_method(name: str) -> Callable[[MethodBuilder], MethodBuilder]:
    """Decorator: register ``builder(model, config) -> MethodParts`` under ``name``."""

    def decorate(builder: MethodBuilder) -> MethodBuilder:
        METHODS[name] = builder
        return builder

    return decorate


def build_method(model: nn.Module, config: TrainConfig) -> MethodParts:
    """Build the optimizer, scheduler and regulariser of ``config.method`` for ``model``."""
    if config.method not in METHODS:
        raise ConfigError(f"unknown method {config.method!r}; accepted: {', '.join(METHODS)}")
    return METHODS[config.method](model, config)


def _timm_optim():
    try:
        import timm.optim as timm_optim
    except ImportError as exc:  # pragma: no cover - timm is in the [train] extra
        raise ImportError("the lars/lamb/sgdp/lookahead methods need timm: pip install 'tempbalance[train]'") from exc
    return timm_optim


def _cosine(optimizer: torch.optim.Optimizer, config: TrainConfig):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)


def _sgd(params, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _sgdp(params, config: TrainConfig) -> torch.optim.Optimizer:
    return _timm_optim().SGDP(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _snr(model: nn.Module, config: TrainConfig) -> SpectralNormRegularizer:
    return SpectralNormRegularizer(model, config.snr_coef, power_iterations=config.snr_power_iterations)


def _balanced(
    model: nn.Module, config: TrainConfig, make_optimizer, balance: tuple[str, ...] = ("lr",)
) -> tuple[torch.optim.Optimizer, Any]:
    """An optimizer over TempBalance's per-layer groups (built with ``config.norm_follows``), a cosine
    base schedule, and TempBalance on top balancing ``balance``."""
    import tempbalance

    groups = tempbalance.param_groups(model, weight_decay=config.weight_decay, norm_follows=config.norm_follows)
    optimizer = make_optimizer(groups, config)
    balancer = tempbalance.TempBalance(
        model,
        optimizer,
        _cosine(optimizer, config),
        balance=balance,
        fit=config.fit,
        metric=config.metric,
        assign=config.assign,
        s1=config.s1,
        s2=config.s2,
        wd_s1=config.wd_s1,
        wd_s2=config.wd_s2,
        normalize=config.normalize,
        asynchronous=config.asynchronous,
        esd=config.esd,
    )
    return optimizer, balancer


@register_method("cal")
def _cal(model: nn.Module, config: TrainConfig) -> MethodParts:
    """SGD (momentum) + cosine annealing: the baseline."""
    optimizer = _sgd(model.parameters(), config)
    return MethodParts(optimizer, _cosine(optimizer, config))


@register_method("snr")
def _cal_snr(model: nn.Module, config: TrainConfig) -> MethodParts:
    """The baseline plus spectral-norm regularisation (coefficient ``snr_coef``)."""
    parts = _cal(model, config)
    parts.regularizer = _snr(model, config)
    return parts


@register_method("tb")
def _tb(model: nn.Module, config: TrainConfig) -> MethodParts:
    """SGD + cosine with TempBalance's per-layer factors (s1, s2, assign, metric, fit)."""
    optimizer, balancer = _balanced(model, config, _sgd)
    return MethodParts(optimizer, balancer, balancer=balancer)


@register_method("tb+snr")
def _tb_snr(model: nn.Module, config: TrainConfig) -> MethodParts:
    """TempBalance plus spectral-norm regularisation."""
    parts = _tb(model, config)
    parts.regularizer = _snr(model, config)
    return parts


@register_method("sgdr")
def _sgdr(model: nn.Module, config: TrainConfig) -> MethodParts:
    """SGD with cosine warm restarts every ``sgdr_t0`` epochs (T_mult = 1)."""
    optimizer = _sgd(model.parameters(), config)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=config.sgdr_t0, T_mult=1)
    return MethodParts(optimizer, scheduler)


@register_method("lars")
def _lars(model: nn.Module, config: TrainConfig) -> MethodParts:
    """timm's LARS (trust coefficient ``lars_trust``, no momentum, as in the paper) + cosine."""
    optimizer = _timm_optim().Lars(
        model.parameters(), lr=config.lr, momentum=0.0, weight_decay=config.weight_decay, trust_coeff=config.lars_trust
    )
    return MethodParts(optimizer, _cosine(optimizer, config))


@register_method("lamb")
def _lamb(model: nn.Module, config: TrainConfig) -> MethodParts:
    """timm's LAMB + cosine."""
    optimizer = _timm_optim().Lamb(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return MethodParts(optimizer, _cosine(optimizer, config))


@register_method("lookahead")
def _lookahead(model: nn.Module, config: TrainConfig) -> MethodParts:
    """timm's Lookahead (k = ``lookahead_k``, alpha = ``lookahead_alpha``) around SGD, + cosine."""
    optimizer = _timm_optim().Lookahead(
        _sgd(model.parameters(), config), alpha=config.lookahead_alpha, k=config.lookahead_k
    )
    return MethodParts(optimizer, _cosine(optimizer, config))


@register_method("sgdp")
def _sgdp_method(model: nn.Module, config: TrainConfig) -> MethodParts:
    """timm's SGDP (momentum) + cosine."""
    optimizer = _sgdp(model.parameters(), config)
    return MethodParts(optimizer, _cosine(optimizer, config))


@register_method("tb+sgdp")
def _tb_sgdp(model: nn.Module, config: TrainConfig) -> MethodParts:
    """TempBalance around SGDP."""
    optimizer, balancer = _balanced(model, config, _sgdp)
    return MethodParts(optimizer, balancer, balancer=balancer)


@register_method("alphadecay")
def _alphadecay(model: nn.Module, config: TrainConfig) -> MethodParts:
    """SGD + cosine with AlphaDecay's per-layer weight decay (alpha mapped onto [wd_s1, wd_s2] x weight_decay)."""
    optimizer, balancer = _balanced(model, config, _sgd, balance=("weight_decay",))
    return MethodParts(optimizer, balancer, balancer=balancer)


@register_method("tb+alphadecay")
def _tb_alphadecay(model: nn.Module, config: TrainConfig) -> MethodParts:
    """TempBalance's per-layer rates and AlphaDecay's per-layer weight decay from the same measurement."""
    optimizer, balancer = _balanced(model, config, _sgd, balance=("lr", "weight_decay"))
    return MethodParts(optimizer, balancer, balancer=balancer)


def global_lr(optimizer: torch.optim.Optimizer) -> float:
    """The global (unbalanced) rate: the ``"rest"`` group's lr, else the first group that is not
    a balanced layer's, else group 0's."""
    groups = optimizer.param_groups
    for group in groups:
        if group.get("name") == "rest":
            return float(group["lr"])
    plain = [group for group in groups if "tb_layer" not in group] or groups
    return float(plain[0]["lr"])


def _balanced_values(optimizer: torch.optim.Optimizer, key: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for group in optimizer.param_groups:
        if "tb_layer" in group:
            values.setdefault(group["tb_layer"], float(group[key]))
    return values


def balanced_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Layer name -> current lr of every balanced layer (groups tagged ``tb_layer`` by
    :func:`tempbalance.param_groups`; empty when not balancing)."""
    return _balanced_values(optimizer, "lr")


def balanced_weight_decays(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Layer name -> current weight decay of every balanced layer (its first group)."""
    return _balanced_values(optimizer, "weight_decay")
