"""LoGra: IFFIM on layer-wise Kronecker-projected gradients, score = -v^T (F + lambda I)^-1 g_i
with g = concat_l vec((P_out^T delta)(P_in^T [a, 1])^T) built from hooked activations a and
output gradients delta of the model's nn.Linear layers (features/layerwise.py), never forming
full per-example gradients.

``proj_dim`` is the per-layer factor dimension k (k_in = min(k, in+1), k_out = min(k, out));
None gives identity factors, i.e. the layers' full gradients (bias folded in as an extra
input column). ``blocks`` chooses the curvature: "joint" (default) is one Fisher over all
layers' projected gradients, so LoGra with identity factors over all linear layers equals
IFFIM on those parameters exactly; "layer" is LoGra's block-diagonal Fisher (one block per
layer, scores summed over layers), stored as an ensemble lambda-path with weight 1 per block.

Lambda convention: lam is added to the projected Fisher of the *mean* loss, F = G^T G / n,
as for IFFIM (docs/lambda_convention.md gives the conversion from LoGra's own damping).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from tdatune.attributors.base import (
    CHECKPOINT,
    AttributionContext,
    Attributor,
    HyperParameter,
    any_int,
    one_of,
    optional_positive_int,
)
from tdatune.attributors.damping import check_damping
from tdatune.attributors.lambda_path import EnsembleLambdaPath, LambdaPath
from tdatune.curvature.eigen import Eigensystem, fisher_eigensystem
from tdatune.data.base import ArrayDataset
from tdatune.features.budget import (
    EIG_ITEMSIZE,
    AttributionEstimate,
    Knob,
    PathEstimate,
    ensemble_parts,
    estimate_attribution,
    explained_knob,
    lambda_path_scores,
)
from tdatune.features.gradients import num_params
from tdatune.features.layerwise import layer_factors, layerwise_grads, linear_layers
from tdatune.models.task import Params, Task


def optional_names(x: Any) -> list[str] | None:
    """None or a non-empty list of module names."""
    if x is None:
        return None
    items = [x] if isinstance(x, str) else list(x)
    if not items or not all(isinstance(v, str) for v in items):
        raise ValueError("must be None or a non-empty list of module names")
    return items


class LoGra(Attributor):
    """IFFIM on layer-wise Kronecker-projected gradients from forward/backward hooks."""

    name = "logra"
    hyperparameters = (
        HyperParameter("lam", 1e-3, "score", check_damping,
                       "damping added to the projected Fisher (mean loss); with blocks='layer' "
                       "also one per layer, {layer: value} or 'per_layer'"),
        HyperParameter("proj_dim", 16, "fit", optional_positive_int,
                       "per-layer factor dim k (k_in = k_out = k); None = identity factors"),
        HyperParameter("proj_seed", 0, "fit", any_int, "factor seed"),
        HyperParameter("layers", None, "fit", optional_names,
                       "names of the nn.Linear modules used (default: all)"),
        HyperParameter("blocks", "joint", "fit", one_of("joint", "layer"),
                       "one Fisher over all layers, or one block per layer"),
        CHECKPOINT,
    )

    def memory_estimate(self, task: Task, model: nn.Module, params: Params, train: ArrayDataset,
                        *, explained: int, validation: int = 0, chunk_size: int = 256,
                        checkpoints: int | None = None) -> PathEstimate:
        """LoGra's path: the layer-wise projected features [n, W] (W = sum over layers of
        k_out k_in) with their chunks before the concatenation; then one Fisher eigensystem
        over all of them (IFFIM's phases on width W) or one per layer, the earlier layers'
        kept while the next is fitted; the explained features and coordinates (per layer:
        the ensemble path concatenating them, for the validation set too); the [m, n] scores."""
        sides = tuple((layer.in_features + (layer.bias is not None), layer.out_features)
                      for _, layer in linear_layers(model, self.params["layers"]))
        first = next(iter(params.values()))
        return logra_estimate(_Sizes(
            n=len(train), p=num_params(params), m=explained, v=validation, chunk=chunk_size,
            dtype=first.dtype, sides=sides, k=self.params["proj_dim"],
            joint=self.params["blocks"] == "joint"))

    def _fit(self, context: AttributionContext) -> None:
        model, _ = context.model_at(self.params["checkpoint"])
        self._model = model
        self.layers = linear_layers(model, self.params["layers"])
        k = self.params["proj_dim"]
        largest = max(max(layer.in_features + 1, layer.out_features) for _, layer in self.layers)
        if k is not None and k > largest:
            raise ValueError(
                f"{self.name}: proj_dim={k} exceeds every layer side (largest {largest}), so "
                "nothing would be projected; use proj_dim=None for identity factors or a "
                f"smaller k")
        self.factors = layer_factors(self.layers, k, self.params["proj_seed"])
        grads = layerwise_grads(context.task, model, context.train, self.factors, self.layers,
                                target="loss", chunk_size=context.chunk_size,
                                show_progress=context.show_progress, desc="LoGra train features")
        self.width = grads.shape[1]
        if self.params["blocks"] == "joint":
            self.eigens: list[Eigensystem] = [fisher_eigensystem(grads)]
            self.slices = [slice(0, self.width)]
        else:
            self.slices, start = [], 0
            for f in self.factors:
                self.slices.append(slice(start, start + f.width))
                start += f.width
            self.eigens = [fisher_eigensystem(grads[:, s]) for s in self.slices]
        self._paths: dict[str, LambdaPath] = {}

    def explained_grads(self, explained: ArrayDataset) -> torch.Tensor:
        """Projected output-function gradients of ``explained`` [m, width]."""
        ctx = self._require_fit()
        return layerwise_grads(ctx.task, self._model, explained, self.factors, self.layers,
                               target="output", chunk_size=ctx.chunk_size)

    def lambda_path(self, explained: ArrayDataset) -> LambdaPath:
        """The lambda-path for ``explained`` (an ensemble of per-layer blocks with
        ``blocks='layer'``); cached by content."""
        self._require_fit()
        key = explained.fingerprint()
        if key not in self._paths:
            v = self.explained_grads(explained)
            paths = [LambdaPath(e.sigma, e.coords(v[:, s]), e.train_coords)
                     for e, s in zip(self.eigens, self.slices, strict=True)]
            self._paths[key] = (paths[0] if len(paths) == 1 else EnsembleLambdaPath(
                paths, [1.0] * len(paths), names=[name for name, _ in self.layers]))
        return self._paths[key]

    def score(self, explained: ArrayDataset, **values: Any) -> torch.Tensor:
        """Scores [m, n] at ``lam``: one damping, or with ``blocks="layer"`` one per layer (a
        list, ``{layer: value}`` or ``"per_layer"``)."""
        lam = self.score_params(values)["lam"]
        return self.lambda_path(explained).scores(lam).float()


@dataclass(frozen=True)
class _Sizes:
    """n training, m explained, v validation examples, p parameters, the layers' (in + bias,
    out) sides, the factor dimension k (None: identity) and the curvature's blocks."""

    n: int
    p: int
    m: int
    v: int
    chunk: int
    dtype: torch.dtype
    sides: tuple[tuple[int, int], ...]
    k: int | None
    joint: bool

    def kept(self, side: int) -> int:
        """A side's projected size: min(k, side)."""
        return side if self.k is None else min(self.k, side)

    @property
    def widths(self) -> list[int]:
        """Numbers per example each layer contributes: k_out k_in."""
        return [self.kept(d_in) * self.kept(d_out) for d_in, d_out in self.sides]

    @property
    def factor_bytes(self) -> int:
        """The float32 factors of the sides that are projected (k < side)."""
        return 4 * sum(side * self.kept(side) for pair in self.sides for side in pair
                       if self.kept(side) < side)

    def block(self, width: int, rows: int = 0, validation: int = 0) -> AttributionEstimate:
        """IFFIM's estimate of one eigensystem over ``width`` of the features."""
        return estimate_attribution(self.n, width, explained=rows, validation=validation,
                                    chunk_rows=self.chunk, dtype=self.dtype,
                                    proj_bytes=self.factor_bytes)


def logra_estimate(z: _Sizes) -> PathEstimate:
    """The phases of :class:`LoGra` for the sizes ``z`` (see ``LoGra.memory_estimate``)."""
    width, rows = sum(z.widths), max(z.m, z.v)
    item = torch.empty(0, dtype=z.dtype).element_size()
    fix = {"parameters": 2 * z.p * item}  # the model's, not the features' width
    phases = _joint_phases(z, width, item) if z.joint else _layer_phases(z, width, item)
    phases = {name: {**parts, **fix} for name, parts in phases.items()}
    if rows:
        phases["explained"]["explained feature chunks"] = rows * width * item
    eig = (z.block(width) if z.joint else max((z.block(w) for w in z.widths),
                                               key=lambda est: est.eig_size))
    largest = max(max(pair) for pair in z.sides)
    knobs = [Knob("a smaller per-layer factor dimension, proj_dim <= {value:,} (now {now:,})",
                  z.k or largest, lambda k: logra_estimate(replace(z, k=k)))]
    knobs += explained_knob(lambda j: logra_estimate(replace(z, m=j)), z.m)
    advice = ()
    if z.joint and len(z.sides) > 1:
        advice = ("one Fisher block per layer, params={'blocks': 'layer'} (each layer's "
                  "eigensystem on its own width instead of one on all of them)",)
    return PathEstimate("logra", z.n, z.m, phases, advice=advice, knobs=tuple(knobs),
                        eig_size=eig.eig_size, form=eig.form)


def _joint_phases(z: _Sizes, width: int, item: int) -> dict[str, dict[str, int]]:
    """One eigensystem over all W features: IFFIM's phases, the features' chunks beside
    their concatenation, and the scores as ``LambdaPath.scores`` makes them."""
    est = z.block(width, z.m, z.v)
    phases = {k: dict(v) for k, v in est.phases.items() if k != "scores"}
    phases["training gradients"]["feature chunks"] = z.n * width * item
    if z.m:
        phases["scores"] = {"projection matrix": z.factor_bytes, **est.fitted,
                            "validation coordinates": z.v * est.kept * EIG_ITEMSIZE,
                            "explained coordinates": z.m * est.kept * EIG_ITEMSIZE,
                            **lambda_path_scores(z.m, z.n, est.kept)}
    return phases


def _layer_phases(z: _Sizes, width: int, item: int) -> dict[str, dict[str, int]]:
    """One eigensystem per layer, fitted in turn on its columns of the [n, W] features (the
    earlier layers' kept), then an ensemble path over them per explained set."""
    e, n, rows = EIG_ITEMSIZE, z.n, max(z.m, z.v)
    blocks = [z.block(w) for w in z.widths]
    features = {"training gradients": n * width * item}  # every block's rows: views of them
    kernel = any(b.form == "kernel" for b in blocks)
    kept = [sum(v for k, v in b.fitted.items() if k != "training gradients") for b in blocks]
    total_k = sum(b.kept for b in blocks)
    held = {**features, "projection matrix": z.factor_bytes}
    phases = {"training gradients": {**held, "feature chunks": n * width * item,
                                     "gradients in flight": 2 * min(z.chunk, n) * width * item}}
    for name in ("accumulation", "eigendecomposition", "training coordinates"):
        phases[name] = max(({**b.phases[name], **features,
                             "earlier layers' eigensystems": sum(kept[:i])}
                            for i, b in enumerate(blocks)), key=lambda d: sum(d.values()))
    systems = {**(held if kernel else {"projection matrix": z.factor_bytes}),
               "eigensystems": sum(kept),
               "validation path": (z.v * total_k * 2 + n * total_k) * e if z.v else 0}
    if rows:
        phases["explained"] = {**systems, "explained features": rows * width * item,
                               "explained features (float64, one layer)": rows * max(z.widths) * e,
                               "explained coordinates": rows * total_k * e}
        if kernel:  # the kernel form maps them through chunks of the training features
            chunk = min(2048, n)
            phases["explained"].update({"row chunk (float64)": chunk * max(z.widths) * e,
                                        "V G^T block": rows * chunk * e})
        phases["ensemble"] = {**systems, "explained coordinates": rows * total_k * e,
                              **ensemble_parts(n, rows, total_k, building=True)}
    if z.m:
        phases["scores"] = {**systems, "explained coordinates": z.m * total_k * e,
                            **ensemble_parts(n, z.m, total_k, building=False),
                            **lambda_path_scores(z.m, n, total_k)}
    return phases
