"""Giving freed memory back to the operating system between the phases of a long job, and
the size of the CPU's last-level cache (which sizes chunks of batched retraining).

glibc's malloc raises its mmap threshold to the size of each freed block (up to 32 MiB), so
after the first few large temporaries every block of a few MiB comes from its heap, and the
heap keeps their pages resident after they are freed. Between the chunks of a streamed pass
(e.g. EK-FAC's explained examples on an 11M-parameter GPT) that was about 1 GiB of resident
memory holding nothing. :func:`release_freed_memory` asks glibc to return free heap pages
(``malloc_trim(0)``); elsewhere (other C libraries, other systems) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path


@functools.cache
def _trim() -> object | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the operating system (glibc's ``malloc_trim``);
    True when something could be asked, False where the call does not exist."""
    trim = _trim()
    if trim is None:
        return False
    trim(0)  # type: ignore[operator]
    return True


def last_level_cache_bytes(caches: str | Path = "/sys/devices/system/cpu/cpu0/cache"
                           ) -> int | None:
    """Size of the highest-level CPU cache listed in ``caches`` (Linux sysfs: ``index*/level``
    and ``index*/size``), or None where unknown."""
    best: tuple[int, int] | None = None
    for entry in Path(caches).glob("index*"):
        try:
            text = (entry / "size").read_text().strip().upper()
            level = int((entry / "level").read_text())
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in ("K", "M", "G") else text
        if digits.isdigit() and (best is None or level > best[0]):
            best = (level, int(digits) * scale)
    return None if best is None else best[1]


__all__ = ["last_level_cache_bytes", "release_freed_memory"]
