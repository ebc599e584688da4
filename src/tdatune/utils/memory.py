"""Giving freed memory back to the operating system between the phases of a long job.

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


__all__ = ["release_freed_memory"]
