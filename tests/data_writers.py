"""Writers of small files in the canonical formats (IDX, CIFAR pickles, MIDI) for loader tests."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """Write a uint8 array as an IDX file: magic 0 0 0x08 ndim, big-endian dims, raw bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    blob = header + array.tobytes()
    if compress:
        with gzip.open(path, "wb", compresslevel=1) as handle:
            handle.write(blob)
    else:
        path.write_bytes(blob)


def write_mnist_dir(directory: Path, n_train: int, n_test: int, seed: int = 0,
                    per_class: int | None = None) -> dict[str, np.ndarray]:
    """Four MNIST-style IDX files of random 28x28 images; returns what was written.

    ``per_class`` makes the training labels hold at least that many of each digit.
    """
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        if split == "train" and per_class is not None:
            labels[: 10 * per_class] = np.repeat(np.arange(10), per_class)
            rng.shuffle(labels)
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels)
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    return out


def write_cifar_dir(directory: Path, per_batch: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """CIFAR-10 python pickles (data_batch_1..5, test_batch) of random images."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, np.ndarray] = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(directory / name, "wb") as handle:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, handle)
        out[name + "_data"], out[name + "_labels"] = data, np.array(labels)
    return out


def varlen(value: int) -> bytes:
    """MIDI variable-length quantity."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(reversed(out))


def midi_track(events: list[bytes]) -> bytes:
    """An MTrk chunk of already-encoded (delta + event) byte strings, end-of-track appended."""
    body = b"".join(events) + b"\x00\xff\x2f\x00"
    return b"MTrk" + struct.pack(">I", len(body)) + body


def midi_file(tracks: list[bytes], division: int = 480, fmt: int = 1) -> bytes:
    """A Standard MIDI File from MTrk chunks."""
    return b"MThd" + struct.pack(">IHHH", 6, fmt, len(tracks), division) + b"".join(tracks)
