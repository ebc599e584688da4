"""Stable content fingerprints of arrays and configurations, used to refuse stale stored results."""

from __future__ import annotations

import ast
import enum
import functools
import hashlib
import inspect
import json
import math
import re
import textwrap
import types
from typing import Any

import numpy as np
import torch
from torch import nn


def _shape_dtype_bytes(t: torch.Tensor | np.ndarray) -> tuple[tuple[int, ...], str, bytes]:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().resolve_conj().resolve_neg().contiguous()
        try:
            arr = t.numpy()
        except TypeError:  # a dtype numpy lacks (bfloat16, float8): its raw bytes, torch's name
            return tuple(t.shape), str(t.dtype), t.reshape(-1).view(torch.uint8).numpy().tobytes()
    else:
        arr = np.asarray(t)
    arr = np.ascontiguousarray(arr)
    return arr.shape, str(arr.dtype), arr.tobytes()


def fingerprint_tensors(*tensors: torch.Tensor | np.ndarray) -> str:
    """SHA-256 (hex, 16 chars) of the shapes, dtypes and bytes of the given arrays, in order:
    the same bytes reshaped, or read as another dtype, give another fingerprint."""
    digest = hashlib.sha256()
    for t in tensors:
        shape, dtype, data = _shape_dtype_bytes(t)
        digest.update(f"{shape}|{dtype}|".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


def fingerprint_config(config: Any) -> str:
    """SHA-256 (hex, 16 chars) of a JSON-serialisable configuration, key order ignored."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # what a repr says that changes every run

# Packages whose objects are identified by name, not by source: their behaviour is pinned by the
# installed version (recorded with every result's numeric environment), and reading their
# source would make every stored result stale on an upgrade that changed a comment.
_LIBRARIES = ("torch", "numpy", "scipy", "transformers", "builtins", "functools", "math",
              "operator", "collections", "typing", "abc", "enum")
# nn.Module attributes that are bookkeeping, not options (state and children are described
# from named_parameters / named_buffers / named_children).
_MODULE_BOOKKEEPING = ("training", "dump_patches", "call_super_init")


def qualified_name(obj: Any) -> str:
    """``module:qualname`` of a function or class (of its type for anything else)."""
    target = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(target, '__module__', '?')}:{target.__qualname__}"


def _from_library(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module.split(".")[0] in _LIBRARIES


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module)
                and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _code_bytes(code: types.CodeType) -> list[Any]:
    """A code object's instructions, names and constants (nested code objects included): what
    identifies a function whose source cannot be read."""
    consts = [_code_bytes(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return [code.co_code.hex(), list(code.co_names), list(code.co_varnames), consts]


def source_fingerprint(obj: Any) -> str | None:
    """Fingerprint of a function's or class's source as parsed code (comments, formatting and
    docstrings do not count); its bytecode when the source cannot be read; ``None`` for objects
    of the libraries tdatune identifies by name and version (torch, numpy, transformers, ...)."""
    if _from_library(obj):
        return None
    try:
        text = textwrap.dedent(inspect.getsource(obj))
        tree = ast.parse(text)
        return fingerprint_config(ast.dump(_strip_docstrings(tree)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        code = getattr(obj, "__code__", None)
        return fingerprint_config(_code_bytes(code)) if code is not None else None


def _module_content(module: nn.Module, seen: set[int]) -> dict[str, Any]:
    options = {k: v for k, v in vars(module).items()
               if not k.startswith("_") and k not in _MODULE_BOOKKEEPING}
    state = dict(module.named_parameters(recurse=False))
    state.update(module.named_buffers(recurse=False))
    return {"module": qualified_name(type(module)), "source": source_fingerprint(type(module)),
            "options": describe_content(options, seen),
            "state": {k: describe_content(v, seen) for k, v in state.items()},
            "children": {k: describe_content(c, seen) for k, c in module.named_children()}}


def _function_content(fn: types.FunctionType, seen: set[int]) -> dict[str, Any]:
    closure = [describe_content(cell.cell_contents, seen) if _cell_filled(cell) else "<empty>"
               for cell in (fn.__closure__ or ())]
    return {"function": qualified_name(fn), "source": source_fingerprint(fn),
            "defaults": describe_content(list(fn.__defaults__ or ()), seen),
            "kwdefaults": describe_content(dict(fn.__kwdefaults__ or {}), seen),
            "closure": closure, "globals": _plain_globals(fn)}


def _plain_globals(fn: types.FunctionType) -> dict[str, Any]:
    """The module-level constants a function reads (numbers, strings and tuples of them): a
    changed ``SCALE = 2.0`` changes what the function computes without touching its source."""
    values = {name: fn.__globals__.get(name) for name in fn.__code__.co_names}
    return {name: describe_content(v) for name, v in values.items()
            if v is not None and is_plain(v)}


def is_plain(value: Any) -> bool:
    """True for None, bools, numbers, strings and tuples / lists of them."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    return isinstance(value, tuple | list) and all(is_plain(v) for v in value)


def _cell_filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (raises ValueError on an empty cell)
    except ValueError:
        return False
    return True


def describe_content(value: Any, seen: set[int] | None = None) -> Any:
    """A JSON-ready description of everything a value's behaviour depends on, so that two values
    get the same description exactly when they hold the same content:

    * plain values as they are; lists, tuples and dicts element by element (dict key order
      ignored); sets sorted;
    * tensors and arrays by shape, dtype and bytes (:func:`fingerprint_tensors`);
    * a torch module by class (and its source when not a library's), every public attribute
      (its options: ``label_smoothing``, ``reduction``, ...), its own parameters and buffers, and
      each child described the same way;
    * a function by qualified name, source (parsed; see :func:`source_fingerprint`), defaults
      and closure contents; a ``functools.partial`` by function, arguments and keywords; a bound
      method by function and object; a class by name and source;
    * any other object by class and its ``__dict__`` (dataclass fields included), or by
      ``repr`` when it has none (memory addresses are dropped).
    """
    seen = set() if seen is None else seen
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, torch.Tensor | np.ndarray):
        return {"tensor": list(value.shape), "dtype": str(value.dtype),
                "content": fingerprint_tensors(value)}
    if isinstance(value, np.generic):
        return describe_content(value.item(), seen)
    if isinstance(value, enum.Enum):
        return f"{qualified_name(type(value))}.{value.name}"
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    if id(value) in seen:
        return "<cycle>"
    seen = seen | {id(value)}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):  # JSON objects (key order is not kept)
            return {k: describe_content(v, seen) for k, v in sorted(value.items())}
        return {"<dict>": sorted([[describe_content(k, seen), describe_content(v, seen)]
                                  for k, v in value.items()], key=_sort_key)}
    if isinstance(value, list | tuple):
        return [describe_content(v, seen) for v in value]
    if isinstance(value, set | frozenset):
        return {"set": sorted((describe_content(v, seen) for v in value), key=_sort_key)}
    if isinstance(value, nn.Module):
        return _module_content(value, seen)
    if isinstance(value, functools.partial):
        return {"partial": describe_content(value.func, seen),
                "args": describe_content(list(value.args), seen),
                "keywords": describe_content(dict(value.keywords), seen)}
    if isinstance(value, types.MethodType):
        return {"method": describe_content(value.__func__, seen),
                "self": describe_content(value.__self__, seen)}
    if isinstance(value, types.FunctionType):
        return _function_content(value, seen)
    if isinstance(value, type):
        return {"class": qualified_name(value), "source": source_fingerprint(value)}
    if isinstance(value, types.BuiltinFunctionType | types.ModuleType):
        return {"builtin": qualified_name(value) if not isinstance(value, types.ModuleType)
                else value.__name__}
    attributes = getattr(value, "__dict__", None)
    if not isinstance(attributes, dict):  # a __slots__ class: its filled slots, if any
        slots = getattr(type(value), "__slots__", ())
        attributes = {s: getattr(value, s) for s in slots if hasattr(value, s)} or None
    if attributes is not None:
        return {"object": qualified_name(type(value)), "source": source_fingerprint(type(value)),
                "attributes": describe_content(attributes, seen)}
    return {"object": qualified_name(type(value)), "repr": ADDRESS.sub("", repr(value))}


def _sort_key(item: Any) -> str:
    return json.dumps(item, sort_keys=True, default=str)


def content_fingerprint(value: Any) -> str:
    """SHA-256 (hex, 16 chars) of :func:`describe_content`: a cache key that changes exactly
    when the value's content does."""
    return fingerprint_config(describe_content(value))


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the entries that differ between two JSON-like values (``task.loss_fn``),
    so a refusal names the field that changed rather than a whole section."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(path)
            else:
                out.extend(differences(old[key], new[key], path))
        return out
    same = json.dumps(old, sort_keys=True, default=str) == json.dumps(new, sort_keys=True, default=str)
    return [] if same else [prefix or "(value)"]
