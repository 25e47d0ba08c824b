"""Data sets for the training harness: registry, loading, batched on-device augmentation.

``load_dataset(name, data_dir)`` returns an object with ``train_batches`` / ``test_batches``.
"""

from .augment import crop_at, flip_where, normalize, random_crop_flip
from .folder import FolderDataset
from .loading import Dataset, load_dataset
from .memory import InMemoryDataset
from .readers import read_image_folder, resolve_cache_dir
from .registry import DATASETS, DatasetInfo, dataset_info
from .sharding import epoch_order, num_batches, shard_batches, stratified_subset
from .tinyimagenet import prepare_tinyimagenet

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetInfo",
    "FolderDataset",
    "InMemoryDataset",
    "crop_at",
    "dataset_info",
    "epoch_order",
    "flip_where",
    "load_dataset",
    "normalize",
    "num_batches",
    "prepare_tinyimagenet",
    "random_crop_flip",
    "read_image_folder",
    "resolve_cache_dir",
    "shard_batches",
    "stratified_subset",
]
