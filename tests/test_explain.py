"""`tdatune explain`: the top proponents and opponents on a page a person checks, in a real
headless browser; rankings checked against a dense influence computation and hand-made
scores."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from attr_problems import Problem, loop_grads
from browser import browser_or_skip, dump_dom, screenshot
from tdatune.cli import main
from tdatune.data.base import ArrayDataset
from tdatune.data.music import NOTE_OFF, NOTE_ON, TIME_SHIFT, VELOCITY, piano_roll
from tdatune.data.views import view_example
from tdatune.study.explain import explain_scores, top_influences
from tdatune.study.prepare import train_setting
from tdatune.utils.atomic import read_json

CARD = re.compile(r'<div class="card (explained|proponent|opponent)"><div class="title">'
                  r"(?:train #(\d+)|([^<]*))</div>")


def page_cards(page: str) -> list[list[tuple[str, int | None]]]:
    """Per explained section, the (role, train index) of its cards in page order."""
    sections = page.split('<section class="example"')[1:]
    return [[(role, int(j) if j else None) for role, j, _ in CARD.findall(s)] for s in sections]


def test_top_influences_hand_worked():
    scores = torch.tensor([[3.0, -1.0, 2.0, 0.0, -5.0], [0.0, 1.0, -2.0, 4.0, 0.5]])
    pro, opp = top_influences(scores, 2)
    assert pro.tolist() == [[0, 2], [3, 1]]
    assert opp.tolist() == [[4, 1], [2, 0]]
    pro, opp = top_influences(scores, 9)  # more than there are: all of them, in order
    assert pro[0].tolist() == [0, 2, 3, 1, 4] and opp[0].tolist() == [4, 1, 3, 2, 0]
    with pytest.raises(ValueError, match="NaN"):
        top_influences(torch.tensor([[1.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match=">= 1"):
        top_influences(scores, 0)


def test_page_lists_the_hand_ranked_examples(tmp_path, digits_small):
    train, explained = digits_small.train, digits_small.test.subset([0, 1])
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, len(train), generator=gen)
    page = explain_scores(scores, train, explained, tmp_path, k=3, splits=digits_small)
    html = page.read_text()
    for row, cards in enumerate(page_cards(html)):
        order = np.argsort(-scores[row].numpy())
        assert cards[0] == ("explained", None)
        assert [j for r, j in cards if r == "proponent"] == order[:3].tolist()
        assert [j for r, j in cards if r == "opponent"] == order[::-1][:3].tolist()
    # each card shows its own score, and its own class as the label
    for row, section in enumerate(html.split('<section class="example"')[1:]):
        j = int(np.argsort(-scores[row].numpy())[0])
        card = section.split(f"train #{j}</div>")[1].split("</div></div>")[0]
        assert f"score {float(scores[row, j]):+.4g}" in card
        assert f"class {int(train.targets[j])}" in card
    assert (tmp_path / "explained_0.png").stat().st_size > 1000
    with pytest.raises(ValueError, match=r"shape \[2, 120\]"):
        explain_scores(scores[:, :5], train, explained, tmp_path)


def test_views_of_each_kind(digits_small):
    v = view_example(digits_small.train, 0, digits_small)
    assert v.kind == "image" and v.image.shape == (8, 8)
    assert v.label == f"class {int(digits_small.train.targets[0])}"
    x = digits_small.train.inputs[0].reshape(8, 8).double()
    assert np.allclose(v.image, ((x - x.min()) / (x.max() - x.min())).numpy())
    # a next-token block: inputs then the last target, through the given decoder
    tokens = torch.tensor([[104, 105, 33]])
    blocks = ArrayDataset(tokens, torch.tensor([[105, 33, 10]]))
    v = view_example(blocks, 0, decode=lambda ids: bytes(ids).decode())
    assert (v.kind, v.text) == ("text", "hi!\n")
    # a hand-worked piano roll: C4 held 3 steps, then D4 still sounding at the end
    roll = piano_roll([VELOCITY + 3, NOTE_ON + 60, TIME_SHIFT + 2, NOTE_OFF + 60,
                       NOTE_ON + 62, TIME_SHIFT + 1, NOTE_OFF + 64])
    assert roll.shape == (128, 5)
    assert roll[60].tolist() == [1, 1, 1, 0, 0] and roll[62].tolist() == [0, 0, 0, 1, 1]
    assert roll[64].tolist() == [1, 1, 1, 1, 1]  # its NOTE_ON lies before the block
    assert roll.sum() == 3 + 2 + 5
    with pytest.raises(ValueError, match="out of range"):
        view_example(blocks, 1)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain") / "demo"
    assert main(["demo", "--out", str(out), "--subsets", "4", "--grid-points", "5",
                 "--quiet"]) == 0
    return out


def test_explain_demo_run_ranks_by_dense_influence_in_a_browser(demo_run, tmp_path):
    out = tmp_path / "page"
    assert main(["explain", str(demo_run), "--out", str(out), "--examples", "0", "5", "7",
                 "--top", "5", "--quiet"]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["explained_0.png", "explained_1.png", "explained_2.png"]
    html = (out / "index.html").read_text()

    # independent: dense empirical-Fisher influence at the selected lambda, by autograd loops
    summary = read_json(demo_run / "iffim" / "summary.json")
    t = train_setting("digits-lr", demo_run, seed=0, show_progress=False, say=lambda *a: None,
                      sizes=(summary["n_train"], summary["n_val"], summary["n_test"]))
    prob = Problem(t.task, t.splits.train, t.splits.test.subset([0, 5, 7]), t.context, 0.0)
    g = loop_grads(prob, prob.train, "loss")
    v = loop_grads(prob, prob.explained, "output")
    fisher = g.T @ g / g.shape[0]
    lam = summary["lambda_selected"]
    dense = -v @ torch.linalg.solve(fisher + lam * torch.eye(g.shape[1], dtype=g.dtype), g.T)
    for row, cards in enumerate(page_cards(html)):
        order = torch.argsort(dense[row], descending=True)
        assert [j for r, j in cards if r == "proponent"] == order[:5].tolist()
        assert [j for r, j in cards if r == "opponent"] == order.flip(0)[:5].tolist()

    browser = browser_or_skip()
    dom = dump_dom(browser, out / "index.html")
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'data-([a-z-]+)="(\d+)"', body))
    assert attrs == {"images": "33", "images-ok": "33", "examples": "3"}, body
    shot = screenshot(browser, out / "index.html", tmp_path / "shot.png")
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.02  # not a blank page


def test_explain_errors_name_the_fix(tmp_path, demo_run, capsys):
    assert main(["explain", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "tdatune demo --out" in capsys.readouterr().err
    assert main(["explain", str(demo_run), "--out", str(tmp_path / "o"), "--examples", "9999",
                 "--quiet"]) == 2
    assert "test indices 0.." in capsys.readouterr().err
