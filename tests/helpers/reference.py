"""Independent float64 references of the published rule: eigenvalues by a numpy SVD, the median Hill
alpha re-derived (xmin at the median eigenvalue, n counting xmin), the layer selection (Conv2d /
Linear in module order minus the first, the last and those with fewer than 50 eigenvalues), the linear map onto [s1, s2], and
which norm layer follows which layer. They know nothing of the library."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def reference_alphas(model: nn.Module) -> dict[str, float]:
    """{layer name: alpha}: Conv2d/Linear in module order, first and last dropped, fewer than 50
    eigenvalues dropped; conv weights as kh*kw matrices (out x in) scaled by sqrt(0.5);
    eigenvalues = squared singular values (numpy float64 SVD); median Hill alpha as the reference."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    alphas: dict[str, float] = {}
    for name, m in layers[1:-1]:
        w = m.weight.detach().cpu().double().numpy()
        if w.ndim == 4:
            mats = np.transpose(w.reshape(w.shape[0], w.shape[1], -1), (2, 0, 1)) * math.sqrt(0.5)
        else:
            mats = w[None]
        eigs = np.sort(np.square(np.linalg.svd(mats, compute_uv=False)).ravel())
        if eigs.size < 50:
            continue
        i = eigs.size // 2
        n = eigs.size - i
        alphas[name] = 1 + n / (np.sum(np.log(eigs[i:])) - n * np.log(eigs[i]))
    return alphas


def reference_rates(
    model: nn.Module, lr: float, norm_follows: str, s1=0.5, s2=1.5, alphas: dict[str, float] | None = None
) -> dict[int, float]:
    """{id(param): expected lr}: the linear map of :func:`reference_alphas` (computed unless
    given); norms by order (matching width) or by "bn" -> "conv" names."""
    alphas = reference_alphas(model) if alphas is None else alphas
    a = np.array(list(alphas.values()))
    factor = dict(zip(alphas, s1 + (s2 - s1) * (a - a.min()) / (a.max() - a.min())))
    owner: dict[str, str] = {name: name for name in alphas}
    mods = dict(model.named_modules())
    if norm_follows == "name":
        for name, m in mods.items():
            if isinstance(m, nn.BatchNorm2d) and name.replace("bn", "conv") in alphas:
                owner[name] = name.replace("bn", "conv")
    else:
        previous = None
        for name, m in mods.items():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                previous = (name, m.weight.shape[0])
            elif isinstance(m, nn.BatchNorm2d) and previous and previous[1] == m.num_features and previous[0] in alphas:
                owner[name] = previous[0]
    rates = {id(p): lr for p in model.parameters()}
    for name, layer in owner.items():
        for p in mods[name].parameters(recurse=False):
            rates[id(p)] = lr * factor[layer]
    return rates


NORMS = (nn.BatchNorm2d, nn.LayerNorm)


def rule_owners(model: nn.Module, balanced: dict[str, float], norm_follows: str) -> dict[str, str]:
    """{module name: balanced layer whose rate it takes}."""
    owners = {name: name for name in balanced}
    previous = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            previous = (name, module.weight.shape[0])
        elif isinstance(module, NORMS):
            features = module.num_features if isinstance(module, nn.BatchNorm2d) else module.normalized_shape[0]
            if norm_follows == "name":
                partner = name.replace("bn", "conv")
                if isinstance(module, nn.BatchNorm2d) and partner in balanced:
                    owners[name] = partner
            elif previous is not None and previous[1] == features and previous[0] in balanced:
                owners[name] = previous[0]
    return owners


def hill_median_reference(eigs: np.ndarray) -> float:
    """The published median Hill estimator re-derived from the published rule (xmin at the median eigenvalue, n counting xmin) (float64, numpy)."""
    lam = np.sort(np.asarray(eigs, dtype=np.float64))
    i = lam.size // 2
    n = lam.size - i
    return 1.0 + n / (np.log(lam[i:]).sum() - n * np.log(lam[i]))


def svd_eigs(weight: torch.Tensor) -> np.ndarray:
    """lambda = sigma^2 of a 2-D weight, by a float64 numpy SVD."""
    w = weight.detach().to(torch.float64).cpu().numpy()
    return np.linalg.svd(w, compute_uv=False) ** 2


def median_hill_alpha(w: np.ndarray) -> float:
    """The median Hill alpha of a 2-D numpy weight: float64 SVD, eigenvalues sigma^2."""
    eigs = np.sort(np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2)
    i = eigs.size // 2
    n = eigs.size - i
    return 1 + n / (np.log(eigs[i:]).sum() - n * np.log(eigs[i]))
