"""What each supported data set is: classes, channels, size, default model, normalisation.

One :class:`DatasetInfo` per name in :data:`DATASETS`; loading lives in ``loading.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError

__all__ = ["DatasetInfo", "DATASETS", "dataset_info"]


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a data set.

    Attributes:
        name: registry name (``"cifar10"``, ...).
        num_classes: number of labels.
        in_channels: channels of one input (1 for mnist1d/digits, 3 for images).
        image_size: side of a square image in pixels (sequence length for mnist1d).
        default_model: the model name of ``tempbalance.train.models`` used when none is given.
        mean, std: per-channel normalisation applied after scaling to [0, 1]
            (``x = (raw / pixel_scale - mean) / std``).
        pixel_scale: the raw value that maps to 1.0 (255 for 8-bit images, 16 for digits,
            1 for mnist1d, which is stored as already standardised floats).
        augment: training augmentation: ``"crop-flip"`` (random crop with ``padding`` zero
            pixels on each side, then horizontal flip with p = 0.5) or ``"none"``.
        padding: crop padding in pixels for ``"crop-flip"``.
        source: one line on where the data comes from (shown by ``tempbalance data list``).
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    default_model: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_scale: float = 255.0
    augment: str = "crop-flip"
    padding: int = 4
    source: str = ""


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "cifar10", 10, 3, 32, "resnet18",
            mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
            source="torchvision pickles (--download) or an image-folder copy train/<class>/, test/<class>/",
        ),
        DatasetInfo(
            "cifar100", 100, 3, 32, "resnet18",
            mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
            source="torchvision pickles (--download) or an image-folder copy",
        ),
        DatasetInfo(
            "svhn", 10, 3, 32, "resnet18",
            mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970),
            source="torchvision .mat files train_32x32.mat, test_32x32.mat (--download)",
        ),
        DatasetInfo(
            "tinyimagenet", 200, 3, 64, "resnet18-64",
            mean=(0.4802, 0.4481, 0.3975), std=(0.2770, 0.2691, 0.2821),
            source="tiny-imagenet-200.zip layout; run `tempbalance data tinyimagenet --data-dir DIR`",
        ),
        DatasetInfo(
            "mnist1d", 10, 1, 40, "cnn1d",
            mean=(0.0,), std=(1.0,), pixel_scale=1.0, augment="none", padding=0,
            source="generated offline by the mnist1d package (default arguments, 4000 train / 1000 test)",
        ),
        DatasetInfo(
            "digits", 10, 1, 8, "cnn-digits",
            mean=(0.3053,), std=(0.3760,), pixel_scale=16.0, augment="none", padding=0,
            source="scikit-learn's bundled 8x8 digits, stratified 30% test hold-out (split seed 0)",
        ),
    )
}


def dataset_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of ``name``; raise ConfigError listing the accepted names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown data set {name!r}; accepted: {', '.join(DATASETS)}"
        ) from None
