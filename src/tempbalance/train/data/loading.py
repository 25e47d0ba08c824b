"""``load_dataset(name, data_dir)``: find the files of a data set, read them, wrap them.

A registry of loader functions, one per name in ``DATASETS``; validation errors name the fix.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Union

import torch

from ...errors import ConfigError
from .folder import FolderDataset
from .memory import InMemoryDataset
from .readers import (
    ArraySplits,
    cached_image_folder,
    has_image_folder,
    make_digits,
    make_mnist1d,
    read_cifar10,
    read_cifar100,
    read_svhn,
    resolve_cache_dir,
)
from .registry import dataset_info
from .sharding import check_fraction
from .tinyimagenet import check_tinyimagenet, find_tinyimagenet_root, prepare_tinyimagenet

__all__ = ["Dataset", "load_dataset", "LOADERS"]

log = logging.getLogger(__name__)

Dataset = Union[InMemoryDataset, FolderDataset]


def _need_dir(name: str, data_dir: str | os.PathLike | None, download: bool) -> Path:
    if data_dir is None:
        raise ConfigError(f"{name} needs a data directory: pass data_dir / --data-dir (add --download to fetch it)")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        if download:
            path.mkdir(parents=True, exist_ok=True)
        else:
            raise ConfigError(f"{name}: data directory {path} does not exist (pass --download to create it and fetch {name})")
    return path


def _torchvision_download(name: str, root: Path) -> None:
    try:
        from torchvision import datasets
    except ImportError as exc:
        raise ImportError(f"downloading {name} needs torchvision: pip install torchvision") from exc
    log.info("downloading %s into %s", name, root)
    if name == "svhn":
        for split in ("train", "test"):
            datasets.SVHN(str(root), split=split, download=True)
    else:
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        cls(str(root), train=True, download=True)


def _pickled(name: str, folder_name: str, reader: Callable[[Path], ArraySplits]):
    """Loader for a torchvision pickle set that also accepts an image-folder copy."""

    def load(data_dir, download: bool, cache_dir) -> ArraySplits:
        root = _need_dir(name, data_dir, download)
        if root.name == folder_name:
            return reader(root)
        if (root / folder_name).is_dir():
            return reader(root / folder_name)
        if has_image_folder(root):
            return cached_image_folder(root, name, resolve_cache_dir(root, cache_dir))
        if download:
            _torchvision_download(name, root)
            return reader(root / folder_name)
        raise ConfigError(
            f"{name}: no data in {root}: expected {root / folder_name}/ (torchvision's files; pass --download "
            f"to fetch them) or an image-folder copy {root}/train/<class>/ and {root}/test/<class>/"
        )

    return load


def _load_svhn(data_dir, download: bool, cache_dir) -> ArraySplits:
    root = _need_dir("svhn", data_dir, download)
    if has_image_folder(root):
        return cached_image_folder(root, "svhn", resolve_cache_dir(root, cache_dir))
    if download and not (root / "train_32x32.mat").is_file():
        _torchvision_download("svhn", root)
    return read_svhn(root)


def _load_mnist1d(data_dir, download: bool, cache_dir) -> ArraySplits:
    return make_mnist1d(resolve_cache_dir(None, cache_dir))


def _load_digits(data_dir, download: bool, cache_dir) -> ArraySplits:
    return make_digits()


LOADERS: dict[str, Callable[..., ArraySplits]] = {
    "cifar10": _pickled("cifar10", "cifar-10-batches-py", read_cifar10),
    "cifar100": _pickled("cifar100", "cifar-100-python", read_cifar100),
    "svhn": _load_svhn,
    "mnist1d": _load_mnist1d,
    "digits": _load_digits,
}


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    train_fraction: float = 1.0,
    seed: int = 0,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int | None = None,
) -> Dataset:
    """Load data set ``name`` ready for training on ``device``.

    Args:
        name: one of ``DATASETS`` (cifar10, cifar100, svhn, tinyimagenet, mnist1d, digits).
        data_dir: folder with the files (not needed for mnist1d and digits). cifar10/cifar100
            read torchvision's pickle folder inside it or an image-folder copy
            (``train/<class>/``, ``test/<class>/``, decoded once and cached); svhn reads
            ``train_32x32.mat`` / ``test_32x32.mat``; tinyimagenet reads ``tiny-imagenet-200/``
            prepared by ``tempbalance data tinyimagenet``.
        device: where the data and batches live.
        train_fraction: class-stratified share of the training set, in (0, 1].
        seed: chooses that share (deterministic).
        download: fetch missing files into ``data_dir``: torchvision for cifar10/cifar100/svhn,
            ``prepare_tinyimagenet(data_dir, download=True)`` for tinyimagenet (zip, extract,
            arrange val/).
        cache_dir: where decoded image folders and mnist1d are cached (default: see
            ``resolve_cache_dir``: ``$TEMPBALANCE_CACHE``, else ``$XDG_CACHE_HOME/tempbalance``
            or ``~/.cache/tempbalance``; the data directory is never written).
        num_workers: DataLoader workers for folder sets (tinyimagenet); ignored otherwise.

    Returns:
        An :class:`InMemoryDataset` (all sets but tinyimagenet) or a :class:`FolderDataset`,
        both with ``info``, ``num_train``, ``num_test``, ``train_batches``, ``test_batches``,
        ``len_train_batches``.
    """
    info = dataset_info(name)
    train_fraction = check_fraction(train_fraction)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; accepted: 'cpu', 'cuda', 'cuda:N', 'mps', ...") from None
    if name == "tinyimagenet":
        if download:
            prepare_tinyimagenet(_need_dir(name, data_dir, True), download=True)
        root = find_tinyimagenet_root(_need_dir(name, data_dir, False))
        check_tinyimagenet(root)
        return FolderDataset(
            info, root / "train", root / "val", device=device, train_fraction=train_fraction,
            seed=seed, num_workers=num_workers,
        )
    splits = LOADERS[name](data_dir, download, cache_dir)
    shape = tuple(splits.x_train.shape[1:])
    expected_side = shape[1:] if info.name == "mnist1d" else shape[1:3]
    if shape[0] != info.in_channels or any(s != info.image_size for s in expected_side):
        raise ConfigError(
            f"{name}: images have shape {shape}, expected {info.in_channels} channels of {info.image_size}px"
        )
    if splits.y_train.size and int(splits.y_train.max()) >= info.num_classes:
        raise ConfigError(f"{name}: label {int(splits.y_train.max())} found, expected < {info.num_classes} classes")
    return InMemoryDataset(
        info, splits.x_train, splits.y_train, splits.x_test, splits.y_test,
        classes=splits.classes, device=device, train_fraction=train_fraction, seed=seed,
    )
