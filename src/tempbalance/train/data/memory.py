"""A data set held whole on the training device and augmented there in batches.

The airbench / hlb-CIFAR10 data path: one uint8 (or float) tensor per split, no DataLoader.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from .augment import augmented_batches, normalize
from .registry import DatasetInfo
from .sharding import epoch_order, num_batches, shard_batches, stratified_subset

__all__ = ["InMemoryDataset"]

Batch = tuple[torch.Tensor, torch.Tensor]


class InMemoryDataset:
    """Train and test splits as tensors on ``device``; batches come out normalised (float32).

    Args:
        info: the data set's :class:`DatasetInfo` (normalisation, augmentation policy).
        x_train, x_test: (N, C, H, W) uint8 images or (N, C, L) float arrays, raw values.
        y_train, y_test: (N,) integer labels.
        classes: class names, index = label.
        device: where the tensors live and batches are produced.
        train_fraction: keep a class-stratified share of the training set, in (0, 1].
        seed: picks that share (the shuffling seed is given per epoch to :meth:`train_batches`).
    """

    def __init__(
        self,
        info: DatasetInfo,
        x_train: np.ndarray | torch.Tensor,
        y_train: np.ndarray | torch.Tensor,
        x_test: np.ndarray | torch.Tensor,
        y_test: np.ndarray | torch.Tensor,
        *,
        classes: Sequence[str],
        device: str | torch.device = "cpu",
        train_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.info = info
        self.classes = list(classes)
        self.device = torch.device(device)
        y_train = torch.as_tensor(y_train, dtype=torch.int64)
        keep = stratified_subset(y_train, train_fraction, seed=seed)
        x_train = torch.as_tensor(x_train)
        if keep.numel() != y_train.numel():
            x_train, y_train = x_train[keep], y_train[keep]
        self.x_train = x_train.contiguous().to(self.device)
        self.y_train = y_train.to(self.device)
        self.x_test = torch.as_tensor(x_test).contiguous().to(self.device)
        self.y_test = torch.as_tensor(y_test, dtype=torch.int64).to(self.device)
        shape = (1, info.in_channels) + (1,) * (self.x_train.dim() - 2)
        self._mean = torch.tensor(info.mean, dtype=torch.float32, device=self.device).view(shape)
        self._std = torch.tensor(info.std, dtype=torch.float32, device=self.device).view(shape)

    @property
    def num_train(self) -> int:
        """Number of training examples (after ``train_fraction``)."""
        return int(self.y_train.numel())

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return int(self.y_test.numel())

    def len_train_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches per rank and epoch that :meth:`train_batches` yields."""
        return num_batches(self.num_train, batch_size, world_size, drop_last)

    def len_test_batches(self, batch_size: int, world_size: int = 1) -> int:
        """Batches per rank that :meth:`test_batches` yields."""
        return num_batches(self.num_test, batch_size, world_size, False)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw stored values -> float32 network input, ``(raw / pixel_scale - mean) / std``."""
        return normalize(raw, self.info.pixel_scale, self._mean, self._std)

    def train_batches(
        self,
        batch_size: int,
        *,
        epoch: int,
        seed: int,
        augment: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Yield this rank's ``(x, y)`` training batches for ``epoch``, shuffled from ``(seed, epoch)``.

        x: (B, C, H, W) float32 normalised (random crop + flip when ``augment`` and the data
        set's policy is ``"crop-flip"``); y: (B,) int64. Both on the data set's device.
        Shards over ``world_size`` ranks are disjoint; see :func:`shard_batches`.
        """
        order = epoch_order(self.num_train, seed=seed, epoch=epoch).to(self.device)
        batches = shard_batches(order, batch_size, rank=rank, world_size=world_size, drop_last=drop_last)
        raw = ((self.x_train[index], self.y_train[index]) for index in batches)
        yield from augmented_batches(
            raw, self.info, self._mean, self._std, augment=augment, seed=seed, epoch=epoch, rank=rank,
            batch_sizes=[int(index.numel()) for index in batches],
        )

    def test_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """Yield this rank's ``(x, y)`` test batches in order, normalised, not augmented."""
        order = torch.arange(self.num_test, device=self.device)
        for index in shard_batches(order, batch_size, rank=rank, world_size=world_size):
            yield self.normalize(self.x_test[index]), self.y_test[index]

    def __repr__(self) -> str:
        return (
            f"InMemoryDataset({self.info.name}, train={self.num_train}, test={self.num_test}, "
            f"x={tuple(self.x_train.shape[1:])} {self.x_train.dtype}, device={self.device})"
        )
