"""The training device: ``"auto"`` resolved, and every other name checked to exist on this machine
before any work starts (a missing CUDA, MPS or XPU device is a one-line error, not a crash later).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, spell

__all__ = ["resolve_device"]

ACCEPTED = "auto, cpu, cuda, cuda:N, mps, xpu, xpu:N"


def _available(kind: str) -> tuple[bool, int]:
    """(available, device count) of a device type on this machine."""
    if kind == "cuda":
        return torch.cuda.is_available(), torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        backend = getattr(torch.backends, "mps", None)
        ok = bool(backend is not None and backend.is_available())
        return ok, int(ok)
    if kind == "xpu":
        xpu = getattr(torch, "xpu", None)
        ok = bool(xpu is not None and xpu.is_available())
        return ok, xpu.device_count() if ok else 0
    return True, 1


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` of ``name`` (``"auto"``: cuda when available, else cpu), checked to exist.

    Raises:
        ConfigError: an unknown name, a device type this machine lacks, or an index past its count.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}; accepted: {ACCEPTED}") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"unknown device {name!r}; accepted: {ACCEPTED}")
    available, count = _available(device.type)
    if not available:
        raise ConfigError(
            f"{spell('device', name)}: {device.type.upper()} is not available on this machine; use "
            f"{spell('device', 'cpu')} or {spell('device', 'auto')}"
        )
    if device.index is not None and device.index >= count:
        raise ConfigError(
            f"{spell('device', name)}: this machine has {count} {device.type.upper()} device(s) (indices 0-{count - 1})"
        )
    return device
