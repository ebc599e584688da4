"""Figures. Matplotlib with the Agg backend, written atomically as PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from tdatune.utils.atomic import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` as PNG atomically and close it."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_lambda_curve(
    path: str | Path, lambdas: Sequence[float], lds: Sequence[float], lds_sem: Sequence[float],
    xi_mean: Sequence[float], *, selected: float | Sequence[float], lds_selected: float, best: float,
    baselines: dict[str, tuple[float, float]], threshold: float, title: str,
    note: str | None = None, calibrated: tuple[float, float] | None = None,
    other: tuple[str, float, float] | None = None,
) -> Path:
    """LDS (with a standard-error band) and mean xi against lambda on a log axis, with the
    selected lambda, the grid best and the quantile baselines marked; ``note`` (the selection's
    reliability) is written under the title, ``calibrated`` (lambda, LDS) marks a few-retrain
    selection; ``other`` (name, lambda, LDS) marks the rule not used (xi's lambda beside the
    default's)."""
    import numpy as np

    plt = _pyplot()
    lam = np.asarray(lambdas)
    mean = np.asarray(lds)
    sem = np.nan_to_num(np.asarray(lds_sem))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(lam, mean, color="tab:blue", lw=2, label="LDS (test)")
    ax.fill_between(lam, mean - sem, mean + sem, color="tab:blue", alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("damping lambda (mean-loss scale)")
    ax.set_ylabel("LDS", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(lam, xi_mean, color="tab:orange", lw=1.5, label="mean surrogate xi (validation)")
    ax2.axhline(threshold, color="tab:orange", ls=":", lw=1)
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("mean xi", color="tab:orange")
    if isinstance(selected, Sequence):  # one damping per layer: the band they span
        ax.axvspan(min(selected), max(selected), color="tab:green", alpha=0.2,
                   label=f"selected, {len(selected)} layers (LDS {lds_selected:.3f})")
    else:
        ax.axvline(selected, color="tab:green", lw=2,
                   label=f"selected {selected:.2e} (LDS {lds_selected:.3f})")
    ax.axvline(best, color="black", ls=":", lw=1.5, label=f"grid best {best:.2e}")
    if other is not None:
        ax.axvline(other[1], color="tab:orange", ls="-.", lw=1.2,
                   label=f"{other[0]} {other[1]:.2e} (LDS {other[2]:.3f})")
    if calibrated is not None:
        ax.axvline(calibrated[0], color="tab:purple", ls="-.", lw=1.5,
                   label=f"calibrated {calibrated[0]:.2e} (LDS {calibrated[1]:.3f})")
    for q, (lam_q, _lds_q) in baselines.items():
        ax.axvline(lam_q, color="gray", ls="--", lw=0.8)
        ax.annotate(f"q={q}", (lam_q, 0.02), xycoords=("data", "axes fraction"), fontsize=7,
                    rotation=90, color="gray")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower left",
              bbox_to_anchor=(0.0, 0.12))
    ax.set_title(title if note is None else f"{title}\n{note}", fontsize=10 if note is None else 8)
    return save_figure(fig, path)
