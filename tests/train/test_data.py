"""Tests of the training harness's data layer: readers for every on-disk format, augmentation,
shuffling, sharding, subsets, normalisation, a data directory that does not hold the data set, and
the in-memory data path on another device (``meta``) with its block-wise random draws."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tempbalance.cli import main
from tempbalance.errors import ConfigError
from tempbalance.train import run_training
from tempbalance.train.data import (
    DATASETS,
    InMemoryDataset,
    augment,
    crop_at,
    flip_where,
    load_dataset,
    num_batches,
    random_crop_flip,
    read_image_folder,
    readers,
    resolve_cache_dir,
    shard_batches,
    stratified_subset,
)
from tempbalance.train.data.sharding import STREAM_AUGMENT, make_generator
from tests.helpers.cli import cli
from tests.helpers.paths import REPO
from tests.helpers.runs import TINY

pytestmark = pytest.mark.usefixtures("data_cache")


REAL_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465])
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616])


def _reference_normalize(raw: np.ndarray, scale: float, mean, std) -> np.ndarray:
    """Independent float64 normalisation of (N, C, ...) raw values."""
    shape = (1, -1) + (1,) * (raw.ndim - 2)
    return (raw.astype(np.float64) / scale - np.asarray(mean).reshape(shape)) / np.asarray(std).reshape(shape)


def _collect_test(data, batch_size=7):
    xs, ys = zip(*data.test_batches(batch_size))
    return torch.cat(xs).double().numpy(), torch.cat(ys).numpy()


# ---------------------------------------------------------------- on-disk formats

def _write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        batches.append((data, labels))
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": f"batch {i}"}, f)
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), rng.integers(0, 10, n_test).tolist()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test[0], "labels": test[1]}, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return batches, test, names


def test_cifar10_pickles_read_in_torchvision_layout(tmp_path):
    batches, (test_x, test_y), names = _write_cifar10(tmp_path)
    data = load_dataset("cifar10", tmp_path)
    assert (data.num_train, data.num_test) == (20, 6)
    assert data.classes == names
    x, y = _collect_test(data, batch_size=4)
    ref = _reference_normalize(test_x.reshape(-1, 3, 32, 32), 255.0, CIFAR10_MEAN, CIFAR10_STD)
    np.testing.assert_allclose(x, ref, atol=1e-5)
    assert y.tolist() == test_y
    # training set: every example once per epoch, labels as written
    train_labels = sorted(sum((b[1] for b in batches), []))
    got = torch.cat([yb for _, yb in data.train_batches(8, epoch=0, seed=1, augment=False)]).tolist()
    assert sorted(got) == train_labels
    # the pickle folder itself is accepted as data_dir too
    assert load_dataset("cifar10", tmp_path / "cifar-10-batches-py").num_train == 20


def test_cifar100_pickles_with_bytes_keys_and_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = rng.integers(0, 256, (12, 3072), dtype=np.uint8), rng.integers(0, 100, 12).tolist()
    test = rng.integers(0, 256, (5, 3072), dtype=np.uint8), rng.integers(0, 100, 5).tolist()
    for name, (x, y) in (("train", train), ("test", test)):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x, b"fine_labels": y, b"coarse_labels": [0] * len(y)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    data = load_dataset("cifar100", tmp_path)
    assert data.info.num_classes == 100 and data.classes[:2] == ["c0", "c1"]
    x, y = _collect_test(data)
    mean, std = DATASETS["cifar100"].mean, DATASETS["cifar100"].std
    np.testing.assert_allclose(x, _reference_normalize(test[0].reshape(-1, 3, 32, 32), 255.0, mean, std), atol=1e-5)
    assert y.tolist() == test[1]


def test_svhn_mat_files_axes_and_label_ten_is_zero(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    arrays = {}
    for split, n in (("train", 9), ("test", 4)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1))
        y[0, 0] = 10
        savemat(tmp_path / f"{split}_32x32.mat", {"X": X, "y": y})
        arrays[split] = X, y
    data = load_dataset("svhn", tmp_path)
    assert (data.num_train, data.num_test) == (9, 4)
    x, y = _collect_test(data, batch_size=3)
    X, y_ref = arrays["test"]
    info = DATASETS["svhn"]
    for n in range(4):  # pixel (h, w, channel c) of image n in the .mat is x[n, c, h, w]
        ref = (X[:, :, :, n].astype(np.float64) / 255 - info.mean) / np.asarray(info.std)
        np.testing.assert_allclose(x[n].transpose(1, 2, 0), ref, atol=1e-5)
    assert y.tolist() == [0 if v == 10 else int(v) for v in y_ref[:, 0]]


def _write_image_folder(root: Path, classes, per_class: int, size: int = 32, seed: int = 0, fmt: str = "png"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = {}
    for split in ("train", "test"):
        for label, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                path = root / split / cls / f"{i:04d}.{fmt}"
                Image.fromarray(array).save(path)
                images[(split, cls, i)] = array
    return images


def test_image_folder_copy_is_decoded_once_and_cached(tmp_path, monkeypatch):
    classes = [f"class{i}" for i in range(10)]
    images = _write_image_folder(tmp_path / "c10", classes, per_class=2)
    from PIL import Image

    jpeg = np.full((32, 32, 3), 100, dtype=np.uint8)
    Image.fromarray(jpeg).save(tmp_path / "c10" / "train" / "class3" / "extra.jpg", quality=95)
    data = load_dataset("cifar10", tmp_path / "c10")
    assert (data.num_train, data.num_test) == (21, 20) and data.classes == classes
    x, y = _collect_test(data, batch_size=6)
    ref = np.stack([images[("test", c, i)].transpose(2, 0, 1) for c in classes for i in range(2)])
    np.testing.assert_allclose(x, _reference_normalize(ref, 255.0, CIFAR10_MEAN, CIFAR10_STD), atol=1e-5)
    assert y.tolist() == [label for label in range(10) for _ in range(2)]
    cached = list((tmp_path / "cache").glob("cifar10-folder-*.npz"))
    assert len(cached) == 1
    # second load comes from the cache: decoding would fail now
    monkeypatch.setattr(readers, "read_image_folder", lambda *a, **k: pytest.fail("decoded again"))
    again = load_dataset("cifar10", tmp_path / "c10")
    assert torch.equal(again.x_test, data.x_test) and torch.equal(again.y_train, data.y_train)
    # a new image invalidates the cache
    monkeypatch.undo()
    monkeypatch.setenv("TEMPBALANCE_CACHE", str(tmp_path / "cache"))
    Image.fromarray(jpeg).save(tmp_path / "c10" / "train" / "class5" / "extra.jpg")
    assert load_dataset("cifar10", tmp_path / "c10").num_train == 22


def test_image_folder_errors(tmp_path):
    classes = [f"class{i}" for i in range(10)]
    _write_image_folder(tmp_path / "d", classes, per_class=1)
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "d" / "train" / "class0" / "small.png")
    with pytest.raises(ConfigError, match="small.png"):
        load_dataset("cifar10", tmp_path / "d")
    for name in classes:
        (tmp_path / "e" / "train" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "e" / "train" / name / "x.png")
    with pytest.raises(ConfigError, match="no test/ folder"):
        load_dataset("cifar10", tmp_path / "e")


def test_cache_dir_resolution(tmp_path, monkeypatch):
    assert resolve_cache_dir(tmp_path / "data", tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_cache_dir(tmp_path / "data") == tmp_path / "cache"  # env var from the fixture
    monkeypatch.delenv("TEMPBALANCE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "data").mkdir()
    assert resolve_cache_dir(tmp_path / "data") == tmp_path / "xdg" / "tempbalance"
    assert not (tmp_path / "data" / ".tempbalance_cache").exists()  # the data dir is never written
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir(tmp_path / "data") == tmp_path / "home" / ".cache" / "tempbalance"


# ---------------------------------------------------------------- TinyImageNet


def test_tinyimagenet_layout_errors(tmp_path):
    with pytest.raises(ConfigError, match="tiny-imagenet-200"):
        load_dataset("tinyimagenet", tmp_path)
    root = tmp_path / "tiny-imagenet-200"
    (root / "train" / "n1" / "images").mkdir(parents=True)
    (root / "val" / "images").mkdir(parents=True)
    with pytest.raises(ConfigError, match="not arranged into class folders"):
        load_dataset("tinyimagenet", tmp_path)
    assert main(["data", "tinyimagenet", "--data-dir", str(tmp_path)]) == 2  # no val_annotations.txt
    assert main(["data", "tinyimagenet", "--data-dir", str(tmp_path / "missing")]) == 2


# ---------------------------------------------------------------- embedded sets

@pytest.mark.slow
def test_mnist1d_generated_offline_and_leaves_global_rng_alone(tmp_path, monkeypatch):
    import requests

    monkeypatch.setattr(requests, "get", lambda *a, **k: pytest.fail("mnist1d tried to download"))
    monkeypatch.chdir(tmp_path)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    data = load_dataset("mnist1d")
    assert np.array_equal(np.random.get_state()[1], before)
    assert not list(tmp_path.glob("*.pkl"))
    assert (data.num_train, data.num_test) == (4000, 1000)
    assert data.x_train.shape == (4000, 1, 40) and data.x_train.dtype == torch.float32
    assert sorted(torch.unique(data.y_train).tolist()) == list(range(10))
    x, y = next(data.train_batches(64, epoch=0, seed=0))  # no augmentation: rows are stored rows
    assert x.shape == (64, 1, 40)
    stored = {tuple(row.flatten().tolist()) for row in data.x_train[:4000]}
    assert all(tuple(row.flatten().tolist()) in stored for row in x)
    assert abs(float(data.x_train.mean())) < 0.05 and abs(float(data.x_train.std()) - 1) < 0.05


def test_digits_split_and_normalisation():
    from sklearn.datasets import load_digits

    data = load_dataset("digits")
    assert (data.num_train, data.num_test) == (1257, 540)
    assert data.x_train.shape[1:] == (1, 8, 8)
    full = load_digits()
    counts = np.bincount(full.target, minlength=10)
    test_counts = np.bincount(data.y_test.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.3 * counts) <= 1)
    x, y = _collect_test(data, batch_size=100)
    # every test image is one of sklearn's images with the same label, scaled by 16
    lookup = {tuple(img.flatten()): int(t) for img, t in zip(full.images.astype(int), full.target)}
    raw = np.rint((x * 0.3760 + 0.3053) * 16).astype(int)
    assert all(lookup[tuple(r.flatten())] == label for r, label in zip(raw, y))
    # the set's constants standardise the whole set
    pooled = _reference_normalize(full.images[:, None].astype(float), 16.0, [0.3053], [0.3760])
    assert abs(pooled.mean()) < 1e-3 and abs(pooled.std() - 1) < 1e-3
    assert torch.equal(load_dataset("digits").y_test, data.y_test)  # fixed split


# ---------------------------------------------------------------- augmentation

def _crop_reference(image: np.ndarray, padding: int, dy: int, dx: int) -> np.ndarray:
    """Per-image reference: zero-pad with numpy and slice."""
    padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)))
    return padded[:, dy : dy + image.shape[1], dx : dx + image.shape[2]]


def test_crop_at_matches_per_image_slice_of_padded_image():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=gen, dtype=torch.uint8)
    dy = torch.randint(0, 9, (16,), generator=gen)
    dx = torch.randint(0, 9, (16,), generator=gen)
    out = crop_at(images, 4, dy, dx)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for b in range(16):
        np.testing.assert_array_equal(out[b].numpy(), _crop_reference(images[b].numpy(), 4, int(dy[b]), int(dx[b])))
    centre = torch.full((16,), 4)
    assert torch.equal(crop_at(images, 4, centre, centre), images)


def test_flip_is_a_true_mirror():
    images = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    out = flip_where(images, torch.tensor([True, False]))
    np.testing.assert_array_equal(out[0].numpy(), images[0].numpy()[:, :, ::-1])
    assert torch.equal(out[1], images[1])


def test_random_crop_flip_output_is_a_crop_or_mirrored_crop():
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(1, 256, (24, 3, 12, 12), generator=gen, dtype=torch.uint8)
    out = random_crop_flip(images, 4, torch.Generator().manual_seed(5)).numpy()
    flips = 0
    for b in range(24):
        img = images[b].numpy()
        candidates = [
            (flip, dy, dx)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if np.array_equal(out[b], (lambda c: c[:, :, ::-1] if flip else c)(_crop_reference(img, 4, dy, dx)))
        ]
        assert candidates, f"image {b} is not a crop of its padded image"
        flips += candidates[0][0]
    assert 0 < flips < 24
    again = random_crop_flip(images, 4, torch.Generator().manual_seed(5)).numpy()
    np.testing.assert_array_equal(out, again)


def _index_dataset(n: int, n_test: int = 10) -> InMemoryDataset:
    """A float set whose example i is the value i (mnist1d's info: no augmentation, identity normalisation)."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, 1, 40).contiguous()
    xt = torch.arange(n_test, dtype=torch.float32).view(n_test, 1, 1).expand(n_test, 1, 40).contiguous()
    return InMemoryDataset(DATASETS["mnist1d"], x, torch.arange(n) % 10, xt, torch.arange(n_test) % 10, classes=list("0123456789"))


def _epoch_ids(data, **kwargs) -> list[list[int]]:
    return [xb[:, 0, 0].long().tolist() for xb, _ in data.train_batches(**kwargs)]


def test_memory_train_batches_augment_keeps_shape_and_covers_epoch():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (30, 3, 32, 32), dtype=np.uint8)
    data = InMemoryDataset(DATASETS["cifar10"], x, np.arange(30) % 10, x[:5], np.arange(5), classes=[str(i) for i in range(10)])
    plain = torch.cat([xb for xb, _ in data.train_batches(8, epoch=0, seed=0, augment=False)])
    ref = torch.from_numpy(_reference_normalize(x, 255.0, CIFAR10_MEAN, CIFAR10_STD)).float()
    order = lambda t: t.flatten(1)[t.flatten(1).sum(1).argsort()]  # noqa: E731 - random images: distinct sums
    torch.testing.assert_close(order(plain), order(ref), atol=1e-5, rtol=0)
    aug = [xb for xb, _ in data.train_batches(8, epoch=0, seed=0)]
    assert [a.shape[0] for a in aug] == [8, 8, 8, 6] and all(a.shape[1:] == (3, 32, 32) for a in aug)
    assert not torch.equal(torch.cat(aug), plain)
    # one image, many epochs: its crop/flip is drawn afresh each epoch
    one = InMemoryDataset(DATASETS["cifar10"], x[:1], np.zeros(1), x[:1], np.zeros(1), classes=[str(i) for i in range(10)])
    views = {next(one.train_batches(1, epoch=e, seed=0))[0].sum().item() for e in range(8)}
    assert len(views) > 1


# ---------------------------------------------------------------- order, shards, subsets

def test_shuffling_is_deterministic_from_seed_and_epoch():
    data = _index_dataset(50)
    a = _epoch_ids(data, batch_size=16, epoch=3, seed=7)
    assert a == _epoch_ids(data, batch_size=16, epoch=3, seed=7)
    assert a != _epoch_ids(data, batch_size=16, epoch=4, seed=7)
    assert a != _epoch_ids(data, batch_size=16, epoch=3, seed=8)
    assert sorted(sum(a, [])) == list(range(50))
    images = InMemoryDataset(
        DATASETS["cifar10"], np.random.default_rng(0).integers(0, 256, (20, 3, 32, 32), dtype=np.uint8),
        np.arange(20) % 10, np.zeros((2, 3, 32, 32), np.uint8), np.zeros(2), classes=[str(i) for i in range(10)],
    )
    first = [xb for xb, _ in images.train_batches(8, epoch=1, seed=2)]
    second = [xb for xb, _ in images.train_batches(8, epoch=1, seed=2)]
    assert all(torch.equal(p, q) for p, q in zip(first, second))


@pytest.mark.parametrize("n,batch_size,world", [(50, 16, 1), (50, 16, 3), (48, 8, 4), (49, 8, 4), (33, 4, 2), (7, 3, 7), (9, 1, 2)])
def test_shards_are_disjoint_and_cover_with_equal_batch_counts(n, batch_size, world):
    data = _index_dataset(n)
    shards = [_epoch_ids(data, batch_size=batch_size, epoch=2, seed=1, rank=r, world_size=world) for r in range(world)]
    flat = [sum(s, []) for s in shards]
    assert sorted(sum(flat, [])) == list(range(n))  # disjoint and covering
    counts = {len(s) for s in shards}
    expected = data.len_train_batches(batch_size, world)
    if batch_size > 1 or n % world == 0:
        assert counts == {expected}
    assert max(counts) == expected
    assert all(0 < len(b) <= batch_size for s in shards for b in s)
    # drop_last: full batches only, still disjoint, same count on every rank
    dropped = [_epoch_ids(data, batch_size=batch_size, epoch=2, seed=1, rank=r, world_size=world, drop_last=True) for r in range(world)]
    ids = [i for s in dropped for b in s for i in b]
    assert len(ids) == len(set(ids)) and all(len(b) == batch_size for s in dropped for b in s)
    assert {len(s) for s in dropped} == {(n // world) // batch_size}


def test_test_batches_shard_in_order():
    data = _index_dataset(20, n_test=11)
    got = [[int(v) for v in xb[:, 0, 0]] for r in range(3) for xb, _ in data.test_batches(2, rank=r, world_size=3)]
    assert sorted(sum(got, [])) == list(range(11))
    assert [int(v) for xb, _ in data.test_batches(4) for v in xb[:, 0, 0]] == list(range(11))


def test_shard_arguments_are_checked():
    with pytest.raises(ConfigError, match="rank"):
        shard_batches(torch.arange(10), 2, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size"):
        num_batches(10, 0)
    with pytest.raises(ConfigError, match="world_size=11"):
        num_batches(10, 2, world_size=11)


def test_stratified_subset_counts_and_determinism():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    keep = stratified_subset(labels, 0.1, seed=3)
    assert np.bincount(labels[keep].numpy()).tolist() == [5, 3, 2]
    assert torch.equal(keep, stratified_subset(labels, 0.1, seed=3))
    assert not torch.equal(keep, stratified_subset(labels, 0.1, seed=4))
    assert np.bincount(labels[stratified_subset(labels, 0.001, seed=0)].numpy()).tolist() == [1, 1, 1]
    data = load_dataset("digits", train_fraction=0.25, seed=1)
    full_counts = np.bincount(load_dataset("digits").y_train.numpy())
    assert np.bincount(data.y_train.numpy()).tolist() == [round(0.25 * c) for c in full_counts]
    assert data.num_test == 540


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, "half", float("nan")])
def test_train_fraction_outside_range_is_rejected(fraction):
    with pytest.raises(ConfigError, match="train_fraction"):
        load_dataset("digits", train_fraction=fraction)


# ---------------------------------------------------------------- errors

def test_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="accepted: cifar10, cifar100, svhn, tinyimagenet, mnist1d, digits"):
        load_dataset("imagenet")
    with pytest.raises(ConfigError, match="needs a data directory"):
        load_dataset("cifar10")
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset("cifar100", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"cifar-10-batches-py.*download=True"):  # the Python API's spelling
        load_dataset("cifar10", tmp_path)
    with pytest.raises(ConfigError, match=r"train_32x32.mat.*download=True"):
        load_dataset("svhn", tmp_path)
    with pytest.raises(ConfigError, match="device 'gpu0'"):
        load_dataset("digits", device="gpu0")
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(ConfigError, match="data_batch_1"):
        load_dataset("cifar10", tmp_path)


# ---------------------------------------------------------------- the real CIFAR-10 copy

def test_real_cifar10_folder_normalises_to_zero_mean():
    if not (REAL_CIFAR10 / "train").is_dir():
        pytest.skip(f"real CIFAR-10 image folder not found at {REAL_CIFAR10}")
    x, y, classes = read_image_folder(REAL_CIFAR10 / "train", limit_per_class=200)
    assert x.shape == (2000, 3, 32, 32) and x.dtype == np.uint8
    assert classes[0] == "airplane" and np.bincount(y).tolist() == [200] * 10
    info = DATASETS["cifar10"]
    data = InMemoryDataset(info, x, y, x[:1], y[:1], classes=classes)
    normalised = torch.cat([xb for xb, _ in data.train_batches(500, epoch=0, seed=0, augment=False)])
    mean = normalised.double().mean((0, 2, 3))
    std = normalised.double().std((0, 2, 3))
    assert torch.all(mean.abs() < 0.05), mean
    assert torch.all((std - 1).abs() < 0.1), std


# ---------------------------------------------------------------- the data path on another device


def _cifar_like(n_train: int, n_test: int, device: str = "cpu", seed: int = 0) -> InMemoryDataset:
    rng = np.random.default_rng(seed)
    return InMemoryDataset(
        DATASETS["cifar10"],
        rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n_train),
        rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n_test),
        classes=[str(i) for i in range(10)], device=device,
    )


@pytest.mark.parametrize("augment_on", [True, False])
def test_every_batch_tensor_lives_on_the_dataset_device(augment_on):
    """On ``meta`` any tensor made on the CPU by mistake (offsets, masks, indices) fails or shows up."""
    data = _cifar_like(70, 23, device="meta")
    assert data.x_train.device.type == "meta"
    seen = 0
    for x, y in data.train_batches(16, epoch=2, seed=5, augment=augment_on, rank=1, world_size=2):
        assert x.device.type == "meta" and y.device.type == "meta"
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (3, 32, 32) and x.shape[0] == y.shape[0]
        seen += x.shape[0]
    assert seen == 35  # rank 1's half of 70
    sizes = [x.shape[0] for x, _ in data.test_batches(10)]
    assert sizes == [10, 10, 3]
    for x, y in data.test_batches(10):
        assert x.device.type == "meta" and y.device.type == "meta"


def test_draws_reach_the_device_in_one_copy_per_block(monkeypatch):
    monkeypatch.setattr(augment, "BLOCK_SAMPLES", 50)
    sizes = [16, 16, 16, 16, 7, 60, 3]
    draws = list(augment.draw_crop_flip(torch.Generator().manual_seed(1), sizes, 4, "meta"))
    assert [d[0].shape[0] for d in draws] == sizes
    for dy, dx, flip in draws:
        assert dy.device.type == dx.device.type == flip.device.type == "meta"
        assert dy.dtype == torch.int64 and flip.dtype == torch.bool
    # blocks of at most 50 examples (a larger batch alone): [16, 16, 16], [16, 7], [60], [3]
    bases = [id(dy._base) for dy, _, _ in draws]
    assert [bases.index(b) for b in bases] == [0, 0, 0, 3, 3, 5, 6]


def _crop_flip_reference(image: np.ndarray, padding: int, dy: int, dx: int, flip: bool) -> np.ndarray:
    c, h, w = image.shape
    padded = np.zeros((c, h + 2 * padding, w + 2 * padding), image.dtype)
    padded[:, padding : padding + h, padding : padding + w] = image
    out = padded[:, dy : dy + h, dx : dx + w]
    return out[:, :, ::-1] if flip else out


def _expected_epoch(data: InMemoryDataset, batch: int, *, epoch: int, seed: int, rank: int, world: int):
    """The published per-batch rule, written out: for each batch of the shuffled shard, in order, the
    (seed, epoch, rank) generator draws randint(0, 9, (2, B)) for the offsets, then rand(B) < 0.5."""
    from tempbalance.train.data.sharding import epoch_order, shard_batches

    generator = make_generator(seed, STREAM_AUGMENT, epoch, rank)
    info = data.info
    mean = np.asarray(info.mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(info.std, np.float32).reshape(3, 1, 1)
    x_all, y_all = data.x_train.numpy(), data.y_train.numpy()
    order = epoch_order(data.num_train, seed=seed, epoch=epoch)
    for index in shard_batches(order, batch, rank=rank, world_size=world):
        offsets = torch.randint(0, 2 * info.padding + 1, (2, index.numel()), generator=generator)
        flips = torch.rand(index.numel(), generator=generator) < 0.5
        raw = np.stack([
            _crop_flip_reference(x_all[i], info.padding, int(offsets[0, k]), int(offsets[1, k]), bool(flips[k]))
            for k, i in enumerate(index.tolist())
        ])
        yield (raw.astype(np.float32) / np.float32(info.pixel_scale) - mean) / std, y_all[index.numpy()]


@pytest.mark.parametrize("block", [None, 40, 1])
def test_block_draws_give_the_per_batch_stream_bit_for_bit(monkeypatch, block):
    if block is not None:
        monkeypatch.setattr(augment, "BLOCK_SAMPLES", block)
    data = _cifar_like(91, 5, seed=3)
    for epoch, world, rank, batch in [(0, 1, 0, 16), (3, 2, 1, 10), (1, 3, 2, 64)]:
        got = list(data.train_batches(batch, epoch=epoch, seed=7, rank=rank, world_size=world))
        want = list(_expected_epoch(data, batch, epoch=epoch, seed=7, rank=rank, world=world))
        assert len(got) == len(want)
        for (x, y), (xw, yw) in zip(got, want):
            np.testing.assert_array_equal(y.numpy(), yw)
            np.testing.assert_array_equal(x.numpy(), xw)


def test_random_crop_flip_keeps_its_stream():
    """The public one-batch function draws the same numbers in the same order."""
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment.random_crop_flip(images, 2, torch.Generator().manual_seed(9))
    generator = torch.Generator().manual_seed(9)
    offsets = torch.randint(0, 5, (2, 12), generator=generator)
    flips = torch.rand(12, generator=generator) < 0.5
    for b in range(12):
        want = _crop_flip_reference(images[b].numpy(), 2, int(offsets[0, b]), int(offsets[1, b]), bool(flips[b]))
        np.testing.assert_array_equal(out[b].numpy(), want)


def test_batch_sizes_that_do_not_match_are_refused():
    generator_batches = iter([(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))])
    info = DATASETS["cifar10"]
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    batches = augment.augmented_batches(generator_batches, info, mean, std, augment=True, seed=0, epoch=0, rank=0,
                                        batch_sizes=[5])
    with pytest.raises(ValueError, match="5 examples for a batch of 4"):
        next(batches)


# ---------------------------------------------------------------- a data directory that does not hold the data set


def _image_folder(root: Path, classes: int, per_class: int = 1) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((32, 32, 3), c * 20 + i, np.uint8)).save(folder / f"{i}.png")


def test_a_cifar100_request_on_a_10_class_folder_is_refused_before_decoding(tmp_path, monkeypatch, capsys):
    _image_folder(tmp_path / "c10", classes=10)
    monkeypatch.setenv("TEMPBALANCE_CACHE", str(tmp_path / "cache"))
    from tempbalance.train.data import readers

    monkeypatch.setattr(readers, "read_image_folder", lambda *a, **k: pytest.fail("decoded"))
    code, err, _ = cli(["train", "--dataset", "cifar100", "--data-dir", tmp_path / "c10", "--epochs", "1",
                        "--device", "cpu", "--out", tmp_path / "run"], capsys)
    assert code == 2 and len(err) == 1
    assert "cifar100 has 100 classes but" in err[0] and "holds 10 class folders (a folder of cifar10 or svhn?)" in err[0]
    assert "--data-dir DIR" in err[0]
    assert not (tmp_path / "run").exists() and not list((tmp_path / "cache").glob("*.npz"))
    (tmp_path / "c100" / "cifar-10-batches-py").mkdir(parents=True)  # the other CIFAR's pickles
    with pytest.raises(ConfigError, match=r"holds cifar-10-batches-py/ \(the other CIFAR\), not cifar-100-python/"):
        run_training(dict(TINY, dataset="cifar100", model="cnn1d", data_dir=str(tmp_path / "c100")))
