"""Connecting to Ray for the work that outgrows one process (retraining, featurization)."""

from __future__ import annotations

import os
import sys
from typing import Any


def require_ray(what: str = "this") -> Any:
    """The ``ray`` module, or an ImportError saying how to install it."""
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - exercised only without ray
        raise ImportError(f"{what} needs Ray: pip install 'tdatune[ray]' "
                          "(or pip install 'ray>=2.9')") from exc
    return ray


def driver_pythonpath() -> str:
    """This process's import path outside the interpreter's own directories (the source
    tree, a test or script directory), as a PYTHONPATH for local Ray workers."""
    own = tuple(os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
    keep = [p for p in (os.path.realpath(q) for q in sys.path if q)
            if os.path.isdir(p) and not p.startswith(own)]
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(keep + extra))


class RayConnection:
    """Connects to Ray unless already connected: the cluster at ``address``, or with
    ``address=None`` a new local instance (``num_cpus`` CPUs, default all; its workers get
    this process's import path, so they import tdatune and your task's module). On exit it
    shuts down only an instance it connected itself."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None,
                 init_options: dict[str, Any] | None = None, *, what: str = "this") -> None:
        self.ray = require_ray(what)
        self.address, self.started = address, False
        self.options = dict(init_options or {})
        if num_cpus is not None and address is None:
            self.options.setdefault("num_cpus", int(num_cpus))

    def __enter__(self) -> Any:
        if not self.ray.is_initialized():
            self.options.setdefault("include_dashboard", False)
            self.options.setdefault("log_to_driver", False)
            if self.address is None:  # local workers: same machine, same paths
                env = dict(self.options.get("runtime_env") or {})
                env_vars = dict(env.get("env_vars") or {})
                env_vars.setdefault("PYTHONPATH", driver_pythonpath())
                self.options["runtime_env"] = {**env, "env_vars": env_vars}
            self.ray.init(address=self.address, **self.options)
            self.started = True
        return self.ray

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.ray.shutdown()


__all__ = ["RayConnection", "driver_pythonpath", "require_ray"]
