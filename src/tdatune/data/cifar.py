"""CIFAR-2 (two CIFAR-10 classes) from the canonical python pickles, and its offline stand-in:
two Fashion-MNIST classes resized to 32x32 and repeated over 3 channels.

Both give float images [n, 3, 32, 32], standardised, with labels 0 / 1 in the order of
``classes``. Training images are a seeded draw from the training files; validation and test
are disjoint seeded draws from the test files.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tdatune.data.base import ArrayDataset, Splits
from tdatune.data.mnist import has_mnist_idx, load_mnist_idx

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
FASHION_DIR_DEFAULT = "/usr/share/datasets/fashion-mnist"
FASHION_DIR_ENV = "TDATUNE_FASHION_MNIST_DIR"
FASHION_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"


def cifar10_dir(directory: str | os.PathLike[str]) -> Path | None:
    """``directory`` or its cifar-10-batches-py child if it holds all six pickles, else None."""
    directory = Path(directory)
    for cand in (directory, directory / "cifar-10-batches-py"):
        if all((cand / f).exists() for f in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE)):
            return cand
    return None


def read_cifar_batch(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python pickle: uint8 images [n, 3, 32, 32] and int64 labels [n]."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            blob = pickle.load(handle, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{path} is not a CIFAR-10 python pickle: {err}") from err
    if not isinstance(blob, dict) or b"data" not in blob or b"labels" not in blob:
        keys = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(f"{path}: expected a dict with keys b'data' and b'labels', got {keys}")
    data = np.asarray(blob[b"data"], dtype=np.uint8)
    labels = np.asarray(blob[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}: b'data' should be [n, 3072] uint8 with n labels, got {data.shape} and "
            f"{labels.shape} labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(directory: str | os.PathLike[str], split: str = "train") -> tuple[np.ndarray,
                                                                                   np.ndarray]:
    """CIFAR-10 train (the five data batches) or test images and labels from the pickles."""
    folder = cifar10_dir(directory)
    if folder is None:
        raise FileNotFoundError(
            f"{directory} does not hold the CIFAR-10 python pickles: expected "
            f"{', '.join(CIFAR_TRAIN_FILES)} and {CIFAR_TEST_FILE} in it or in its "
            "cifar-10-batches-py/ subfolder (the 'CIFAR-10 python version' archive, unpacked)"
        )
    files = CIFAR_TRAIN_FILES if split == "train" else (CIFAR_TEST_FILE,)
    parts = [read_cifar_batch(folder / f) for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _two_class(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, int]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    keep = (y == classes[0]) | (y == classes[1])
    return x[keep], (y[keep] == classes[1]).long()


def _split_draws(x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor,
                 n_train: int, n_val: int, n_test: int, gen: torch.Generator, name: str
                 ) -> tuple[ArrayDataset, ArrayDataset, ArrayDataset]:
    if n_train > x_tr.shape[0] or n_val + n_test > x_te.shape[0]:
        raise ValueError(
            f"{name}: asked for {n_train} train (have {x_tr.shape[0]}) and {n_val} + {n_test} "
            f"val + test (have {x_te.shape[0]} together); lower the sizes"
        )
    tr = torch.randperm(x_tr.shape[0], generator=gen)[:n_train]
    te = torch.randperm(x_te.shape[0], generator=gen)
    va, ts = te[:n_val], te[n_val : n_val + n_test]
    return (ArrayDataset(x_tr[tr], y_tr[tr]), ArrayDataset(x_te[va], y_te[va]),
            ArrayDataset(x_te[ts], y_te[ts]))


def load_cifar2_splits(
    n_train: int = 5000, n_val: int = 500, n_test: int = 500, seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None, *, classes: tuple[int, int] = (0, 1),
    standin_classes: tuple[int, int] = (0, 1),
) -> Splits:
    """CIFAR-2 images [n, 3, 32, 32] (real pickles when ``data_dir`` holds them) or the stand-in.

    ``data_dir`` may hold the CIFAR-10 pickles (real data, ``classes``) or the four
    Fashion-MNIST IDX files (stand-in, ``standin_classes``); without it the stand-in is read from
    ``$TDATUNE_FASHION_MNIST_DIR`` or Debian's /usr/share/datasets/fashion-mnist.
    """
    gen = torch.Generator().manual_seed(seed)
    if data_dir is not None and cifar10_dir(data_dir) is not None:
        parts = []
        for split in ("train", "test"):
            xs, ys = load_cifar10(data_dir, split)
            x = torch.from_numpy(xs).float() / 255.0
            mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
            parts.append(_two_class((x - mean) / std, torch.from_numpy(ys), classes))
        train, val, test = _split_draws(*parts[0], *parts[1], n_train, n_val, n_test, gen, "cifar2")
        names = f"{CIFAR_CLASSES[classes[0]]} vs {CIFAR_CLASSES[classes[1]]}"
        return Splits(train, val, test, name="cifar2", num_classes=2,
                      source=f"real: CIFAR-10 {names} from {Path(data_dir)}",
                      info={"classes": list(classes)})
    fashion = fashion_mnist_dir(data_dir)
    parts = []
    for split in ("train", "test"):
        x, y = load_mnist_idx(fashion, split)
        parts.append(_two_class(x, y, standin_classes))
    (x_tr, y_tr), (x_te, y_te) = parts
    train, val, test = _split_draws(x_tr, y_tr, x_te, y_te, n_train, n_val, n_test, gen,
                                    "cifar2 stand-in")
    # float64 in numpy's fixed summation order: a float32 torch mean is split over threads,
    # and its rounding (so the stand-in's bytes) would change with the thread count.
    pixels = train.inputs.double().numpy()
    mean, std = float(pixels.mean()), float(pixels.std(ddof=1))
    train, val, test = (ArrayDataset(to_rgb32((d.inputs - mean) / std), d.targets)
                        for d in (train, val, test))
    names = f"{FASHION_CLASSES[standin_classes[0]]} vs {FASHION_CLASSES[standin_classes[1]]}"
    return Splits(train, val, test, name="cifar2", num_classes=2,
                  source=f"stand-in: Fashion-MNIST {names} resized to 32x32x3 for CIFAR-2 "
                         f"(from {fashion})",
                  info={"classes": list(standin_classes), "pixel_mean": mean, "pixel_std": std})


def fashion_mnist_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """The Fashion-MNIST IDX folder for the stand-in, with a clear error when there is none."""
    if data_dir is not None:
        if has_mnist_idx(data_dir):
            return Path(data_dir)
        raise FileNotFoundError(
            f"{data_dir} holds neither the CIFAR-10 python pickles ({', '.join(CIFAR_TRAIN_FILES)}, "
            f"{CIFAR_TEST_FILE}, possibly under cifar-10-batches-py/) nor the four Fashion-MNIST "
            "IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)"
        )
    env = os.environ.get(FASHION_DIR_ENV)
    candidate = Path(env) if env else Path(FASHION_DIR_DEFAULT)
    if has_mnist_idx(candidate):
        return candidate
    raise FileNotFoundError(
        f"no data for cifar2: the offline stand-in needs the Fashion-MNIST IDX files in "
        f"{candidate}. Install them with: {FASHION_INSTALL} (Debian/Ubuntu, as root), or "
        f"set ${FASHION_DIR_ENV} to a folder holding the four IDX files, or pass --data-dir "
        "with the CIFAR-10 python pickles"
    )


def to_rgb32(x: torch.Tensor) -> torch.Tensor:
    """Flat 28x28 grey images [n, 784] to [n, 3, 32, 32] by bilinear resizing and channel copies."""
    side = round(x.shape[1] ** 0.5)
    img = x.reshape(-1, 1, side, side)
    img = F.interpolate(img, size=(32, 32), mode="bilinear", align_corners=False)
    return img.repeat(1, 3, 1, 1).contiguous()
