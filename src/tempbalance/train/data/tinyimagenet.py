"""TinyImageNet's on-disk layout: find it, extract the zip, arrange val/ into class folders.

Expected after :func:`prepare_tinyimagenet`: ``tiny-imagenet-200/{train,val}/<wnid>/...``.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

from ...errors import ConfigError

__all__ = ["TINYIMAGENET_URL", "find_tinyimagenet_root", "prepare_tinyimagenet", "check_tinyimagenet"]

log = logging.getLogger(__name__)

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
FOLDER = "tiny-imagenet-200"
ZIP = "tiny-imagenet-200.zip"
PREPARE_HINT = "run `tempbalance data tinyimagenet --data-dir {}`"


def find_tinyimagenet_root(data_dir: str | os.PathLike) -> Path:
    """``data_dir/tiny-imagenet-200`` if present, else ``data_dir`` itself if it holds ``train/``."""
    data_dir = Path(data_dir)
    if (data_dir / FOLDER).is_dir():
        return data_dir / FOLDER
    if (data_dir / "train").is_dir():
        return data_dir
    hint = PREPARE_HINT.format(data_dir)
    raise ConfigError(
        f"tinyimagenet: no {FOLDER}/ folder (or train/ folder) in {data_dir}; put {ZIP} there and {hint}, "
        "or add --download to that command"
    )


def _val_unarranged(root: Path) -> bool:
    return (root / "val" / "images").is_dir()


def check_tinyimagenet(root: Path) -> None:
    """Raise ConfigError unless ``root`` has train/<wnid>/ and val/<wnid>/ class folders."""
    hint = PREPARE_HINT.format(root.parent if root.name == FOLDER else root)
    train = root / "train"
    if not train.is_dir() or not any(p.is_dir() for p in train.iterdir()):
        raise ConfigError(f"tinyimagenet: expected class folders train/<wnid>/images/*.JPEG in {root}")
    if not (root / "val").is_dir():
        raise ConfigError(f"tinyimagenet: no val/ folder in {root}; expected val/images/ + val/val_annotations.txt from the zip")
    if _val_unarranged(root):
        raise ConfigError(
            f"tinyimagenet: the validation split {root / 'val'} is not arranged into class folders "
            f"(it still has val/images/); {hint}"
        )


def _extract(zip_path: Path, data_dir: Path) -> None:
    log.info("extracting %s into %s", zip_path, data_dir)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(data_dir)
    except zipfile.BadZipFile as exc:
        raise ConfigError(f"tinyimagenet: {zip_path} is not a valid zip file ({exc}); download it again") from None


def _arrange_val(root: Path) -> int:
    """Move val/images/<file> to val/<wnid>/<file> per val_annotations.txt; return the number moved."""
    val = root / "val"
    annotations = val / "val_annotations.txt"
    if not annotations.is_file():
        raise ConfigError(f"tinyimagenet: {val}/images exists but {annotations} is missing; extract the zip again")
    wnids_file = root / "wnids.txt"
    wnids = set(wnids_file.read_text().split()) if wnids_file.is_file() else None
    moved = 0
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ConfigError(f"tinyimagenet: {annotations}:{number}: expected '<file>\\t<wnid>\\t...', got {line!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnids is not None and wnid not in wnids:
            raise ConfigError(f"tinyimagenet: {annotations}:{number}: class {wnid!r} is not in {wnids_file}")
        source, target = val / "images" / name, val / wnid / name
        if target.is_file():
            continue
        if not source.is_file():
            raise ConfigError(f"tinyimagenet: {source} named in {annotations}:{number} does not exist")
        target.parent.mkdir(exist_ok=True)
        os.replace(source, target)
        moved += 1
    leftover = [p.name for p in (val / "images").iterdir()]
    if leftover:
        raise ConfigError(f"tinyimagenet: {len(leftover)} files in {val / 'images'} are not in {annotations} (e.g. {leftover[0]})")
    (val / "images").rmdir()
    return moved


def prepare_tinyimagenet(data_dir: str | os.PathLike, *, download: bool = False) -> Path:
    """Make ``data_dir`` hold a usable TinyImageNet; return its root folder.

    Steps, each skipped when already done: download ``tiny-imagenet-200.zip`` into
    ``data_dir`` (only with ``download=True``), extract it, move the validation images
    ``val/images/*.JPEG`` into ``val/<wnid>/`` folders following ``val/val_annotations.txt``.
    Running it again is harmless.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        if not download:
            raise ConfigError(f"tinyimagenet: data directory {data_dir} does not exist")
        data_dir.mkdir(parents=True)
    if not (data_dir / FOLDER).is_dir() and not (data_dir / "train").is_dir():
        zip_path = data_dir / ZIP
        if not zip_path.is_file():
            if not download:
                raise ConfigError(
                    f"tinyimagenet: neither {data_dir / FOLDER}/ nor {zip_path} exists; "
                    f"download {TINYIMAGENET_URL} there or pass --download"
                )
            from torchvision.datasets.utils import download_url

            download_url(TINYIMAGENET_URL, str(data_dir), filename=ZIP)
        _extract(zip_path, data_dir)
    root = find_tinyimagenet_root(data_dir)
    if _val_unarranged(root):
        moved = _arrange_val(root)
        log.info("tinyimagenet: moved %d validation images into class folders under %s", moved, root / "val")
    check_tinyimagenet(root)
    return root
