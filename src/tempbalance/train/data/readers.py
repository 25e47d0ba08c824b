"""Readers that turn each on-disk format into uint8 (or float) arrays held in memory.

CIFAR pickles, SVHN ``.mat`` files, image folders (decoded once and cached), mnist1d, digits.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...atomic import write_atomic
from ...errors import ConfigError, spell

__all__ = [
    "ArraySplits",
    "resolve_cache_dir",
    "read_cifar10",
    "read_cifar100",
    "read_svhn",
    "list_image_folder",
    "read_image_folder",
    "cached_image_folder",
    "has_image_folder",
    "make_mnist1d",
    "make_digits",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
CACHE_ENV = "TEMPBALANCE_CACHE"
CACHE_VERSION = 1


@dataclass
class ArraySplits:
    """A data set held as arrays: x_* is (N, C, H, W) uint8 or (N, C, L) float32, y_* is (N,) int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]


def resolve_cache_dir(data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where decoded data are cached, created if needed.

    Order: ``cache_dir`` if given; else ``$TEMPBALANCE_CACHE``; else
    ``$XDG_CACHE_HOME/tempbalance`` (default ``~/.cache/tempbalance``). The data directory
    itself is never written to (it is often shared or read-only). ``data_dir`` is accepted
    for call compatibility and not used.
    """
    if cache_dir is not None:
        candidates = [Path(cache_dir)]
    elif os.environ.get(CACHE_ENV):
        candidates = [Path(os.environ[CACHE_ENV])]
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        candidates = [Path(base) / "tempbalance"]
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(path, os.W_OK):
            return path
    raise ConfigError(f"no writable cache directory among {[str(p) for p in candidates]}; set {CACHE_ENV}")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    with open(path, "rb") as handle:
        raw = pickle.load(handle, encoding="latin1")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _cifar_images(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))


def _missing(name: str, folder: Path, files: list[str], hint: str) -> ConfigError:
    absent = [f for f in files if not (folder / f).is_file()]
    return ConfigError(f"{name}: missing {', '.join(absent)} in {folder}; {hint}")


def read_cifar10(folder: Path) -> ArraySplits:
    """Read torchvision's ``cifar-10-batches-py`` folder (data_batch_1..5, test_batch, batches.meta)."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if not all((folder / n).is_file() for n in names):
        raise _missing("cifar10", folder, names, f"with {spell('download')} it is fetched")
    train = [_unpickle(folder / n) for n in names[:5]]
    test = _unpickle(folder / "test_batch")
    meta = folder / "batches.meta"
    classes = [str(c) for c in _unpickle(meta)["label_names"]] if meta.is_file() else [str(i) for i in range(10)]
    return ArraySplits(
        x_train=_cifar_images(np.concatenate([b["data"] for b in train])),
        y_train=np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in train]),
        x_test=_cifar_images(test["data"]),
        y_test=np.asarray(test["labels"], dtype=np.int64),
        classes=classes,
    )


def read_cifar100(folder: Path) -> ArraySplits:
    """Read torchvision's ``cifar-100-python`` folder (train, test, meta); fine labels."""
    if not all((folder / n).is_file() for n in ("train", "test")):
        raise _missing("cifar100", folder, ["train", "test"], f"with {spell('download')} it is fetched")
    train, test = _unpickle(folder / "train"), _unpickle(folder / "test")
    meta = folder / "meta"
    classes = [str(c) for c in _unpickle(meta)["fine_label_names"]] if meta.is_file() else [str(i) for i in range(100)]
    return ArraySplits(
        x_train=_cifar_images(train["data"]),
        y_train=np.asarray(train["fine_labels"], dtype=np.int64),
        x_test=_cifar_images(test["data"]),
        y_test=np.asarray(test["fine_labels"], dtype=np.int64),
        classes=classes,
    )


def read_svhn(folder: Path) -> ArraySplits:
    """Read torchvision's SVHN files ``train_32x32.mat`` / ``test_32x32.mat`` (label 10 means digit 0)."""
    names = ["train_32x32.mat", "test_32x32.mat"]
    if not all((folder / n).is_file() for n in names):
        raise _missing("svhn", folder, names, f"with {spell('download')} it is fetched")
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # pragma: no cover - scipy comes with scikit-learn
        raise ImportError("reading SVHN needs scipy: pip install scipy") from exc

    def split(name: str) -> tuple[np.ndarray, np.ndarray]:
        mat = loadmat(str(folder / name))
        x = np.ascontiguousarray(np.transpose(np.asarray(mat["X"], dtype=np.uint8), (3, 2, 0, 1)))
        y = np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10
        return x, y

    x_train, y_train = split(names[0])
    x_test, y_test = split(names[1])
    return ArraySplits(x_train, y_train, x_test, y_test, [str(i) for i in range(10)])


def has_image_folder(root: Path) -> bool:
    """True when ``root/train`` holds at least one class sub-folder."""
    train = Path(root) / "train"
    return train.is_dir() and any(p.is_dir() for p in train.iterdir())


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes (sorted sub-folder names) and ``(file, label)`` pairs of an ImageFolder tree.

    Files are searched recursively inside each class folder, sorted by path.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"image folder {root} does not exist; expected {root}/<class>/<image files>")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"image folder {root} has no class sub-folders; expected {root}/<class>/<image files>")
    items: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        files = sorted(
            p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not files:
            raise ConfigError(f"class folder {root / cls} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        items.extend((f, label) for f in files)
    return classes, items


def read_image_folder(root: Path, *, limit_per_class: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode an ImageFolder tree of equally sized images into ``(x, y, classes)``.

    Args:
        root: folder with one sub-folder per class.
        limit_per_class: read only the first this many files (sorted) of each class.

    Returns:
        x: (N, 3, H, W) uint8 RGB; y: (N,) int64; classes: sorted class names.
    """
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("reading image folders needs Pillow: pip install pillow") from exc
    classes, items = list_image_folder(root)
    if limit_per_class is not None:
        counts: dict[int, int] = {}
        kept = []
        for path, label in items:
            counts[label] = counts.get(label, 0) + 1
            if counts[label] <= limit_per_class:
                kept.append((path, label))
        items = kept
    images = []
    shape = None
    for path, _ in items:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
        if shape is None:
            shape = array.shape
        elif array.shape != shape:
            raise ConfigError(f"{path} is {array.shape[1]}x{array.shape[0]}, expected {shape[1]}x{shape[0]} like the other images")
        images.append(array)
    x = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))
    y = np.asarray([label for _, label in items], dtype=np.int64)
    return x, y, classes


def _folder_fingerprint(root: Path) -> str:
    """Hash of the folder's path, every image's relative path and every folder's mtime.

    Adding, removing or renaming an image changes it; rewriting a file in place does not
    (delete the cache file then). Stat-ing each of 60,000 files would cost over a second.
    """
    digest = hashlib.sha1(f"v{CACHE_VERSION}:{root.resolve()}".encode())
    for split in ("train", "test"):
        entries = []
        for folder, _, files in os.walk(root / split):
            entries.append(f"{os.path.relpath(folder, root)}/:{os.stat(folder).st_mtime_ns}")
            entries.extend(
                os.path.relpath(os.path.join(folder, name), root)
                for name in files
                if name.lower().endswith(IMAGE_EXTENSIONS)
            )
        digest.update("\n".join(sorted(entries)).encode())
    return digest.hexdigest()[:16]


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    write_atomic(path, lambda handle: np.savez(handle, **arrays))


def cached_image_folder(root: Path, name: str, cache_dir: Path) -> ArraySplits:
    """Decode ``root/train`` and ``root/test`` once and cache them as ``<cache_dir>/<name>-folder-<hash>.npz``.

    The hash covers the folder's path and every image's relative path, size and mtime, so a
    changed folder is decoded again.
    """
    root = Path(root)
    if not (root / "test").is_dir():
        raise ConfigError(f"{name}: image-folder copy {root} has train/ but no test/ folder; expected {root}/test/<class>/<images>")
    cache = Path(cache_dir) / f"{name}-folder-{_folder_fingerprint(root)}.npz"
    if cache.is_file():
        with np.load(cache) as data:
            return ArraySplits(data["x_train"], data["y_train"], data["x_test"], data["y_test"], [str(c) for c in data["classes"]])
    log.info("decoding image folder %s once (cache: %s)", root, cache)
    x_train, y_train, classes = read_image_folder(root / "train")
    x_test, y_test, test_classes = read_image_folder(root / "test")
    if test_classes != classes:
        raise ConfigError(f"{name}: class folders differ between {root}/train and {root}/test")
    if x_test.shape[1:] != x_train.shape[1:]:
        raise ConfigError(f"{name}: train images are {x_train.shape[2:]} but test images {x_test.shape[2:]} in {root}")
    try:
        _save_npz(cache, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=np.asarray(classes))
    except OSError as exc:
        log.warning("could not write the cache %s (%s); decoding again next time", cache, exc)
    return ArraySplits(x_train, y_train, x_test, y_test, classes)


def make_mnist1d(cache_dir: Path) -> ArraySplits:
    """Generate MNIST-1D offline with the ``mnist1d`` package's default arguments (never downloads).

    x: (N, 1, 40) float32, already standardised by the generator; 4000 train / 1000 test.
    The result is cached in ``cache_dir``; the global numpy/random states are left untouched.
    """
    cache = Path(cache_dir) / f"mnist1d-v{CACHE_VERSION}.npz"
    if cache.is_file():
        with np.load(cache) as data:
            return ArraySplits(data["x_train"], data["y_train"], data["x_test"], data["y_test"], [str(i) for i in range(10)])
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ImportError("the mnist1d data set needs the mnist1d package: pip install mnist1d") from exc
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(get_dataset_args())  # generates; get_dataset() would try a download
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    splits = ArraySplits(
        x_train=np.asarray(data["x"], dtype=np.float32)[:, None, :],
        y_train=np.asarray(data["y"], dtype=np.int64),
        x_test=np.asarray(data["x_test"], dtype=np.float32)[:, None, :],
        y_test=np.asarray(data["y_test"], dtype=np.int64),
        classes=[str(i) for i in range(10)],
    )
    try:
        _save_npz(cache, x_train=splits.x_train, y_train=splits.y_train, x_test=splits.x_test, y_test=splits.y_test)
    except OSError as exc:
        log.warning("could not write the cache %s (%s)", cache, exc)
    return splits


DIGITS_SPLIT_SEED = 0
DIGITS_TEST_SIZE = 0.3


def make_digits() -> ArraySplits:
    """scikit-learn's 8x8 digits with a stratified 30% test hold-out (split seed 0).

    x: (N, 1, 8, 8) uint8 with values 0..16; 1257 train / 540 test.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    x = bunch.images.astype(np.uint8)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, stratify=y, random_state=DIGITS_SPLIT_SEED
    )
    return ArraySplits(
        np.ascontiguousarray(x_train), y_train, np.ascontiguousarray(x_test), y_test, [str(i) for i in range(10)]
    )
