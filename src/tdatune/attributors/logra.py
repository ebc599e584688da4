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

from typing import Any

import torch

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
from tdatune.features.layerwise import layer_factors, layerwise_grads, linear_layers


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
