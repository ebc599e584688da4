"""CIFAR-2 loader on pickles written by the test; the Fashion-MNIST stand-in on tiny IDX files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from data_writers import write_cifar_dir, write_mnist_dir
from tdatune.data.cifar import (
    CIFAR_MEAN,
    CIFAR_STD,
    load_cifar2_splits,
    load_cifar10,
    read_cifar_batch,
    to_rgb32,
)


def test_read_cifar_batch_equals_written(tmp_path):
    written = write_cifar_dir(tmp_path, per_batch=7)
    x, y = read_cifar_batch(tmp_path / "data_batch_2")
    assert x.shape == (7, 3, 32, 32) and x.dtype == np.uint8
    assert np.array_equal(x.reshape(7, -1), written["data_batch_2_data"])
    assert np.array_equal(y, written["data_batch_2_labels"])
    xs, ys = load_cifar10(tmp_path, "train")
    assert xs.shape[0] == 35 and np.array_equal(ys[7:14], written["data_batch_2_labels"])


def test_cifar2_real_splits(tmp_path):
    written = write_cifar_dir(tmp_path / "cifar-10-batches-py", per_batch=40)
    train_labels = np.concatenate([written[f"data_batch_{i}_labels"] for i in range(1, 6)])
    n_pool = int(np.isin(train_labels, [0, 1]).sum())
    splits = load_cifar2_splits(n_pool, 2, 2, seed=0, data_dir=tmp_path)
    assert splits.source.startswith("real: CIFAR-10 airplane vs automobile")
    assert splits.train.inputs.shape == (n_pool, 3, 32, 32)
    assert set(splits.train.targets.tolist()) <= {0, 1}
    # undo the standardisation: every training image is one of the written class-0/1 images
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    raw = ((splits.train.inputs * std + mean) * 255).round().to(torch.uint8).reshape(n_pool, -1)
    data = np.concatenate([written[f"data_batch_{i}_data"] for i in range(1, 6)])
    pool = {bytes(r): int(lbl == 1) for r, lbl in zip(data, train_labels, strict=True)
            if lbl in (0, 1)}
    got = {bytes(r.numpy()): int(t) for r, t in zip(raw, splits.train.targets, strict=True)}
    assert got == pool


def test_cifar_malformed_and_missing(tmp_path):
    write_cifar_dir(tmp_path, per_batch=3)
    with open(tmp_path / "test_batch", "wb") as h:
        pickle.dump({b"images": np.zeros((3, 3072), np.uint8)}, h)
    with pytest.raises(ValueError, match="b'data' and b'labels'"):
        load_cifar10(tmp_path, "test")
    (tmp_path / "junk").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a CIFAR-10 python pickle"):
        read_cifar_batch(tmp_path / "junk")
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar10(tmp_path, "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST IDX"):
        load_cifar2_splits(4, 1, 1, data_dir=empty)


def test_standin_from_fashion_idx_dir(tmp_path):
    write_mnist_dir(tmp_path, n_train=200, n_test=100)
    splits = load_cifar2_splits(20, 5, 5, seed=1, data_dir=tmp_path, standin_classes=(2, 4))
    assert splits.source.startswith("stand-in: Fashion-MNIST Pullover vs Coat")
    assert splits.train.inputs.shape == (20, 3, 32, 32)
    assert splits.num_classes == 2 and set(splits.train.targets.tolist()) <= {0, 1}
    assert torch.equal(splits.train.inputs[:, 0], splits.train.inputs[:, 2])
    assert abs(float(splits.train.inputs.mean())) < 0.05


def test_to_rgb32_keeps_constant_images_constant():
    x = torch.full((2, 784), 0.25)
    assert torch.allclose(to_rgb32(x), torch.full((2, 3, 32, 32), 0.25))


def test_the_stand_in_is_the_same_bytes_on_any_thread_count(tmp_path):
    """The standardisation constants are float64 sums in a fixed order: the stand-in's bytes
    (which identify every model trained on it) do not depend on how many threads torch uses.
    Before, a float32 mean split over 1 or 2 threads gave different images."""
    written = write_mnist_dir(tmp_path, n_train=6000, n_test=150, seed=3)
    before = torch.get_num_threads()
    try:
        loaded = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            loaded.append(load_cifar2_splits(1000, 10, 10, seed=2, data_dir=tmp_path))
    finally:
        torch.set_num_threads(before)
    one, two = loaded
    assert torch.equal(one.train.inputs, two.train.inputs)
    assert one.info["pixel_mean"] == two.info["pixel_mean"]
    # The constants are the float64 mean and sample deviation of the drawn training pixels
    # (class 0 and 1 images scaled to [0, 1] in float32), worked here with numpy on the same draw.
    keep = np.isin(written["train_labels"], [0, 1])
    pool = (written["train_images"][keep].reshape(int(keep.sum()), -1).astype(np.float32)
            / np.float32(255.0)).astype(np.float64)  # the loader's float32 pixels
    drawn = torch.randperm(len(pool), generator=torch.Generator().manual_seed(2))[:1000].numpy()
    assert one.info["pixel_mean"] == pytest.approx(float(pool[drawn].mean()), rel=1e-12)
    assert one.info["pixel_std"] == pytest.approx(float(pool[drawn].std(ddof=1)), rel=1e-12)
