"""Plots of results. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["plot_accuracy_by_layer", "plot_diffusion_spectra", "plot_spectral_gap"]


def plot_accuracy_by_layer(
    metrics: pd.DataFrame,
    path: str | Path | None = None,
    *,
    chance: float | None = None,
    title: str = "Probe accuracy by layer",
    ax: Any = None,
) -> Any:
    """Test accuracy against layer, one line per (site kind, pooling).

    Args:
        metrics: ``runner.metrics`` (needs ``layer``, ``accuracy``, ``pool``, ``site``).
        path: Save the figure here (PNG, 150 dpi) when given.
        chance: Draw a dashed line at this accuracy (e.g. the majority-class share).
        title: Axes title.
        ax: Draw into these axes instead of a new figure.

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    frame = metrics.dropna(subset=["layer"]).copy()
    if frame.empty:
        raise ValueError("no probe has a layer index to plot against; metrics['layer'] is empty")
    # the site with its block index removed names the kind of site: model.layers.*.output
    frame["kind"] = [s.replace(f".{int(layer)}.", ".*.", 1) for s, layer in zip(frame["site"], frame["layer"])]
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    else:
        fig = ax.figure
    for (kind, pool), group in frame.groupby(["kind", "pool"], sort=True):
        group = group.sort_values("layer")
        ax.plot(group["layer"].astype(int), group["accuracy"], marker="o", label=f"{kind} ({pool})")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
    ax.set_xlabel("layer")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig


def plot_diffusion_spectra(trajectory: pd.DataFrame, step: int | None = None, path: str | Path | None = None,
                           ax: Any = None) -> Any:
    """Top eigenvalues of each site's diffusion operator at one step (default: the last).

    Args:
        trajectory: ``gauge.trajectory``.
        step: The step to draw.
        path: Save the figure here when given.
        ax: Draw into these axes.

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    step = int(trajectory["step"].max()) if step is None else step
    rows = trajectory[trajectory["step"] == step]
    if rows.empty:
        raise ValueError(f"no measurement at step {step}; steps are {sorted(trajectory['step'].unique())}")
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    else:
        fig = ax.figure
    colors = plt.cm.viridis(np.linspace(0, 1, len(rows)))
    for color, (_, row) in zip(colors, rows.iterrows()):
        ax.plot(np.arange(1, len(row["eigenvalues"]) + 1), row["eigenvalues"], color=color, label=row["site"])
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"Diffusion operator spectra at step {step}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig


def plot_spectral_gap(trajectory: pd.DataFrame, x: str = "layer", path: str | Path | None = None,
                      ax: Any = None) -> Any:
    """Spectral gap against layer (one line per step) or against step (one line per site).

    Args:
        trajectory: ``gauge.trajectory``.
        x: ``"layer"`` or ``"step"``.
        path: Save the figure here when given.
        ax: Draw into these axes.

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    if x not in ("layer", "step"):
        raise ValueError(f"x must be 'layer' or 'step', got {x!r}")
    lines = "step" if x == "layer" else "site"
    frame = trajectory.dropna(subset=[x])
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    else:
        fig = ax.figure
    for key, group in frame.groupby(lines, sort=True):
        group = group.sort_values(x)
        ax.plot(group[x], group["spectral_gap"], marker="o", label=f"{lines} {key}")
    ax.set_xlabel(x)
    ax.set_ylabel("spectral gap 1 - λ₂")
    ax.set_title(f"Spectral gap by {x}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig
