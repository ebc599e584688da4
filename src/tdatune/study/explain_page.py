"""The explain page: one self-contained HTML file (every picture inline as a PNG data URI)
and one PNG figure per explained example, each showing the explained example beside its
top proponents and opponents with their scores and labels.

The page marks itself loaded: a script counts the pictures the browser decoded and writes
``data-images``/``data-images-ok`` on ``<body>``, so a headless browser can check it."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tdatune.data.views import ExampleView
from tdatune.utils.atomic import atomic_write_bytes

TEXT_CHARS = 600  # longest text shown in a card (the rest is cut with an ellipsis)


@dataclass(frozen=True)
class Card:
    """One example on the page: its view, where it comes from and its score (None for the
    explained example itself)."""

    view: ExampleView
    title: str
    score: float | None = None


@dataclass(frozen=True)
class Explanation:
    """An explained example with its top proponents and opponents (strongest first)."""

    explained: Card
    proponents: list[Card]
    opponents: list[Card]


def _png(view: ExampleView, scale: int = 4) -> bytes | None:
    """The view's picture as PNG bytes (nearest-neighbour enlarged), or None for text."""
    if view.image is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = np.asarray(view.image, dtype=np.float64)
    if view.kind == "roll":
        img = img[::-1]  # high pitch at the top
    reps = max(1, scale if max(img.shape[:2]) < 64 else 1)
    img = np.repeat(np.repeat(img, reps, axis=0), reps, axis=1)
    buf = io.BytesIO()
    plt.imsave(buf, img, cmap="gray_r" if view.kind == "roll" else "gray", vmin=0, vmax=1,
               format="png")
    return buf.getvalue()


def _card_html(card: Card, role: str) -> str:
    png = _png(card.view)
    body = (f'<img class="{card.view.kind}" alt="{html.escape(card.title)}" '
            f'src="data:image/png;base64,'
            f'{base64.b64encode(png).decode()}">' if png is not None else "")
    text = card.view.text if len(card.view.text) <= TEXT_CHARS else (
        card.view.text[:TEXT_CHARS] + " ...")
    if card.view.kind in ("text", "values") or png is None:
        body += f"<pre>{html.escape(text)}</pre>"
    score = "" if card.score is None else f'<div class="score">score {card.score:+.4g}</div>'
    label = (f'<div class="label">{html.escape(card.view.label)}</div>'
             if card.view.label else "")
    return (f'<div class="card {role}"><div class="title">{html.escape(card.title)}</div>'
            f"{body}{label}{score}</div>")


PAGE_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
.meta { color: #555; font-size: 0.9em; }
.example { border-top: 1px solid #ccc; padding-top: 0.6em; }
.row { display: flex; flex-wrap: wrap; gap: 0.6em; align-items: flex-start; }
.row-title { font-weight: bold; margin: 0.5em 0 0.2em; }
.card { border: 1px solid #ddd; border-radius: 4px; padding: 0.3em; max-width: 22em;
        font-size: 0.8em; background: #fafafa; }
.card.explained { border-color: #333; background: #fff; }
.card.proponent { border-left: 4px solid #2a7; }
.card.opponent { border-left: 4px solid #c33; }
.card img { display: block; image-rendering: pixelated; }
.card img.image { width: 7em; } .card img.roll { width: 20em; height: 6em; }
.card pre { white-space: pre-wrap; margin: 0.2em 0; max-height: 12em; overflow: auto; }
.score { font-family: monospace; }
"""

LOADED_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-images-ok', String(ok));
  document.body.setAttribute('data-examples',
                             String(document.querySelectorAll('.example').length));
});
"""


def render_page(explanations: list[Explanation], title: str, meta: list[str]) -> str:
    """The whole page as one HTML string (pictures inline)."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{PAGE_STYLE}</style><script>{LOADED_SCRIPT}</script></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    parts += [f'<p class="meta">{html.escape(m)}</p>' for m in meta]
    for k, ex in enumerate(explanations):
        parts.append(f'<section class="example" id="example-{k}">'
                     f"<h2>{html.escape(ex.explained.title)}</h2>"
                     f'<div class="row">{_card_html(ex.explained, "explained")}</div>')
        for role, cards, what in (("proponent", ex.proponents, "raise"),
                                  ("opponent", ex.opponents, "lower")):
            parts.append(f'<div class="row-title">{len(cards)} {role}s (training examples '
                         f"whose inclusion {what}s the explained output)</div>"
                         f'<div class="row">' + "".join(_card_html(c, role) for c in cards)
                         + "</div>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "".join(parts)


def _draw(ax: object, card: Card, color: str) -> None:
    """One card on a matplotlib axis: the picture (or the text, wrapped) and its caption."""
    import textwrap

    ax.set_xticks([])  # type: ignore[attr-defined]
    ax.set_yticks([])  # type: ignore[attr-defined]
    for side in ax.spines.values():  # type: ignore[attr-defined]
        side.set_color(color)
        side.set_linewidth(2)
    view = card.view
    if view.image is not None:
        img = np.asarray(view.image)
        if view.kind == "roll":
            ax.imshow(img, cmap="gray_r", aspect="auto", origin="lower", vmin=0, vmax=1)  # type: ignore[attr-defined]
        else:
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)  # type: ignore[attr-defined]
    else:
        text = "\n".join(textwrap.wrap(view.text[:240], 22)[:12])
        ax.text(0.03, 0.97, text, va="top", ha="left", fontsize=6, family="monospace",  # type: ignore[attr-defined]
                transform=ax.transAxes)  # type: ignore[attr-defined]
    caption = card.title if card.score is None else f"{card.title}\n{card.score:+.3g}"
    if view.label:
        caption += f"\n{view.label}"
    ax.set_title(caption, fontsize=7)  # type: ignore[attr-defined]


def render_figure(ex: Explanation, path: Path) -> None:
    """A PNG of one explanation: the explained example, then a row of proponents and a row
    of opponents."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(ex.proponents), len(ex.opponents), 1) + 1
    fig, axes = plt.subplots(2, cols, figsize=(1.6 * cols, 4.2), squeeze=False)
    for row, (cards, color, name) in enumerate(((ex.proponents, "#22aa77", "proponents"),
                                                (ex.opponents, "#cc3333", "opponents"))):
        if row == 0:
            _draw(axes[0][0], ex.explained, "#333333")
        else:
            axes[1][0].axis("off")
        for j in range(1, cols):
            if j - 1 < len(cards):
                _draw(axes[row][j], cards[j - 1], color)
            else:
                axes[row][j].axis("off")
        axes[row][1].set_ylabel(name, fontsize=8) if cards else None
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue(), record=False)  # a page's file, not a result


def write_page(explanations: list[Explanation], out: Path, title: str, meta: list[str]
               ) -> Path:
    """Write ``out/index.html`` and ``out/explained_<k>.png``; return the page's path."""
    out.mkdir(parents=True, exist_ok=True)
    for k, ex in enumerate(explanations):
        render_figure(ex, out / f"explained_{k}.png")
    page = out / "index.html"
    atomic_write_bytes(page, render_page(explanations, title, meta).encode("utf-8"),
                       record=False)
    return page
