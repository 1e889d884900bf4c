"""Plots of results. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["plot_accuracy_by_layer"]


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
