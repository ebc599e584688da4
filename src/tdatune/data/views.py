"""How a person looks at one example of a setting: an image for image data, decoded text for
token blocks (the text setting's BPE or a user's tokenizer), a piano roll for music events,
and the numbers themselves for anything else. The study layer's ``explain`` page is made of
these views."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tdatune.data.base import ArrayDataset, Splits

Decoder = Callable[[list[int]], str]
IMAGE_SIDES = {64: 8, 784: 28}  # flat grey images: digits 8x8, MNIST 28x28


@dataclass(frozen=True)
class ExampleView:
    """One example as shown: ``kind`` is ``image`` (``image`` [H, W] or [H, W, 3] in [0, 1]),
    ``roll`` (a piano roll [pitches, steps] in ``image``, low pitch first), ``text`` or
    ``values``; ``text`` is the decoded text or a summary; ``label`` the target in words."""

    kind: str
    text: str
    label: str
    image: np.ndarray | None = None


def _label(splits: Splits | None, y: Any) -> str:
    """An example's target in words: a class (``class 3``, or the class's name when known),
    or a regression target (``target 0.25``); empty for anything else (a token block)."""
    if not torch.is_tensor(y) or y.numel() != 1 or y.is_complex():
        return ""
    if y.is_floating_point():
        return f"target {float(y):.4g}"
    k = int(y)
    names = (splits.info.get("class_names") if splits is not None else None)
    if isinstance(names, list | tuple) and 0 <= k < len(names):
        return f"{names[k]} ({k})"
    return f"class {k}"


def _labels_of(x: Any, y: Any) -> Any:
    """What an example's label is read from: its targets, or the ``labels`` (``label``) entry
    of a dict of them or of a whole dict batch (Hugging Face style ``{"input_ids",
    "attention_mask", "labels"}``)."""
    source = x if y is None else y
    if isinstance(source, dict):
        return source.get("labels", source.get("label"))
    return y


def _as_image(x: torch.Tensor) -> np.ndarray | None:
    """An image for a float input shaped like one, scaled to [0, 1] per image; else None."""
    if not x.is_floating_point():
        return None
    if x.dim() == 1 and x.numel() in IMAGE_SIDES:
        side = IMAGE_SIDES[x.numel()]
        img = x.reshape(side, side)
    elif x.dim() == 1 and math.isqrt(x.numel()) ** 2 == x.numel() and x.numel() >= 64:
        side = math.isqrt(x.numel())
        img = x.reshape(side, side)
    elif x.dim() == 3 and x.shape[0] in (1, 3):
        img = x.permute(1, 2, 0) if x.shape[0] == 3 else x[0]
    elif x.dim() == 2 and min(x.shape) >= 8:
        img = x
    else:
        return None
    img = img.detach().double()
    lo, hi = float(img.min()), float(img.max())
    return ((img - lo) / (hi - lo if hi > lo else 1.0)).numpy()


def _tokens(x: Any) -> torch.Tensor | None:
    """The token ids of a sequence example (a long tensor, or a dict's ``input_ids``)."""
    if isinstance(x, dict):
        x = x.get("input_ids")
        if torch.is_tensor(x) and x.dim() == 1:
            return x
        return None
    if torch.is_tensor(x) and not x.is_floating_point() and x.dim() == 1:
        return x
    return None


def default_decoder(splits: Splits | None) -> Decoder | None:
    """The decoder a setting's data carries: the text setting's byte-level BPE."""
    blob = splits.info.get("tokenizer") if splits is not None else None
    if isinstance(blob, dict):
        from tdatune.data.text import ByteBPE

        return ByteBPE.from_dict(blob).decode
    return None


def view_example(data: ArrayDataset, i: int, splits: Splits | None = None, *,
                 decode: Decoder | None = None) -> ExampleView:
    """Example ``i`` of ``data`` as a person would look at it (see the module docstring).
    ``decode`` turns token ids into text (default: the setting's tokenizer, if it has one)."""
    if not 0 <= i < len(data):
        raise ValueError(f"example {i} is out of range for {len(data)} examples")
    item = data[i]
    x, y = (item, None) if data.whole_batch else item
    label = _label(splits, _labels_of(x, y))
    tokens = _tokens(x)
    decode = decode or default_decoder(splits)
    if tokens is not None:
        ids = [int(t) for t in tokens]
        if torch.is_tensor(y) and y.dim() == 1 and y.shape == tokens.shape:
            ids = [*ids, int(y[-1])]  # a next-token block: its last target closes the text
        if splits is not None and splits.name == "music":
            from tdatune.data.music import describe_token, piano_roll

            roll = piano_roll(ids)
            used = roll.sum(1).nonzero().flatten()
            if used.numel():
                roll = roll[int(used.min()) : int(used.max()) + 1]
            words = " ".join(describe_token(t) for t in ids[:12])
            return ExampleView("roll", f"{len(ids)} events: {words} ...", label,
                               roll.numpy())
        if decode is not None:
            return ExampleView("text", decode(ids), label)
        return ExampleView("text", " ".join(str(t) for t in ids), label)
    if torch.is_tensor(x):
        img = _as_image(x)
        if img is not None:
            return ExampleView("image", f"{tuple(x.shape)} input", label, img)
        flat = x.detach().flatten().double()
        shown = ", ".join(f"{float(v):.3g}" for v in flat[:8])
        more = f", ... ({flat.numel()} values)" if flat.numel() > 8 else ""
        return ExampleView("values", f"[{shown}{more}]", label)
    return ExampleView("values", type(x).__name__, label)
