"""``load_dataset(name, data_dir)``: find the files of a data set, read them, wrap them.

A registry of loader functions, one per name in ``DATASETS``; validation errors name the fix.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Union

import torch

from ...errors import ConfigError, Placeholder, spell
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
from .registry import DATASETS, dataset_info
from .sharding import check_fraction
from .tinyimagenet import check_tinyimagenet, find_tinyimagenet_root, prepare_tinyimagenet

__all__ = ["Dataset", "load_dataset", "check_data_source", "LOADERS"]

log = logging.getLogger(__name__)

Dataset = Union[InMemoryDataset, FolderDataset]


def _need_dir(name: str, data_dir: str | os.PathLike | None, download: bool, *, create: bool = True) -> Path:
    if data_dir is None:
        raise ConfigError(
            f"{name} needs a data directory: pass {spell('data_dir', Placeholder('DIR'))} "
            f"(with {spell('download')} to fetch {name} into it)"
        )
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        if not download:
            raise ConfigError(
                f"{name}: data directory {path} does not exist "
                f"(with {spell('download')} it is created and {name} fetched)"
            )
        if create:
            path.mkdir(parents=True, exist_ok=True)
    return path


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_class_count(name: str, folder: Path) -> None:
    """Refuse an image folder whose number of class folders is not the data set's."""
    info = dataset_info(name)
    expected = info.num_classes
    found = len(_class_folders(folder))
    if found != expected:
        others = [
            other.name for other in DATASETS.values()
            if other.num_classes == found and other.name != name
            and (other.in_channels, other.image_size) == (info.in_channels, info.image_size)
        ]
        hint = f" (a folder of {' or '.join(others)}?)" if others else ""
        raise ConfigError(
            f"{name} has {expected} classes but {folder} holds {found} class folders{hint}; "
            f"pass {name}'s own folder as {spell('data_dir', Placeholder('DIR'))}"
        )


# name -> (torchvision's folder, the files in it, the other CIFAR's folder)
_PICKLE_FOLDERS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "cifar-100-python"),
    "cifar100": ("cifar-100-python", ["train", "test"], "cifar-10-batches-py"),
}


def _check_pickled(name: str, root: Path, download: bool) -> None:
    folder_name, files, other = _PICKLE_FOLDERS[name]
    folder = root if root.name == folder_name else root / folder_name
    if folder.is_dir():
        absent = [f for f in files if not (folder / f).is_file()]
        if absent and not download:
            raise ConfigError(
                f"{name}: missing {', '.join(absent)} in {folder}; with {spell('download')} they are fetched"
            )
    elif has_image_folder(root):
        _check_class_count(name, root / "train")
        if not (root / "test").is_dir():
            raise ConfigError(f"{name}: image-folder copy {root} has train/ but no test/ folder")
    elif download:
        return
    elif root.name == other or (root / other).is_dir():
        raise ConfigError(
            f"{name}: {root} holds {other}/ (the other CIFAR), not {folder_name}/; pass {name}'s own folder"
        )
    else:
        raise ConfigError(
            f"{name}: no data in {root}: expected {root / folder_name}/ (torchvision's files; with "
            f"{spell('download')} they are fetched) or an image-folder copy {root}/train/<class>/ and "
            f"{root}/test/<class>/"
        )


def check_data_source(name: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> None:
    """Check, without reading any image, that ``data_dir`` holds data set ``name`` (or that
    ``download`` may fetch it there): the directory exists, the expected files or folders are
    there, and an image folder has the data set's number of classes.

    Raises:
        ConfigError: naming the directory, what was expected and what was found.
    """
    info = dataset_info(name)
    if name in ("mnist1d", "digits"):
        return
    root = _need_dir(name, data_dir, download, create=False)
    if not root.is_dir():
        return  # download creates it
    if name in _PICKLE_FOLDERS:
        _check_pickled(name, root, download)
    elif name == "svhn":
        if has_image_folder(root):
            _check_class_count(name, root / "train")
        elif not download:
            absent = [f for f in ("train_32x32.mat", "test_32x32.mat") if not (root / f).is_file()]
            if absent:
                raise ConfigError(
                    f"svhn: missing {', '.join(absent)} in {root}; with {spell('download')} they are fetched"
                )
    elif name == "tinyimagenet" and not download:
        tiny = find_tinyimagenet_root(root)
        check_tinyimagenet(tiny)
        _check_class_count(info.name, tiny / "train")


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
    """Loader for a torchvision pickle set that also accepts an image-folder copy
    (:func:`check_data_source` has checked the directory)."""

    def load(data_dir, download: bool, cache_dir) -> ArraySplits:
        root = _need_dir(name, data_dir, download)
        folder = root if root.name == folder_name else root / folder_name
        if folder.is_dir():
            return reader(folder)
        if has_image_folder(root):
            return cached_image_folder(root, name, resolve_cache_dir(root, cache_dir))
        _torchvision_download(name, root)
        return reader(root / folder_name)

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
    check_data_source(name, data_dir, download)
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
