"""Progress bars that stay quiet when asked (tests, CI logs) or when output is not a terminal."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar; disabled when ``enabled`` is False or TDATUNE_NO_PROGRESS is set."""
    disable = (not enabled) or bool(os.environ.get("TDATUNE_NO_PROGRESS"))
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=disable, **kwargs)
