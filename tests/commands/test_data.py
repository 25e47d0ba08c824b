"""``tempbalance data``: listing the data sets, preparing them, TinyImageNet from its zip."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tempbalance.cli import main
from tempbalance.errors import ConfigError
from tempbalance.train.data import DATASETS, load_dataset

pytestmark = pytest.mark.usefixtures("data_cache")


def _write_tinyimagenet_zip(staging: Path, zip_path: Path, n_classes: int = 200):
    """The zip's layout with one train and one val image per class; image colour (R) = class index."""
    from PIL import Image

    root = staging / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(n_classes)]
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i, wnid in enumerate(wnids):
        (root / "train" / wnid / "images").mkdir(parents=True)
        colour = np.zeros((64, 64, 3), np.uint8)
        colour[..., 0] = i
        Image.fromarray(colour).save(root / "train" / wnid / "images" / f"{wnid}_0.JPEG", quality=100)
        name = f"val_{(i * 7) % n_classes}.JPEG"  # val files are not in class order
        Image.fromarray(colour).save(root / "val" / "images" / name, quality=100)
        lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(root.rglob("*")):
            archive.write(path, path.relative_to(staging))
    return wnids


@pytest.mark.slow
def test_tinyimagenet_zip_prepare_command_and_loading(tmp_path, capsys):
    data_dir = tmp_path / "tiny"
    data_dir.mkdir()
    _write_tinyimagenet_zip(tmp_path / "staging", data_dir / "tiny-imagenet-200.zip")
    with pytest.raises(ConfigError, match="tempbalance data tinyimagenet"):
        load_dataset("tinyimagenet", data_dir)
    assert main(["data", "tinyimagenet", "--data-dir", str(data_dir)]) == 0
    val = data_dir / "tiny-imagenet-200" / "val"
    assert not (val / "images").exists()
    assert sorted(p.name for p in (val / "n00000003").iterdir()) == ["val_21.JPEG"]
    assert main(["data", "tinyimagenet", "--data-dir", str(data_dir)]) == 0  # idempotent
    data = load_dataset("tinyimagenet", data_dir, num_workers=0)
    assert (data.num_train, data.num_test, len(data.classes)) == (200, 200, 200)
    info = DATASETS["tinyimagenet"]
    xs, ys = zip(*data.test_batches(64))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (200, 3, 64, 64) and x.dtype == torch.float32
    red = (x[:, 0].mean((1, 2)) * info.std[0] + info.mean[0]) * 255
    assert torch.all((red - y.double()).abs() < 3), "val image landed in the wrong class folder"
    xb, yb = next(data.train_batches(50, epoch=0, seed=0))
    assert xb.shape == (50, 3, 64, 64) and yb.shape == (50,)
    assert data.len_train_batches(50) == 4 == len(list(data.train_batches(50, epoch=1, seed=0)))


def test_data_command_list_and_errors(tmp_path, capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in DATASETS)
    assert main(["data", "prepare", "nope"]) == 2
    assert "accepted" in capsys.readouterr().err
    assert main(["data", "prepare", "digits"]) == 0
    assert "1257 train / 540 test" in capsys.readouterr().out
