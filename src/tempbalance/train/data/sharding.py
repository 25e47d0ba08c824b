"""Deterministic order, rank shards and batch boundaries for the training and test passes.

Shared by the in-memory and the folder data sets, so both shuffle and shard identically.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...errors import ConfigError

__all__ = ["make_generator", "epoch_order", "shard_batches", "num_batches", "stratified_subset", "check_fraction"]

# Separate random streams drawn from one user seed.
STREAM_ORDER = 0
STREAM_AUGMENT = 1
STREAM_SUBSET = 2


def make_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``(seed, *keys)`` through numpy's SeedSequence.

    Distinct key tuples give independent streams; the same tuple always gives the same numbers.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    words = np.random.SeedSequence([int(seed), *[int(k) for k in keys]]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator()
    generator.manual_seed(int(words[0]) << 32 | int(words[1]))
    return generator


def epoch_order(n: int, *, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of ``n`` training examples for ``epoch``: a (n,) int64 CPU permutation.

    Depends only on ``(seed, epoch)``, so every rank of a distributed run computes the same one.
    """
    return torch.randperm(n, generator=make_generator(seed, STREAM_ORDER, epoch))


def _check_sharding(n: int, batch_size: int, rank: int, world_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size must be a positive integer, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
    if n < world_size:
        raise ConfigError(f"cannot shard {n} examples over world_size={world_size}: need at least one per rank")


def num_batches(n: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    """Batches per rank for ``n`` examples; the same on every rank (see :func:`shard_batches`)."""
    _check_sharding(n, batch_size, 0, world_size)
    if drop_last:
        return (n // world_size) // batch_size
    return math.ceil(math.ceil(n / world_size) / batch_size)


def shard_batches(
    order: torch.Tensor, batch_size: int, *, rank: int = 0, world_size: int = 1, drop_last: bool = False
) -> list[torch.Tensor]:
    """Split ``order`` (a 1-D index tensor) into this rank's batches.

    Rank ``r`` takes ``order[r::world_size]``: the shards are disjoint and, without
    ``drop_last``, together cover every example exactly once. Every rank gets the same number
    of batches (:func:`num_batches`), as distributed training needs: when the shards differ in
    length by one and that would cost the shorter shard its last batch, the shorter shard's
    last full batch gives one example to a final batch of one (only with ``batch_size=1``
    can the shorter shard then still end one batch early). With ``drop_last`` every batch
    holds exactly ``batch_size`` examples and the remainder is skipped.
    """
    n = int(order.numel())
    _check_sharding(n, batch_size, rank, world_size)
    shard = order[rank::world_size]
    k = num_batches(n, batch_size, world_size, drop_last)
    if drop_last:
        return [shard[i * batch_size : (i + 1) * batch_size] for i in range(k)]
    size = int(shard.numel())
    bounds = [max(0, min(i * batch_size, size - (k - i))) for i in range(k)] + [size]
    batches = [shard[bounds[i] : bounds[i + 1]] for i in range(k)]
    return [batch for batch in batches if batch.numel()]


def check_fraction(train_fraction: float) -> float:
    """Validate ``train_fraction`` in (0, 1] and return it as a float."""
    try:
        value = float(train_fraction)
    except (TypeError, ValueError):
        raise ConfigError(f"train_fraction must be a number in (0, 1], got {train_fraction!r}") from None
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"train_fraction must be in (0, 1], got {train_fraction!r}")
    return value


def stratified_subset(labels: torch.Tensor, fraction: float, *, seed: int) -> torch.Tensor:
    """Indices of a class-stratified random subset: round(fraction * count) per class (at least 1).

    Args:
        labels: (N,) integer labels.
        fraction: share of each class to keep, in (0, 1]; 1.0 returns every index.
        seed: the subset depends only on ``(seed, labels)``.

    Returns:
        (M,) int64 indices into ``labels``, ascending.
    """
    fraction = check_fraction(fraction)
    labels = torch.as_tensor(labels).cpu()
    if fraction == 1.0:
        return torch.arange(labels.numel())
    generator = make_generator(seed, STREAM_SUBSET)
    keep = []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        count = max(1, round(fraction * members.numel()))
        keep.append(members[torch.randperm(members.numel(), generator=generator)[:count]])
    return torch.sort(torch.cat(keep)).values
