"""Streaming datasets: read and collated (padded) one batch at a time, in index order; the
per-example gradients and gradient stores they give equal single-example autograd passes and
globally collated data."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    TensorDataset,
    default_collate,
)

import tdatune.features.store as store_module
from interrupts import Interrupted
from tdatune.data.base import ArrayDataset, as_dataset
from tdatune.data.streaming import StreamingDataset, stream_dataset
from tdatune.features.gradients import per_example_grads
from tdatune.features.projection import Projector
from tdatune.features.store import FeatureStore, build_gradient_store
from tdatune.models.task import make_task
from test_user_task import call_two_input as call_pool
from test_user_task import dict_loss as pool_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ------------------------------------------------------------- variable-length sequences


class Sequences(Dataset):
    """Dict examples with a different number of positions each: ``feats`` [L_i, 4]."""

    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.lengths = torch.randint(1, 8, (n,), generator=gen).tolist()
        self.feats = [torch.randn(length, 4, generator=gen) for length in self.lengths]
        self.labels = torch.randint(0, 3, (n,), generator=gen)
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        self.reads.append(int(i))
        return {"feats": self.feats[i], "labels": self.labels[i]}


def pad(items: list[dict]) -> dict:
    """Pad a batch to its own longest example, with a 0/1 mask."""
    longest = max(item["feats"].shape[0] for item in items)
    feats = torch.zeros(len(items), longest, 4)
    mask = torch.zeros(len(items), longest)
    for row, item in enumerate(items):
        length = item["feats"].shape[0]
        feats[row, :length] = item["feats"]
        mask[row, :length] = 1.0
    return {"feats": feats, "mask": mask, "labels": torch.stack([i["labels"] for i in items])}


class MaskedMeanPool(nn.Module):
    """Per-position Linear + tanh, mean over the unmasked positions, Linear head: the output
    does not depend on how much padding a batch has."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, 3]."""
        h = torch.tanh(self.embed(feats)) * mask[..., None]
        return self.head(h.sum(1) / mask.sum(1, keepdim=True))


def pool_output(outputs: torch.Tensor, batch: dict) -> torch.Tensor:
    """Logit 1 minus logit 0."""
    return outputs[:, 1] - outputs[:, 0]


def pool_setup():
    task = make_task(MaskedMeanPool, pool_loss, pool_output, forward=call_pool, name="pool")
    torch.manual_seed(0)
    model = MaskedMeanPool()
    params = {k: v.detach() for k, v in model.named_parameters()}
    return task, model, params


def by_hand(model: nn.Module, ds: Sequences, fn) -> torch.Tensor:
    """Per-example gradients by single-example autograd passes on unpadded examples."""
    rows = []
    for i in range(len(ds)):
        length = ds.lengths[i]
        feats = ds.feats[i][None]
        value = fn(model(feats, torch.ones(1, length)), {"labels": ds.labels[i][None]})[0]
        grads = torch.autograd.grad(value, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_streamed_gradients_with_per_batch_padding_equal_single_example_passes():
    ds = Sequences(13)
    task, model, params = pool_setup()
    streamed = stream_dataset(DataLoader(ds, batch_size=5, shuffle=True, collate_fn=pad))
    collated = as_dataset(DataLoader(ds, collate_fn=pad))  # every example padded to one length
    assert streamed.whole_batch and collated.whole_batch
    for target, fn in (("loss", pool_loss), ("output", pool_output)):
        expected = by_hand(model, ds, fn)
        got = per_example_grads(task, model, params, streamed, target=target, chunk_size=4)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        in_memory = per_example_grads(task, model, params, collated, target=target,
                                      chunk_size=4)
        torch.testing.assert_close(got, in_memory, rtol=1e-5, atol=1e-6)


def test_batches_are_padded_per_batch_in_index_order_whatever_the_shuffle():
    ds = Sequences(11)
    data = as_dataset(DataLoader(ds, batch_size=3, shuffle=True, collate_fn=pad), stream=True)
    assert isinstance(data, StreamingDataset)
    pieces = list(data.batches(4))
    assert [start for start, _, _ in pieces] == [0, 4, 8] and data.num_batches(4) == 3
    for start, x, y in pieces:
        assert y is x  # a whole batch: the loss and output see it
        lengths = ds.lengths[start : start + 4]
        assert x["feats"].shape == (len(lengths), max(lengths), 4)
        torch.testing.assert_close(x["mask"].sum(1), torch.tensor(lengths, dtype=torch.float32))
        assert torch.equal(x["labels"], ds.labels[start : start + 4])
        for row, i in enumerate(range(start, start + len(lengths))):
            assert torch.equal(x["feats"][row, : ds.lengths[i]], ds.feats[i])


def test_pairs_split_into_inputs_and_targets_like_the_collated_dataset():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 3, generator=gen), torch.randint(0, 2, (10,), generator=gen)
    data = stream_dataset(TensorDataset(x, y))
    collated = as_dataset(TensorDataset(x, y))
    assert not data.whole_batch and not collated.whole_batch
    for (s1, x1, y1), (s2, x2, y2) in zip(data.batches(4), collated.batches(4), strict=True):
        assert s1 == s2 and torch.equal(x1, x2) and torch.equal(y1, y2)
    whole = stream_dataset(TensorDataset(x, y), pairs=False)
    _, batch, same = next(whole.batches(4))
    assert whole.whole_batch and same is batch and isinstance(batch, tuple) and len(batch) == 2


def test_only_one_batch_is_read_and_held_at_a_time():
    ds = Sequences(10)
    data = stream_dataset(ds, pad)
    held: list[weakref.ref] = []
    for start, x, _ in data.batches(4):
        b = x["labels"].shape[0]
        assert sorted(ds.reads) == list(range(start + b))  # nothing read ahead
        gc.collect()
        assert all(ref() is None for ref in held)  # earlier batches were let go
        held.append(weakref.ref(x["feats"]))
        del x, _


def test_slice_and_subset_are_lazy_views_over_the_index_range():
    ds = TensorDataset(torch.arange(12.0)[:, None], torch.arange(12))
    data = stream_dataset(ds)
    for start, stop in ((2, 9), (0, 12), (5, 50), (-4, 12), (3, 3), (7, 2)):
        view = data.slice(start, stop)
        expected = list(range(12))[start:stop]
        assert len(view) == len(expected)
        got = [int(v) for _, _, y in view.batches(3) for v in y]
        assert got == expected
    nested = data.slice(2, 10).slice(1, 5)  # examples 3, 4, 5, 6
    assert [int(y) for _, _, ys in nested.batches(2) for y in ys] == [3, 4, 5, 6]
    picked = data.slice(4, 12).subset(torch.tensor([5, 0, -1]))
    assert [int(y) for _, _, ys in picked.batches(2) for y in ys] == [9, 4, 11]
    masked = data.subset(torch.arange(12) % 5 == 0)
    assert [int(picked[i][1]) for i in range(3)] == [9, 4, 11]
    assert [int(y) for _, _, ys in masked.batches(8) for y in ys] == [0, 5, 10]
    with pytest.raises(IndexError):
        data.slice(0, 4).subset([4])
    with pytest.raises(ValueError, match="empty"):
        data.subset(torch.zeros(12, dtype=torch.bool))


class Listed(Dataset):
    """Examples given as a list (a data set of exactly those examples)."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def test_fingerprint_follows_content_not_batch_size_padding_or_position():
    ds = Sequences(9)
    data = stream_dataset(DataLoader(ds, batch_size=2, collate_fn=pad))
    again = stream_dataset(DataLoader(Sequences(9), batch_size=7, shuffle=True, collate_fn=pad))
    assert data.fingerprint() == again.fingerprint()
    # A view's fingerprint is that of a data set holding just those examples.
    alone = stream_dataset(Listed([ds[i] for i in range(3, 7)]), pad)
    assert data.slice(3, 7).fingerprint() == alone.fingerprint()
    assert data.slice(3, 7).fingerprint() != data.slice(2, 6).fingerprint()
    changed = Sequences(9)
    changed.feats[4] = changed.feats[4].clone()
    changed.feats[4][0, 0] += 1e-3
    assert stream_dataset(changed, pad).fingerprint() != data.fingerprint()
    # A vouched-for fingerprint reads nothing.
    vouched = stream_dataset(ds, pad, fingerprint="sequences-v1")
    ds.reads.clear()
    other_content = stream_dataset(Sequences(9, seed=5), pad, fingerprint="sequences-v1")
    assert vouched.fingerprint() == other_content.fingerprint()  # the given identity decides
    assert vouched.slice(1, 4).fingerprint() != vouched.fingerprint() and ds.reads == []


class Mixed(Dataset):
    """Dict examples of a numpy array, a Python int and a bool tensor."""

    def __init__(self, n: int) -> None:
        self.x = np.random.default_rng(0).normal(size=(n, 3, 2)).astype(np.float32)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "label": i % 7, "flag": torch.tensor([i % 2 == 0, True])}


def test_fingerprint_of_stacked_blocks_equals_each_example_collated_alone():
    gen = torch.Generator().manual_seed(2)
    pairs = TensorDataset(torch.randn(600, 3, 2, generator=gen), torch.randint(0, 5, (600,)))
    for ds in (pairs, Mixed(530)):
        stacked = stream_dataset(ds)  # default_collate: blocks of 256 stacked, hashed by row
        alone = stream_dataset(ds, lambda items: default_collate(items))  # each alone
        assert stacked.fingerprint() == alone.fingerprint()
        assert stacked.slice(250, 520).fingerprint() == alone.slice(250, 520).fingerprint()
    ragged = stream_dataset(Listed([torch.zeros(2), torch.zeros(3)]))  # cannot be stacked
    assert ragged.fingerprint() == stream_dataset(
        Listed([torch.zeros(2), torch.zeros(3)]), lambda items: default_collate(items)
    ).fingerprint()
    with pytest.raises(ValueError, match="example 4 holds NaN"):
        stream_dataset(Bad()).fingerprint()


def test_workers_give_the_same_batches_and_fingerprint():
    ds = Sequences(10)
    plain = stream_dataset(ds, pad)
    workers = stream_dataset(ds, pad, num_workers=2)
    for (s1, x1, _), (s2, x2, _) in zip(plain.batches(3), workers.batches(3), strict=True):
        assert s1 == s2 and all(torch.equal(x1[k], x2[k]) for k in x1)
    assert plain.fingerprint() == workers.fingerprint()


class Bad(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        x = torch.ones(3)
        if i == 4:
            x[1] = float("nan")
        return x, torch.tensor(0)


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(2)


def test_bad_examples_and_sources_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="example 4 holds NaN"):
        list(stream_dataset(Bad()).batches(2))
    with pytest.raises(ValueError, match="example 1 holds NaN"):
        list(stream_dataset(Bad()).slice(3, 6).batches(4))
    with pytest.raises(ValueError, match="one row per example"):
        list(stream_dataset(Bad(), lambda items: torch.zeros(1, 3)).batches(2))
    with pytest.raises(ValueError, match="collate function"):
        list(stream_dataset(Sequences(4)).batches(4))  # ragged without a padding collate
    with pytest.raises(TypeError, match="map-style"):
        stream_dataset(DataLoader(Stream()))
    with pytest.raises(TypeError, match="already in memory"):
        stream_dataset(torch.zeros(3, 2))
    with pytest.raises(AttributeError, match="as_dataset"):
        _ = stream_dataset(Bad()).inputs
    with pytest.raises(ValueError, match="batch size"):
        next(stream_dataset(Bad()).batches(0))
    tensors = as_dataset(torch.zeros(3, 2), torch.zeros(3), stream=True)
    assert isinstance(tensors, ArrayDataset)


def test_store_from_a_stream_equals_in_memory_gradients_and_resumes(tmp_path, monkeypatch):
    ds = Sequences(23)
    task, model, params = pool_setup()
    p = sum(v.numel() for v in params.values())
    projector = Projector(p, 10, seed=3)
    data = stream_dataset(ds, pad)
    expected = by_hand(model, ds, pool_loss) @ projector.matrix()
    fault = Interrupted(monkeypatch, store_module, "per_example_grads", 3)
    with pytest.raises(KeyboardInterrupt):
        build_gradient_store(tmp_path, task, model, params, data, projector=projector,
                             chunk_rows=6, grad_chunk_size=4)
    assert FeatureStore(tmp_path).completed_chunks() == [0, 1]
    calls = fault.count_only()
    # A fresh wrapper (another process): same fingerprint, so the store resumes.
    store = build_gradient_store(tmp_path, task, model, params, stream_dataset(Sequences(23),
                                                                               pad),
                                 projector=projector, chunk_rows=6, grad_chunk_size=4)
    assert calls == [6, 5]  # chunks 2 and 3 (rows 12..17, 18..22)
    store.verify()
    np.testing.assert_allclose(store[:], expected.numpy(), rtol=1e-5, atol=1e-6)


def test_a_stream_collated_into_memory_uses_its_own_collate():
    ds = Sequences(7)
    stream = stream_dataset(ds, pad)
    collated = as_dataset(stream)
    direct = as_dataset(DataLoader(ds, collate_fn=pad))
    assert isinstance(collated, ArrayDataset) and collated.whole_batch
    assert all(torch.equal(collated.inputs[k], direct.inputs[k]) for k in direct.inputs)
    assert as_dataset(stream, stream=True) is stream
    pairs = as_dataset(stream_dataset(TensorDataset(torch.zeros(4, 2), torch.arange(4))))
    assert not pairs.whole_batch and torch.equal(pairs.targets, torch.arange(4))


def test_an_attributor_fits_on_a_stream_like_on_the_collated_data():
    """IFFIM and TracIn fitted on a padded stream (the context's task check included) score
    like on the same data collated in memory."""
    from tdatune.attributors import AttributionContext, make_attributor

    ds = Sequences(14)
    task, model, _ = pool_setup()
    state = model.state_dict()
    streamed = stream_dataset(DataLoader(ds, batch_size=5, collate_fn=pad))
    collated = as_dataset(DataLoader(ds, collate_fn=pad))
    explained = as_dataset(DataLoader(Sequences(3, seed=9), collate_fn=pad))
    for name in ("iffim", "tracin"):
        scores = [make_attributor(name).fit(AttributionContext(task, data, [state],
                                                               chunk_size=4)).score(explained)
                  for data in (streamed, collated)]
        torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-6)


def test_in_memory_gradients_that_would_not_fit_are_refused_first(monkeypatch):
    import tdatune.features.budget as budget
    from tdatune.features.budget import DoesNotFit

    ds = Sequences(13)
    task, model, params = pool_setup()
    monkeypatch.setattr(budget, "available_memory", lambda: 1000)
    with pytest.raises(DoesNotFit, match=r"proj_dim|chunk"):
        per_example_grads(task, model, params, stream_dataset(DataLoader(ds, collate_fn=pad)))
