"""utils/atomic.py: atomic writes with size + SHA-256 records, and reads that verify them."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import tdatune.utils.atomic as atomic
from tdatune.utils.atomic import (
    DamagedFileError,
    atomic_save_npy,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    is_intact,
    keep_or_discard,
    load_npy_verified,
    read_json,
    read_record,
    record_path,
    torch_load_verified,
    truncate_damaged_epochs,
    verify_file,
)


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_record_holds_size_and_sha256_of_the_bytes_written(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "hello")
    record = json.loads(record_path(path).read_text())
    assert record_path(path).name == ".a.txt.check"
    assert record["size"] == 5 and record["sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert verify_file(path) is True
    # No temporary files are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.txt.check", "a.txt"]


def test_round_trips(tmp_path):
    obj = {"b": [1, 2.5], "a": np.float32(1.5), "c": np.arange(3)}
    atomic_write_json(tmp_path / "x.json", obj)
    assert read_json(tmp_path / "x.json") == {"a": 1.5, "b": [1, 2.5], "c": [0, 1, 2]}
    arr = np.arange(12, dtype=np.float64).reshape(3, 4)
    atomic_save_npy(tmp_path / "x.npy", arr)
    np.testing.assert_array_equal(load_npy_verified(tmp_path / "x.npy"), arr)
    blob = {"state": {"w": torch.randn(3, 2)}, "epoch": 4}
    atomic_torch_save(tmp_path / "x.pt", blob)
    back = torch_load_verified(tmp_path / "x.pt")
    assert back["epoch"] == 4 and torch.equal(back["state"]["w"], blob["state"]["w"])


def _write(kind: str, path):
    if kind == "json":
        atomic_write_json(path, {"values": list(range(50))})
        return read_json
    if kind == "npy":
        atomic_save_npy(path, np.arange(100.0))
        return load_npy_verified
    atomic_torch_save(path, {"w": torch.arange(100.0)})
    return torch_load_verified


@pytest.mark.parametrize("kind", ["json", "npy", "pt"])
@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_file_is_named_with_the_fix(tmp_path, kind, damage):
    path = tmp_path / f"artefact.{kind}"
    read = _write(kind, path)
    {"truncate": _truncate, "flip": _flip_last_byte,
     "empty": lambda p: p.write_bytes(b"")}[damage](path)
    with pytest.raises(DamagedFileError) as info:
        read(path, "delete it and rerun X")
    message = str(info.value)
    assert str(path) in message and "delete it and rerun X" in message
    assert ("SHA-256" in message) if damage == "flip" else ("truncated" in message)
    assert info.value.path == path and not is_intact(path)


@pytest.mark.parametrize("kind", ["json", "npy", "pt"])
def test_file_without_record_is_accepted_when_it_parses_and_refused_when_not(tmp_path, kind):
    path = tmp_path / f"legacy.{kind}"
    read = _write(kind, path)
    record_path(path).unlink()  # as written by an older tdatune
    assert read_record(path) is None and verify_file(path) is False
    read(path)  # unverified but accepted
    assert is_intact(path)
    _truncate(path)
    with pytest.raises(DamagedFileError, match=str(path.name)):
        read(path)
    assert not is_intact(path)


def test_json_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "cell.json"
    path.write_text('{\n  "lds": 0.5,\n  "lam": \n')
    with pytest.raises(DamagedFileError, match=r"cell\.json.*not valid JSON.*line 4"):
        read_json(path)


def test_a_crash_between_content_and_record_leaves_no_stale_record(tmp_path, monkeypatch):
    path = tmp_path / "history.json"
    atomic_write_json(path, {"epoch": 1})
    real = atomic._replace_atomically

    def dies_on_the_record(target, write):
        if target.name.endswith(".check"):
            raise KeyboardInterrupt("killed between the rename and the record")
        return real(target, write)

    monkeypatch.setattr(atomic, "_replace_atomically", dies_on_the_record)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {"epoch": 2, "more": "bytes"})
    monkeypatch.undo()
    # The new content without a record: accepted after parsing, not reported as damaged.
    assert read_record(path) is None and read_json(path) == {"epoch": 2, "more": "bytes"}


def test_a_failed_write_keeps_the_old_file_and_its_record(tmp_path):
    path = tmp_path / "m.npy"
    atomic_save_npy(path, np.ones(3))

    class Unsaveable:
        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save_npy(path, Unsaveable())
    np.testing.assert_array_equal(load_npy_verified(path), np.ones(3))
    assert verify_file(path) and not list(tmp_path.glob("*.tmp"))


def test_keep_or_discard_deletes_a_damaged_file_and_says_so(tmp_path, capsys):
    good, bad = tmp_path / "m0000_s0.npy", tmp_path / "m0001_s0.npy"
    atomic_save_npy(good, np.ones(4))
    atomic_save_npy(bad, np.ones(4))
    _truncate(bad)
    assert keep_or_discard(good, "model 0") is True
    assert keep_or_discard(bad, "model 1 by retraining it") is False
    assert not bad.exists() and not record_path(bad).exists()
    err = capsys.readouterr().err
    assert str(bad) in err and "recomputing model 1 by retraining it" in err
    assert keep_or_discard(tmp_path / "missing.npy") is False


def test_truncate_damaged_epochs_drops_the_damaged_epoch_and_later_ones(tmp_path, capsys):
    files = []
    for epoch in range(4):
        files.append(atomic_torch_save(tmp_path / f"epoch_{epoch:03d}.pt", {"epoch": epoch}))
    _truncate(files[2])
    kept, blobs = truncate_damaged_epochs(files)
    assert kept == files[:2] and [b["epoch"] for b in blobs] == [0, 1]
    assert [f.exists() for f in files] == [True, True, False, False]
    assert "epoch_002.pt" in capsys.readouterr().err
    assert truncate_damaged_epochs(files[:2])[0] == files[:2]
