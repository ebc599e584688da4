"""K-FAC and EK-FAC influence: score = -v^T (F_K + lambda I)^-1 g_i with F_K the Kronecker-
factored Fisher of :mod:`tdatune.curvature.kfac`, scored along a damping path.

``fit`` runs the covariance pass (and, for EK-FAC, the eigenvalue-correction pass) once;
every damping afterwards changes only 1 / (Lambda + lambda) in the Kronecker eigenbasis, so a
whole lambda-path, the surrogate indicator xi and Algorithm 1 come from one fit. The path's
blocks are the layers (then one block of the diagonal parameters), so ``score`` takes one
damping per block (a list, ``{layer: value}``, or ``"per_layer"``: Kronfluence's 0.1 x mean
eigenvalue per module; :mod:`tdatune.attributors.damping`), and ``blockwise_predictions``
scores per-block dampings for LDS.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from tdatune.attributors.base import (
    CHECKPOINT,
    AttributionContext,
    Attributor,
    HyperParameter,
    any_int,
    one_of,
)
from tdatune.attributors.damping import block_mean_dampings, check_damping
from tdatune.attributors.lambda_path import LambdaPath, StreamedLambdaPath
from tdatune.attributors.logra import optional_names
from tdatune.curvature.kfac import KroneckerFit, fit_kronecker
from tdatune.data.base import ArrayDataset

COORDS_KEEP_LIMIT = 1 << 26  # training coordinates (n x p float64 numbers) held in memory


class KFAC(Attributor):
    """Influence with the K-FAC Fisher (Kronecker eigenvalues l_S l_A)."""

    name = "kfac"
    strategy = "kfac"
    hyperparameters = (
        HyperParameter("lam", 1e-3, "score", check_damping,
                       "damping added to the Kronecker-factored Fisher (mean-loss scale): a "
                       "number, one per block (layer), {layer: value} or 'per_layer'"),
        HyperParameter("fisher", "empirical", "fit", one_of("empirical", "true"),
                       "empirical (true labels) or true (labels sampled from the model)"),
        HyperParameter("layers", None, "fit", optional_names,
                       "modules whose parameters are attributed (default: all parameters)"),
        HyperParameter("seed", 0, "fit", any_int, "seed of the sampled labels (fisher='true')"),
        CHECKPOINT,
    )

    def _fit(self, context: AttributionContext) -> None:
        model, params = context.model_at(self.params["checkpoint"])
        names = self.params["layers"]
        if names is not None:
            modules = dict(model.named_modules())
            unknown = [n for n in names if n not in modules]
            if unknown:
                raise ValueError(f"{self.name}: unknown module(s) {', '.join(unknown)}; the "
                                 f"model's modules with parameters are: " + ", ".join(
                                     n for n, m in modules.items()
                                     if n and any(True for _ in m.parameters(recurse=False))))
            params = {k: v for k, v in params.items()
                      if any(k.startswith(f"{n}.") for n in names)}
        self._params = params
        self.fit_: KroneckerFit = fit_kronecker(
            context.task, model, params, context.train, strategy=self.strategy,
            fisher=self.params["fisher"], seed=self.params["seed"],
            chunk_size=context.chunk_size, show_progress=context.show_progress)
        self._paths: dict[str, LambdaPath] = {}

    def lambda_path(self, explained: ArrayDataset) -> LambdaPath:
        """The damping path for ``explained`` (training coordinates streamed when large)."""
        ctx = self._require_fit()
        key = explained.fingerprint()
        if key not in self._paths:
            fit = self.fit_
            coords = torch.cat([c for _, c in fit.iter_coords(
                explained, target="output", chunk_size=ctx.chunk_size)])
            if coords.numel() <= COORDS_KEEP_LIMIT:  # float64 unless that is gigabytes
                coords = coords.double()
            sigma = fit.sigma

            def train_chunks() -> Iterator[tuple[int, torch.Tensor]]:
                return fit.iter_coords(ctx.train, target="loss", chunk_size=ctx.chunk_size,
                                       show_progress=ctx.show_progress,
                                       desc=f"{self.name} training coordinates")

            def products(w: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
                return fit.products(w, ctx.train, target="loss", chunk_size=ctx.chunk_size,
                                    show_progress=ctx.show_progress,
                                    desc=f"{self.name} training products")

            def masked_sums(masks: torch.Tensor) -> torch.Tensor:
                return fit.masked_sums(masks, ctx.train, target="loss",
                                       chunk_size=ctx.chunk_size,
                                       show_progress=ctx.show_progress)

            keep = len(ctx.train) * sigma.numel() <= COORDS_KEEP_LIMIT
            self._paths[key] = StreamedLambdaPath(
                sigma, coords, train_chunks, len(ctx.train), sizes=fit.block_sizes, keep=keep,
                products=products, masked_sums=masked_sums, names=fit.block_names)
        return self._paths[key]

    def score(self, explained: ArrayDataset, **values: Any) -> torch.Tensor:
        """Scores [m, n] at ``lam``: one damping, one per block (in ``block_names`` order),
        ``{block name: value}`` (``"*"`` for the rest) or ``"per_layer"``."""
        lam = self.score_params(values)["lam"]
        return self.lambda_path(explained).scores(lam).float()

    @property
    def block_names(self) -> list[str]:
        """The damping blocks: one per Kronecker layer (its module path), then ``diagonal``."""
        return self.fit_.block_names

    def module_heuristic_dampings(self, fraction: float = 0.1) -> list[float]:
        """Kronfluence's heuristic per block: ``fraction`` x the block's mean eigenvalue."""
        self._require_fit()
        return block_mean_dampings(self.fit_.sigma, self.fit_.block_sizes, fraction)


class EKFAC(KFAC):
    """Influence with the eigenvalue-corrected K-FAC Fisher (EK-FAC)."""

    name = "ekfac"
    strategy = "ekfac"
