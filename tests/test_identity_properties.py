"""Property tests (hypothesis) of every identity tdatune keys a stored or cached result by, in
both directions: any change of a content-bearing input changes the identity, and nothing else
does (not a reshuffled dict, a copy, a strided view, a rebuilt object, an edited comment).

Each test draws the content itself; expectations come from what the inputs are (two draws
differ or they do not), never from the code under test."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from tdatune.data.base import ArrayDataset, as_dataset
from tdatune.data.streaming import StreamingDataset
from tdatune.evaluate.groundtruth import GroundTruthConfig, manifest_for
from tdatune.models.batched import _chunk_key
from tdatune.models.identity import architecture, task_identity
from tdatune.models.outputs import cross_entropy
from tdatune.models.task import make_task
from tdatune.models.training import TrainFunction, TrainRecipe
from tdatune.utils.fingerprint import content_fingerprint, fingerprint_config, fingerprint_tensors

FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=12, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

DTYPES = [np.float32, np.float64, np.int64, np.int32, np.uint8]
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


@st.composite
def arrays(draw, shape=None, dtype=None):
    """A small array of a drawn shape and dtype with drawn integer-valued entries."""
    shape = draw(shapes) if shape is None else shape
    dtype = draw(st.sampled_from(DTYPES)) if dtype is None else dtype
    size = int(np.prod(shape))
    values = draw(st.lists(st.integers(0, 200), min_size=size, max_size=size))
    return np.asarray(values, dtype=dtype).reshape(shape)


# -- tensors ------------------------------------------------------------------------------------

@FAST
@given(a=arrays(), data=st.data())
def test_tensor_fingerprint_changes_with_any_entry_and_nothing_else(a, data):
    """One entry changed: another fingerprint. The same content as a torch tensor, a copy, a
    transposed-back strided view or a tensor that requires grad: the same."""
    t = torch.from_numpy(a.copy())
    base = fingerprint_tensors(t)
    assert fingerprint_tensors(a) == base
    assert fingerprint_tensors(t.clone()) == base
    if t.ndim >= 2:
        strided = t.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
        assert not strided.is_contiguous() or t.shape[0] == 1 or t.shape[1] == 1
        assert fingerprint_tensors(strided) == base
    if t.is_floating_point():
        assert fingerprint_tensors(t.clone().requires_grad_(True)) == base
    where = data.draw(st.tuples(*[st.integers(0, s - 1) for s in a.shape]))
    changed = a.copy()
    changed[where] = changed[where] + 1
    assert fingerprint_tensors(changed) != base


@FAST
@given(a=arrays(), data=st.data())
def test_tensor_fingerprint_sees_shape_dtype_and_order(a, data):
    """The same bytes under another shape ([M, n] against [n, M]) or read as another dtype of
    the same width, and the same tensors in another order or split otherwise, all differ."""
    base = fingerprint_tensors(a)
    flat = a.reshape(-1)
    if a.ndim > 1 or a.size > 1:
        other = data.draw(st.sampled_from([s for s in [(a.size,), (1, a.size), (a.size, 1)]
                                           if s != a.shape] or [(a.size, 1)]))
        assume(other != a.shape)
        assert fingerprint_tensors(flat.reshape(other)) != base
    same_width = {np.dtype(np.float32): np.int32, np.dtype(np.int32): np.float32,
                  np.dtype(np.float64): np.int64, np.dtype(np.int64): np.float64,
                  np.dtype(np.uint8): np.int8}[a.dtype]
    assert fingerprint_tensors(a.view(same_width)) != base
    b = data.draw(arrays())
    assume(a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b))
    assert fingerprint_tensors(a, b) != fingerprint_tensors(b, a)
    if a.size > 1:  # one tensor split in two carries the same bytes in another grouping
        assert fingerprint_tensors(flat[:1], flat[1:]) != fingerprint_tensors(flat)


def test_bfloat16_tensors_are_fingerprinted_by_their_bytes():
    """A dtype numpy lacks: still by shape, dtype and bytes (not an error, not its float32 copy)."""
    t = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    assert fingerprint_tensors(t) == fingerprint_tensors(t.clone())
    assert fingerprint_tensors(t) != fingerprint_tensors(t.reshape(3, 1))
    assert fingerprint_tensors(t) != fingerprint_tensors(t.float())
    bumped = t.clone()
    bumped[0, 2] = 4.0
    assert fingerprint_tensors(bumped) != fingerprint_tensors(t)


# -- configurations --------------------------------------------------------------------------------

plain = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=8)


@FAST
@given(config=st.dictionaries(st.text(min_size=1, max_size=4), plain, min_size=1, max_size=5),
       data=st.data())
def test_config_fingerprint_ignores_key_order_and_sees_every_value(config, data):
    shuffled = dict(data.draw(st.permutations(list(config.items()))))
    assert fingerprint_config(shuffled) == fingerprint_config(config)
    key = data.draw(st.sampled_from(sorted(config)))
    new = data.draw(plain)
    assume(new != config[key] or type(new) is not type(config[key]))
    assume(repr(new) != repr(config[key]))
    assert fingerprint_config({**config, key: new}) != fingerprint_config(config)


# -- modules and functions (a loss, a forward, a training function) --------------------------------

@FAST
@given(reduction=st.sampled_from(["none", "mean", "sum"]),
       smoothing=st.sampled_from([0.0, 0.05, 0.1, 0.3]),
       ignore=st.sampled_from([-100, 0, 2]),
       weight=st.none() | st.lists(st.integers(1, 3), min_size=3, max_size=3))
def test_a_loss_module_is_identified_by_every_option_and_its_weights(reduction, smoothing,
                                                                     ignore, weight):
    """The live finding: CrossEntropyLoss(label_smoothing=0.1) was identified by its class alone.
    Two losses built alike share an identity; changing any one option gives another."""

    def build(**changes):
        opts = {"reduction": reduction, "label_smoothing": smoothing, "ignore_index": ignore,
                "weight": None if weight is None else torch.tensor(weight, dtype=torch.float32)}
        opts.update(changes)
        return nn.CrossEntropyLoss(**opts)

    base = content_fingerprint(build())
    assert content_fingerprint(build()) == base
    assert content_fingerprint(build(reduction={"none": "sum", "mean": "none", "sum": "mean"}[
        reduction])) != base
    assert content_fingerprint(build(label_smoothing=smoothing + 0.01)) != base
    assert content_fingerprint(build(ignore_index=ignore + 1)) != base
    other = torch.tensor([1.0, 1.0, 5.0]) if weight != [1, 1, 5] else torch.tensor([1.0, 2.0, 5.0])
    assert content_fingerprint(build(weight=other)) != base


def test_task_identity_sees_a_loss_modules_options():
    """``task_identity`` of a task with ``CrossEntropyLoss(reduction="none", label_smoothing=0.1)``
    differs from the one without smoothing (the same class): the reported live bug."""
    def ident(loss):
        return task_identity(make_task(lambda: nn.Linear(3, 2), loss, "margin", name="t"))
    plain_ce = ident(nn.CrossEntropyLoss(reduction="none"))
    assert ident(nn.CrossEntropyLoss(reduction="none")) == plain_ce
    assert ident(nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1)) != plain_ce


def _scaled_loss(out, y, scale=1.0):
    return scale * cross_entropy(out, y)


def _make_scaled(scale):
    def loss(out, y):
        return scale * cross_entropy(out, y)
    return loss


@FAST
@given(a=st.floats(0.1, 10, allow_nan=False), b=st.floats(0.1, 10, allow_nan=False))
def test_partials_closures_and_defaults_are_identified_by_their_values(a, b):
    """A partial's keywords, a closure's captured value and a default argument are content."""
    same = a == b
    pa, pb = functools.partial(_scaled_loss, scale=a), functools.partial(_scaled_loss, scale=b)
    assert (content_fingerprint(pa) == content_fingerprint(pb)) == same
    assert (content_fingerprint(_make_scaled(a)) == content_fingerprint(_make_scaled(b))) == same
    assert content_fingerprint(functools.partial(_scaled_loss, 1.0, 2.0)) != content_fingerprint(
        functools.partial(_scaled_loss, 2.0, 1.0))


def _module_from_source(tmp: Path, source: str, name: str = "tdatune_prop_loss"):
    """Import ``source`` as module ``name`` from a fresh file (so ``inspect.getsource`` reads
    it): the same module name as written elsewhere, in another version."""
    folder = tmp / uuid.uuid4().hex
    folder.mkdir()
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


LOSS_SOURCE = '''
import torch

SCALE = {scale}


def loss(out, y):{doc}
    {comment}
    return SCALE * torch.nn.functional.cross_entropy(out {op} {shift}, y, reduction="none")
'''


@SLOW
@given(comment=st.text(alphabet="abc xyz", max_size=12),
       doc=st.sampled_from(["", '\n    """Per-example loss."""', '\n    """Other words."""']),
       shift=st.integers(0, 3), op=st.sampled_from(["+", "-"]), scale=st.sampled_from([1.0, 2.5]))
def test_a_function_is_identified_by_its_code_not_its_comments(tmp_path_factory, comment, doc,
                                                               shift, op, scale):
    """The same function (same module and name) written with another comment, docstring or
    blank lines is the same function; another constant in its body, another operator or another
    module-level constant it reads is another function."""
    tmp = tmp_path_factory.mktemp("src")
    ref = _module_from_source(tmp, LOSS_SOURCE.format(doc="", comment="# ref", shift=shift,
                                                      op=op, scale=scale))
    same = _module_from_source(tmp, "\n\n" + LOSS_SOURCE.format(
        doc=doc, comment=f"# {comment}" if comment else "", shift=shift, op=op, scale=scale))
    assert content_fingerprint(same.loss) == content_fingerprint(ref.loss)
    other_shift = _module_from_source(tmp, LOSS_SOURCE.format(doc="", comment="", shift=shift + 1,
                                                              op=op, scale=scale))
    other_op = _module_from_source(tmp, LOSS_SOURCE.format(
        doc="", comment="", shift=shift, op="-" if op == "+" else "+", scale=scale))
    other_scale = _module_from_source(tmp, LOSS_SOURCE.format(doc="", comment="", shift=shift,
                                                              op=op, scale=scale + 1))
    fps = {content_fingerprint(m.loss) for m in (ref, other_shift, other_op, other_scale)}
    assert len(fps) == 4


# -- models: architecture by structure and options, never by weights -------------------------------

class Scaled(nn.Module):
    """A block whose option lives in ``__dict__`` and not in ``extra_repr``."""

    def __init__(self, width: int, scale: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.scale = scale
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x):
        return self.norm(self.scale * self.lin(x))


@FAST
@given(width=st.integers(2, 5), scale=st.sampled_from([0.5, 1.0, 2.0]),
       eps=st.sampled_from([1e-5, 1e-6]), seed=st.integers(0, 10))
def test_architecture_sees_options_and_shapes_but_not_weights_or_mode(width, scale, eps, seed):
    torch.manual_seed(0)
    base = architecture(Scaled(width, scale, eps))["fingerprint"]
    torch.manual_seed(seed)
    rebuilt = Scaled(width, scale, eps)
    rebuilt(torch.randn(2, width)).sum().backward()  # a forward and backward pass
    rebuilt.eval()
    with torch.no_grad():
        rebuilt.lin.weight.add_(1.0)  # trained weights
    assert architecture(rebuilt)["fingerprint"] == base
    assert architecture(Scaled(width, scale * 3, eps))["fingerprint"] != base
    assert architecture(Scaled(width, scale, eps * 10))["fingerprint"] != base
    assert architecture(Scaled(width + 1, scale, eps))["fingerprint"] != base


# -- data: datasets and streams ----------------------------------------------------------------------

@FAST
@given(n=st.integers(3, 8), d=st.integers(1, 3), data=st.data())
def test_dataset_fingerprint_is_its_content(n, d, data):
    """Two datasets with the same rows share a fingerprint wherever they came from (a slice at
    another offset of a repeated block included); one changed entry, target or row count does
    not; a dict batch's keys are content."""
    x = torch.tensor(data.draw(arrays((n, d), np.float32)))
    y = torch.tensor(data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))
    ds = as_dataset(x, y)
    twice = as_dataset(torch.cat([x, x]), torch.cat([y, y]))
    assert twice.slice(n, 2 * n).fingerprint() == ds.fingerprint() == twice.slice(0, n).fingerprint()
    i = data.draw(st.integers(0, n - 1))
    bumped = x.clone()
    bumped[i, 0] += 1
    assert as_dataset(bumped, y).fingerprint() != ds.fingerprint()
    flipped = y.clone()
    flipped[i] = (flipped[i] + 1) % 3
    assert as_dataset(x, flipped).fingerprint() != ds.fingerprint()
    assert ds.slice(0, n - 1).fingerprint() != ds.fingerprint()
    a = ArrayDataset({"input_ids": x.long(), "mask": torch.ones(n, d, dtype=torch.long)}, y)
    b = ArrayDataset({"input_ids": x.long(), "attention": torch.ones(n, d, dtype=torch.long)}, y)
    assert a.fingerprint() != b.fingerprint()


class Rows(torch.utils.data.Dataset):
    """A map-style dataset of drawn rows."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@FAST
@given(n=st.integers(4, 10), data=st.data())
def test_a_vouched_streams_slice_is_identified_by_its_start_and_stop(n, data):
    """With ``fingerprint=`` the content is vouched for by name, so a slice is identified by
    where it starts and stops: two slices of the same length at different offsets differ, the
    same slice built twice does not; without a vouch, by content."""
    x = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    y = torch.arange(n) % 2
    stream = StreamingDataset(Rows(x, y), fingerprint="v1")
    length = data.draw(st.integers(1, n - 1))
    s1 = data.draw(st.integers(0, n - length))
    s2 = data.draw(st.integers(0, n - length))
    a = stream.slice(s1, s1 + length).fingerprint()
    assert stream.slice(s1, s1 + length).fingerprint() == a
    assert (stream.slice(s2, s2 + length).fingerprint() == a) == (s1 == s2)
    assert StreamingDataset(Rows(x, y), fingerprint="v2").slice(s1, s1 + length).fingerprint() != a
    unvouched = StreamingDataset(Rows(x, y))
    by_content = unvouched.slice(s1, s1 + length).fingerprint()
    assert (unvouched.slice(s2, s2 + length).fingerprint() == by_content) == (s1 == s2)


# -- what a stored result records -----------------------------------------------------------------------

def _linear() -> nn.Module:
    return nn.Linear(3, 2)


def _train_fn(data, seed, epochs=1, make=None):
    return _linear()


RECIPE_CHANGES = {"optimizer": "adam", "epochs": 3, "lr": 0.05, "batch_size": 16, "momentum": 0.5,
                  "weight_decay": 1e-4, "schedule": "cosine", "lbfgs_iters": 7, "grad_clip": 1.0}


@FAST
@given(field=st.sampled_from(sorted(RECIPE_CHANGES)),
       options=st.dictionaries(st.sampled_from(["epochs", "width"]), st.integers(1, 4), max_size=2))
def test_recipes_and_training_functions_record_every_option(field, options):
    """Every recipe field, a training function's options, its partial arguments and a changed
    default are part of what checkpoints and ground truths record."""
    base = TrainRecipe()
    assert fingerprint_config(TrainRecipe().to_dict()) == fingerprint_config(base.to_dict())
    changed = TrainRecipe(**{field: RECIPE_CHANGES[field]})
    assert fingerprint_config(changed.to_dict()) != fingerprint_config(base.to_dict())
    fn = TrainFunction(_train_fn, options=options)
    assert fingerprint_config(TrainFunction(_train_fn, options=dict(options)).to_dict()) == \
        fingerprint_config(fn.to_dict())
    more = {**options, "width": options.get("width", 0) + 1}
    assert fingerprint_config(TrainFunction(_train_fn, options=more).to_dict()) != \
        fingerprint_config(fn.to_dict())
    p1 = TrainFunction(functools.partial(_train_fn, epochs=1), options=options)
    p2 = TrainFunction(functools.partial(_train_fn, epochs=2), options=options)
    assert fingerprint_config(p1.to_dict()) != fingerprint_config(p2.to_dict())


@SLOW
@given(n=st.integers(4, 8), m=st.integers(2, 4), data=st.data())
def test_a_ground_truth_manifest_records_the_explained_sets_content(n, m, data):
    """Another explained set of the same size, or another configuration, is another ground
    truth; the same data rebuilt is the same."""
    task = make_task(_linear, "cross_entropy", "margin", name="t")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 100)))
    train = as_dataset(torch.randn(n, 3, generator=gen), torch.randint(0, 2, (n,), generator=gen))
    xe = torch.randn(m, 3, generator=gen)
    ye = torch.randint(0, 2, (m,), generator=gen)
    config = GroundTruthConfig(n_subsets=4, alpha=0.5)

    def fp(explained, cfg=config):
        return fingerprint_config(manifest_for(task, TrainRecipe(), train, explained, cfg))

    base = fp(as_dataset(xe, ye))
    assert fp(as_dataset(xe.clone(), ye.clone())) == base
    j = data.draw(st.integers(0, m - 1))
    other = xe.clone()
    other[j] += 0.5
    assert fp(as_dataset(other, ye)) != base
    assert fp(as_dataset(xe, ye), GroundTruthConfig(n_subsets=5, alpha=0.5)) != base


@FAST
@given(rows=st.integers(2, 4), cols=st.integers(2, 4), data=st.data())
def test_a_batched_chunks_key_sees_the_masks_shape_seeds_and_task(rows, cols, data):
    """The resume key of a batched chunk: masks [M, n] against the same bits as [n, M], another
    seed order, or a task with another loss option are other chunks."""
    assume(rows != cols)
    bits = data.draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
    masks = torch.tensor(bits).reshape(rows, cols)
    task = make_task(_linear, nn.CrossEntropyLoss(reduction="none"), "margin", name="t")
    seeds = list(range(rows))
    base = _chunk_key(task, TrainRecipe(), masks, seeds)
    assert _chunk_key(task, TrainRecipe(), masks.clone(), list(seeds)) == base
    assert _chunk_key(task, TrainRecipe(), masks.reshape(cols, rows), seeds) != base
    assert _chunk_key(task, TrainRecipe(), masks, seeds[::-1]) != base
    smoothed = make_task(_linear, nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1),
                         "margin", name="t")
    assert _chunk_key(smoothed, TrainRecipe(), masks, seeds) != base


# -- in-memory caches: keyed by the explained set's content ------------------------------------------

CACHED = ["iffim", "if_explicit", "if_cg", "if_lissa", "if_arnoldi", "kfac", "ekfac", "logra",
          "trak", "tracin"]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.fixture(scope="module")
def cache_problem():
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(24, 4, generator=gen), torch.randint(0, 3, (24,), generator=gen)
    xa, ya = torch.randn(3, 4, generator=gen), torch.randint(0, 3, (3,), generator=gen)
    xb = xa.clone()
    xb[1] += 0.7  # the same size, one example moved: what a size-keyed cache would confuse
    return x, y, (xa, ya), (xb, ya)


@pytest.mark.parametrize("name", CACHED)
def test_a_second_explained_set_of_the_same_size_gets_its_own_scores(name, cache_problem):
    """Score set A, then set B (same size, one example changed) on one fitted attributor: B's
    scores equal those of a second, fresh attributor that never saw A."""
    from tdatune.attributors import AttributionContext, make_attributor

    x, y, (xa, ya), (xb, yb) = cache_problem
    task = make_task(_mlp, "cross_entropy", "margin", name="t")
    state = _mlp().state_dict()
    options = {"if_lissa": {"depth": 30}, "if_cg": {}, "trak": {"proj_dim": 16},
               "logra": {"proj_dim": 4}, "tracin": {"proj_dim": 16}}.get(name, {})

    def fitted():
        ctx = AttributionContext(task, as_dataset(x, y), [state], weight_decay=1e-2)
        return make_attributor(name, **options).fit(ctx)

    values = {} if name == "tracin" else {"lam": 1e-1}
    first = fitted()
    first.score(as_dataset(xa, ya), **values)
    got = first.score(as_dataset(xb, yb), **values)
    want = fitted().score(as_dataset(xb, yb), **values)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, fitted().score(as_dataset(xa, ya), **values))


def test_every_permutation_of_a_dict_gives_one_content_identity():
    """Dict key order is not content (a loss's options read in any order)."""
    items = [("a", 1), ("b", torch.ones(2)), ("c", [1, 2])]
    fps = {content_fingerprint(dict(p)) for p in itertools.permutations(items)}
    assert len(fps) == 1


def _vit(width: int) -> nn.Module:
    return nn.Linear(width, 2)


def test_a_training_function_wrapping_a_partial_has_the_same_identity_in_every_process():
    """A partial holding another partial of a function: its repr has memory addresses
    (``<function ... at 0x7f...>``), which change from run to run; the recorded name must not,
    or every cell of such a setting is stale when read back (found on the ViT family)."""
    import subprocess

    code = ("import functools, sys; sys.path.insert(0, 'tests');"
            "from test_identity_properties import _vit, _train_fn;"
            "from tdatune.models.training import TrainFunction;"
            "from tdatune.utils.fingerprint import fingerprint_config;"
            "f = TrainFunction(functools.partial(_train_fn, make=functools.partial(_vit, 3)));"
            "print(fingerprint_config(f.to_dict()))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, cwd=Path(__file__).parent.parent).stdout.strip()
            for _ in range(2)}
    assert len(runs) == 1, runs
