"""Atomic, recorded writes and verified reads of every stored artefact.

Writes: every writer writes to a temporary file in the destination directory, flushes and
fsyncs it, then renames it over the destination with ``os.replace`` (atomic on POSIX), so a
crash or interrupt never leaves a half-written file that is later read as whole.

Records: next to each file ``NAME`` a writer leaves a small hidden sidecar ``.NAME.check``
(JSON: size in bytes and SHA-256 of the content). The old record is removed before the new
content replaces the file and the new record is written after, so at any moment a file has
either its own record or none; never a stale one.

Reads: :func:`read_json`, :func:`load_npy_verified` and :func:`torch_load_verified` check the
content against the record and raise :class:`DamagedFileError` naming the file, what is wrong
and the fix. A file without a record (written by an older tdatune, or a crash between the
rename and the record) is accepted when it parses ("unverified but accepted"); one that does
not parse is reported as damaged the same way. Callers whose file can be recomputed (a
retrained model's outputs, a checkpoint epoch, a feature chunk) use :func:`is_intact` or
catch the error, delete the file with :func:`remove_with_record` and recompute it, saying so
with :func:`notice`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

RECORD_SUFFIX = ".check"
RECORD_FORMAT = 1
DEFAULT_FIX = "delete it and rerun the command that wrote it"


class DamagedFileError(ValueError):
    """A stored file is truncated, corrupted or does not parse; names the file and the fix."""

    def __init__(self, path: str | os.PathLike[str], reason: str, fix: str | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        self.fix = fix or DEFAULT_FIX
        super().__init__(f"stored file {self.path} is damaged ({reason}); {self.fix}")


# ---------------------------------------------------------------- records

def record_path(path: str | os.PathLike[str]) -> Path:
    """The sidecar record of ``path``: ``.NAME.check`` in the same directory."""
    path = Path(path)
    return path.with_name(f".{path.name}{RECORD_SUFFIX}")


def _digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def read_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record of ``path`` (``{"size", "sha256"}``), or None when there is none or it is
    itself unreadable (then the file counts as unrecorded and is verified by parsing)."""
    rec = record_path(path)
    try:
        record = json.loads(rec.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or "size" not in record or "sha256" not in record:
        return None
    return record


def _check_against_record(path: Path, data: bytes, fix: str | None) -> bool:
    """Raise if ``data`` (the content of ``path``) disagrees with its record; return whether
    a record existed."""
    record = read_record(path)
    if record is None:
        return False
    if len(data) != int(record["size"]):
        raise DamagedFileError(path, f"{len(data)} bytes, its record says {record['size']}; "
                               "truncated or overwritten", fix)
    if _digest(data) != record["sha256"]:
        raise DamagedFileError(path, "content does not match its SHA-256 record", fix)
    return True


def verify_file(path: str | os.PathLike[str], fix: str | None = None) -> bool:
    """Check ``path`` against its record without parsing it; return whether it had one.

    Raises :class:`DamagedFileError` on a size or checksum mismatch and FileNotFoundError
    when the file is missing.
    """
    path = Path(path)
    record = read_record(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if record is None:
        return False
    size, digest = _file_digest(path)
    if size != int(record["size"]):
        raise DamagedFileError(path, f"{size} bytes, its record says {record['size']}; "
                               "truncated or overwritten", fix)
    if digest != record["sha256"]:
        raise DamagedFileError(path, "content does not match its SHA-256 record", fix)
    return True


def remove_with_record(path: str | os.PathLike[str]) -> None:
    """Delete ``path`` and its record (each if present)."""
    for p in (Path(path), record_path(path)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def notice(message: str) -> None:
    """Tell the user about a repair (a damaged file recomputed), on stderr."""
    print(f"tdatune: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- writes

def _replace_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, record: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically, with its size + SHA-256 record (``record``)."""
    path = Path(path)
    rec = record_path(path)
    if rec.exists():  # never leave an old record beside new content
        rec.unlink()
    _replace_atomically(path, lambda h: h.write(data))
    if record:
        text = json.dumps({"format": RECORD_FORMAT, "size": len(data), "sha256": _digest(data)})
        _replace_atomically(rec, lambda h: h.write(text.encode("utf-8")))
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically, with its record."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as pretty JSON to ``path`` atomically, with its record."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def atomic_save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Save ``array`` in .npy format to ``path`` atomically, with its record."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically, with its record."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------- verified reads

def read_bytes_verified(path: str | os.PathLike[str], fix: str | None = None) -> bytes:
    """The content of ``path``, checked against its record when it has one."""
    path = Path(path)
    data = path.read_bytes()
    _check_against_record(path, data, fix)
    return data


def read_json(path: str | os.PathLike[str], fix: str | None = None) -> Any:
    """Read a JSON file, verified against its record; a damaged or unparsable file raises
    :class:`DamagedFileError` naming it (and the line of a JSON error)."""
    path = Path(path)
    data = read_bytes_verified(path, fix)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedFileError(path, f"not valid JSON: {exc}", fix) from None


def load_npy_verified(path: str | os.PathLike[str], fix: str | None = None) -> np.ndarray:
    """Load a .npy file, verified against its record (or, without one, by parsing it)."""
    path = Path(path)
    data = read_bytes_verified(path, fix)
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise DamagedFileError(path, f"not a readable .npy array: {exc}", fix) from None
    return array


def torch_load_verified(path: str | os.PathLike[str], fix: str | None = None, *,
                        map_location: Any = "cpu", weights_only: bool = False) -> Any:
    """``torch.load`` a file, verified against its record (or, without one, by loading it)."""
    import torch

    path = Path(path)
    data = read_bytes_verified(path, fix)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DamagedFileError(path, f"not a readable torch file: {first}", fix) from None


def is_intact(path: str | os.PathLike[str], loader: Callable[[Path], Any] | None = None) -> bool:
    """Whether ``path`` exists and verifies: against its record, or (no record) by loading it
    with ``loader`` (default: by its suffix, .npy / .json / .pt)."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        if verify_file(path):
            return True
        load = loader or _LOADERS.get(path.suffix)
        if load is not None:
            load(path)
    except (DamagedFileError, OSError):
        return False
    return True


def keep_or_discard(path: str | os.PathLike[str], what: str = "it",
                    loader: Callable[[Path], Any] | None = None) -> bool:
    """For a recomputable file: True when ``path`` exists and verifies; when it exists but is
    damaged, delete it (and its record), say so with :func:`notice` naming ``what`` will be
    recomputed, and return False; False when it does not exist."""
    path = Path(path)
    if not path.exists():
        return False
    if is_intact(path, loader):
        return True
    remove_with_record(path)
    notice(f"{path} was damaged (truncated or corrupted); deleted it, recomputing {what}")
    return False


def truncate_damaged_epochs(files: list[Path]) -> tuple[list[Path], list[Any]]:
    """Load per-epoch checkpoints in order; from the first damaged one on, delete the files
    (each later epoch was trained from it, so the run resumes before it) and say so.

    Returns the intact files and their loaded contents (on the CPU)."""
    blobs: list[Any] = []
    for k, f in enumerate(files):
        try:
            blobs.append(torch_load_verified(f))
        except DamagedFileError as err:
            for later in files[k:]:
                remove_with_record(later)
            notice(f"checkpoint {f} was damaged ({err.reason}); deleted it and the "
                   f"{len(files) - k - 1} later epoch(s), retraining from epoch {k}")
            return files[:k], blobs
    return files, blobs


_LOADERS: dict[str, Callable[[Path], Any]] = {
    ".npy": load_npy_verified, ".json": read_json, ".pt": torch_load_verified,
}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


__all__ = [
    "DamagedFileError", "atomic_save_npy", "atomic_torch_save", "atomic_write_bytes",
    "atomic_write_json", "atomic_write_text", "is_intact", "keep_or_discard", "load_npy_verified",
    "notice",
    "read_bytes_verified", "read_json", "read_record", "record_path", "remove_with_record",
    "torch_load_verified", "truncate_damaged_epochs", "verify_file",
]
