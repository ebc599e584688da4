"""A fault for resumption tests: a module's function that counts its calls and raises
KeyboardInterrupt (a kill between chunks) at the k-th."""

from __future__ import annotations

from typing import Any


class Interrupted:
    """Replaces ``module.name``: ``calls`` records the size of the data (fourth argument)
    of every call; the ``kill_at``-th call raises KeyboardInterrupt (None: never)."""

    def __init__(self, monkeypatch: Any, module: Any, name: str, kill_at: int | None) -> None:
        self.real = getattr(module, name)
        self.calls: list[int] = []
        self.kill_at = kill_at
        monkeypatch.setattr(module, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(len(args[3]))
        if len(self.calls) == self.kill_at:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)

    def count_only(self) -> list[int]:
        """From now on: count, never interrupt (the calls so far are forgotten)."""
        self.calls.clear()
        self.kill_at = None
        return self.calls
