"""A data set read from image folders through a torch DataLoader (TinyImageNet, any ImageFolder).

Workers decode files to uint8 (torchvision ``ImageFolder`` + ``PILToTensor``); crop, flip and
normalisation then run batched on the device, with the same code as the in-memory sets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch

from ...errors import ConfigError
from .augment import augmented_batches, normalize
from .readers import list_image_folder
from .registry import DatasetInfo
from .sharding import epoch_order, num_batches, shard_batches, stratified_subset

__all__ = ["FolderDataset"]

Batch = tuple[torch.Tensor, torch.Tensor]


def _image_folder(root: Path):
    try:
        from torchvision.datasets import ImageFolder
        from torchvision.transforms import PILToTensor
    except ImportError as exc:
        raise ImportError("folder data sets need torchvision: pip install torchvision") from exc
    return ImageFolder(str(root), transform=PILToTensor())


class FolderDataset:
    """Train/test image folders (``<root>/<class>/...``) streamed through a DataLoader.

    Args:
        info: the data set's :class:`DatasetInfo`; images must be ``info.image_size`` square.
        train_root, test_root: ImageFolder roots with the same class folders.
        device: where batches are delivered and augmented.
        train_fraction: class-stratified share of the training set to keep, in (0, 1].
        seed: picks that share.
        num_workers: DataLoader worker processes (default: min(8, CPU count)).
    """

    def __init__(
        self,
        info: DatasetInfo,
        train_root: str | os.PathLike,
        test_root: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        train_fraction: float = 1.0,
        seed: int = 0,
        num_workers: int | None = None,
    ) -> None:
        self.info = info
        self.device = torch.device(device)
        train_classes, _ = list_image_folder(Path(train_root))
        test_classes, _ = list_image_folder(Path(test_root))
        if train_classes != test_classes:
            missing = sorted(set(train_classes) ^ set(test_classes))[:5]
            raise ConfigError(
                f"{info.name}: class folders of {train_root} and {test_root} differ (e.g. {missing})"
            )
        if len(train_classes) != info.num_classes:
            raise ConfigError(
                f"{info.name}: expected {info.num_classes} class folders in {train_root}, found {len(train_classes)}"
            )
        self.classes = train_classes
        self._train = _image_folder(Path(train_root))
        self._test = _image_folder(Path(test_root))
        targets = torch.as_tensor(self._train.targets, dtype=torch.int64)
        self._train_index = stratified_subset(targets, train_fraction, seed=seed)
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1)
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers = num_workers
        self._mean = torch.tensor(info.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    @property
    def num_train(self) -> int:
        """Number of training examples (after ``train_fraction``)."""
        return int(self._train_index.numel())

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return len(self._test)

    def len_train_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches per rank and epoch that :meth:`train_batches` yields."""
        return num_batches(self.num_train, batch_size, world_size, drop_last)

    def len_test_batches(self, batch_size: int, world_size: int = 1) -> int:
        """Batches per rank that :meth:`test_batches` yields."""
        return num_batches(self.num_test, batch_size, world_size, False)

    def _load(self, dataset, batches: list[torch.Tensor]) -> Iterator[Batch]:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=[b.tolist() for b in batches],
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        size = self.info.image_size
        for x, y in loader:
            if x.shape[-2:] != (size, size):
                raise ConfigError(f"{self.info.name}: images must be {size}x{size}, got {tuple(x.shape[-2:])}")
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

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
        """Yield this rank's ``(x, y)`` training batches for ``epoch`` (see ``InMemoryDataset.train_batches``)."""
        order = self._train_index[epoch_order(self.num_train, seed=seed, epoch=epoch)]
        batches = shard_batches(order, batch_size, rank=rank, world_size=world_size, drop_last=drop_last)
        yield from augmented_batches(
            self._load(self._train, batches), self.info, self._mean, self._std,
            augment=augment, seed=seed, epoch=epoch, rank=rank,
        )

    def test_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """Yield this rank's ``(x, y)`` test batches in order, normalised, not augmented."""
        batches = shard_batches(torch.arange(self.num_test), batch_size, rank=rank, world_size=world_size)
        for raw, y in self._load(self._test, batches):
            yield normalize(raw, self.info.pixel_scale, self._mean, self._std), y

    def __repr__(self) -> str:
        return f"FolderDataset({self.info.name}, train={self.num_train}, test={self.num_test}, device={self.device})"
