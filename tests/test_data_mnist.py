"""MNIST loaders on IDX files written by the test, and the benchmark split rules."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from data_writers import write_idx, write_mnist_dir
from tdatune.data.mnist import (
    first_per_class,
    load_mnist_benchmark_splits,
    load_mnist_idx,
    read_idx,
)


def test_read_idx_round_trip_gz_and_plain(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    write_idx(tmp_path / "b", arr, compress=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    assert np.array_equal(read_idx(tmp_path / "b"), arr)


def test_read_idx_rejects_bad_magic_and_short_body(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    with gzip.open(tmp_path / "short.gz", "wb") as h:
        h.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(ValueError, match="body has 3"):
        read_idx(tmp_path / "short.gz")


def test_load_mnist_idx_equals_written(tmp_path):
    written = write_mnist_dir(tmp_path, n_train=30, n_test=12)
    x, y = load_mnist_idx(tmp_path, "test")
    assert x.shape == (12, 784) and x.dtype == torch.float32
    assert torch.equal((x * 255).round().to(torch.uint8).reshape(12, 28, 28),
                       torch.from_numpy(written["t10k_images"]))
    assert torch.equal(y, torch.from_numpy(written["t10k_labels"]).long())


def test_missing_file_names_what_is_expected(tmp_path):
    write_mnist_dir(tmp_path, 10, 10)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist_idx(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist_idx(tmp_path / "nowhere")


def test_benchmark_splits_from_idx_dir(tmp_path):
    written = write_mnist_dir(tmp_path, n_train=5200, n_test=300, per_class=500)
    splits = load_mnist_benchmark_splits(5000, 100, 50, seed=3, data_dir=tmp_path)
    assert splits.sizes() == {"train": 5000, "val": 100, "test": 50}
    labels = torch.from_numpy(written["train_labels"]).long()
    keep = first_per_class(labels, 500)
    expected = torch.from_numpy(written["train_images"]).reshape(-1, 784)[keep].float() / 255
    assert torch.equal(splits.train.inputs, expected)
    assert torch.equal(splits.train.targets, labels[keep])
    assert torch.equal(splits.train.targets.bincount(), torch.full((10,), 500))
    # val and test: disjoint rows of the t10k file
    test_x = torch.from_numpy(written["t10k_images"]).reshape(-1, 784).float() / 255
    rows = lambda d: {int(torch.nonzero((test_x == r).all(1))[0]) for r in d.inputs}  # noqa: E731
    assert not rows(splits.val) & rows(splits.test)
    assert splits.source.startswith("real:")
    again = load_mnist_benchmark_splits(64, 10, 10, seed=3, data_dir=tmp_path)
    assert again.sizes()["train"] == 64


def test_benchmark_splits_reject_a_directory_without_data(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz"):
        load_mnist_benchmark_splits(10, 2, 2, data_dir=tmp_path)


def test_benchmark_splits_fallback_to_5k_csv(tmp_path):
    rng = np.random.default_rng(0)
    table = np.concatenate([rng.integers(0, 256, (200, 784)), rng.integers(0, 10, (200, 1))], 1)
    np.savetxt(tmp_path / "mnist_5k.csv.gz", table, delimiter=",", fmt="%d")
    splits = load_mnist_benchmark_splits(5000, 20, 30, seed=0, data_dir=tmp_path)
    assert splits.sizes() == {"train": 150, "val": 20, "test": 30}
    all_rows = torch.cat([splits.train.inputs, splits.val.inputs, splits.test.inputs])
    assert torch.unique(all_rows, dim=0).shape[0] == 200  # disjoint and complete
    assert "held out" in splits.source
