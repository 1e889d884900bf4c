"""Plots of results. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["plot_accuracy_by_layer", "plot_compression_by_layer", "plot_diffusion_spectra", "plot_spectral_gap",
           "plot_probe_metrics_by_layer", "plot_spectrum_by_layer", "plot_cka_heatmap", "short_site_labels"]


def plot_accuracy_by_layer(
    metrics: pd.DataFrame,
    path: str | Path | None = None,
    *,
    chance: float | None = None,
    title: str = "Probe accuracy by layer",
    ax: Any = None,
) -> Any:
    """Test accuracy against layer, one line per (site kind, pooling), with error bars from
    ``accuracy_lo`` to ``accuracy_hi`` where ``metrics`` has them (bootstrap intervals); with a
    ``baseline_accuracy`` column (``baseline="random_init"``), the random-init copy's
    accuracy beside each line, dashed in the same color.

    Args:
        metrics: ``runner.metrics`` (needs ``layer``, ``accuracy``, ``pool``, ``site``).
        path: Save the figure here (PNG, 150 dpi) when given.
        chance: Draw a dashed line at this accuracy (e.g. the majority-class share).
        title: Axes title.
        ax: Draw into these axes instead of a new figure.

    Returns:
        The matplotlib ``Figure``.
    """
    fig, ax = _axes(ax)
    _lines_by_kind(ax, _layer_frame(metrics), "accuracy")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
    ax.set_xlabel("layer")
    ax.set_ylabel("test accuracy")
    return _finish(fig, ax, title, path)


def plot_compression_by_layer(metrics: pd.DataFrame, path: str | Path | None = None, *,
                              title: str = "Online-code compression by layer", ax: Any = None) -> Any:
    """Compression (``uniform_bits / codelength_bits``: how many times shorter the probe's
    online code of its first-epoch training labels is than the uniform code) against layer,
    one line per (site kind, pooling), the random-init copy's (``baseline_compression``)
    dashed beside it.

    Args:
        metrics: ``runner.metrics`` with ``site``, ``pool``, ``layer`` and ``compression``.
        path: Save the figure here (PNG, 150 dpi) when given.
        title: Axes title.
        ax: Draw into these axes instead of a new figure.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ValueError: no ``compression`` column (the probes measured no online codelength),
            or no probe with a layer index.
    """
    if "compression" not in metrics:
        raise ValueError("metrics has no 'compression' column: no online codelength was measured")
    fig, ax = _axes(ax)
    _lines_by_kind(ax, _layer_frame(metrics), "compression")
    ax.axhline(1.0, color="grey", linewidth=0.8, label="uniform code")
    _integer_layers(ax)
    ax.set_ylabel("compression (uniform / online bits)")
    return _finish(fig, ax, title, path)


def _layer_frame(metrics: pd.DataFrame) -> pd.DataFrame:
    """The probes with a layer index, each with its site ``kind`` (:func:`_site_kind`)."""
    frame = metrics.dropna(subset=["layer"]).copy()
    if frame.empty:
        raise ValueError("no probe has a layer index to plot against; metrics['layer'] is empty")
    frame["kind"] = [_site_kind(s, layer) for s, layer in zip(frame["site"], frame["layer"])]
    return frame


def _axes(ax: Any) -> tuple[Any, Any]:
    """``(figure, axes)``: ``ax`` and its figure, or a new figure of the by-layer size."""
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 3.8), layout="constrained")


def _lines_by_kind(ax: Any, frame: pd.DataFrame, column: str) -> None:
    """``column`` against layer, one line per (site kind, pooling), with error bars from
    ``<column>_lo``/``<column>_hi`` where present, and the random-init copy's
    ``baseline_<column>`` dashed in the line's color where present."""
    bars = {f"{column}_lo", f"{column}_hi"} <= set(frame.columns)
    for (kind, pool), group in frame.groupby(["kind", "pool"], sort=True):
        group = group.sort_values("layer")
        layer = group["layer"].astype(int)
        color = _line(ax, layer, group[column], (group[f"{column}_lo"], group[f"{column}_hi"]) if bars else None,
                      marker="o", label=f"{kind} ({pool})")
        if f"baseline_{column}" in group:
            ax.plot(layer, group[f"baseline_{column}"], linestyle="--", marker=".", color=color,
                    label=f"{kind} ({pool}), random init")


def _finish(fig: Any, ax: Any, title: str, path: str | Path | None) -> Any:
    """Title, grid and legend; the figure saved to ``path`` (PNG, 150 dpi) when given."""
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
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers and steps are whole numbers
    ax.set_ylabel("spectral gap 1 - λ₂")
    ax.set_title(f"Spectral gap by {x}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig


def _integer_layers(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _site_kind(site: str, layer: Any) -> str:
    """The site with its block index replaced by ``*`` (a line label: ``model.layers.*.output``)."""
    return site.replace(f".{int(layer)}.", ".*.", 1)


def plot_probe_metrics_by_layer(
    metrics: pd.DataFrame,
    columns: Sequence[str] = ("accuracy",),
    *,
    chance: float | None = None,
    title: str = "Probe metrics by layer",
) -> Any:
    """One panel per metric against layer, one line per (site kind, probe variant).

    A probe's variant is its ``variant`` column (the swept settings of an experiment),
    else its pooling. With a ``seed`` column holding several seeds, each line is the
    mean over seeds with a band from the lowest to the highest seed; with one seed, a
    metric with ``<metric>_lo``/``<metric>_hi`` columns (bootstrap intervals) gets error bars.
    Where a ``baseline_<column>`` is present (``baseline="random_init"``), the random-init
    copy's values are drawn dashed in the line's color.

    Args:
        metrics: Probe metrics with ``site``, ``layer`` and the ``columns`` (rows with
            no layer are left out; the caller says so).
        columns: Metrics to draw, e.g. ``("accuracy", "selectivity")``.
        chance: A dashed line at this value on the ``accuracy`` panel.
        title: Figure title.

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    frame = metrics.dropna(subset=["layer"]).copy()
    if frame.empty:
        raise ValueError("no probe has a layer index to plot against; metrics['layer'] is empty")
    frame["layer"] = frame["layer"].astype(int)
    variant = frame["variant"] if "variant" in frame and (frame["variant"] != "-").any() else frame["pool"]
    frame["line"] = [f"{_site_kind(s, l)} {v}" for s, l, v in zip(frame["site"], frame["layer"], variant)]
    fig, axes = plt.subplots(1, len(columns), figsize=(5.2 * len(columns), 3.8), layout="constrained", squeeze=False)
    seeds = frame["seed"].nunique() if "seed" in frame else 1
    for ax, column in zip(axes[0], columns):
        bars = seeds == 1 and {f"{column}_lo", f"{column}_hi"} <= set(frame.columns)
        cols = [column, f"{column}_lo", f"{column}_hi"] if bars else [column]
        stats = frame.groupby(["line", "layer"])[cols].agg(["mean", "min", "max"]).reset_index()
        baseline = (frame.groupby(["line", "layer"])[f"baseline_{column}"].mean()
                    if f"baseline_{column}" in frame else None)
        for line, group in stats.groupby("line", sort=True):
            interval = (group[(f"{column}_lo", "mean")], group[(f"{column}_hi", "mean")]) if bars else None
            color = _line(ax, group["layer"], group[(column, "mean")], interval, marker="o", markersize=3, label=line)
            if seeds > 1:
                ax.fill_between(group["layer"], group[(column, "min")], group[(column, "max")], alpha=0.2)
            if baseline is not None:
                ax.plot(group["layer"], baseline.loc[line].reindex(group["layer"]).to_numpy(), linestyle="--",
                        color=color, label=f"{line}, random init")
        _panel(ax, column, chance)
    handles, labels = axes[0][0].get_legend_handles_labels()
    axes[0][0].legend(handles, labels, fontsize="x-small", ncol=1 + len(labels) // 12)
    fig.suptitle(title)
    return fig


def plot_spectrum_by_layer(
    geometry_metrics: pd.DataFrame,
    layers: Mapping[str, int | None],
    columns: Sequence[str] = ("d_pr", "d_entropy", "stable_rank", "top1_share"),
    *,
    title: str = "Covariance spectrum metrics by layer",
) -> Any:
    """Spectrum metrics against layer, one panel per metric, one line per site kind.

    Args:
        geometry_metrics: ``Geometry.metrics`` (indexed by site).
        layers: ``{site: layer index or None}``; sites without a layer are left out.
        columns: Metrics to draw.
        title: Figure title.

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    frame = geometry_metrics.copy()
    frame["layer"] = [layers.get(s) for s in frame.index]
    frame = frame.dropna(subset=["layer"])
    if frame.empty:
        raise ValueError("no geometry site has a layer index to plot against")
    frame["kind"] = [_site_kind(s, l) for s, l in zip(frame.index, frame["layer"])]
    fig, axes = plt.subplots(1, len(columns), figsize=(3.3 * len(columns), 3.2), layout="constrained",
                             squeeze=False)
    for ax, column in zip(axes[0], columns):
        for kind, group in frame.groupby("kind", sort=True):
            group = group.sort_values("layer")
            ax.plot(group["layer"].astype(int), group[column], marker="o", markersize=3, label=kind)
        _integer_layers(ax)
        ax.set_title(column, fontsize="medium")
        ax.grid(alpha=0.3)
        values = frame[column].to_numpy(float)
        values = values[np.isfinite(values) & (values > 0)]
        if column != "top1_share" and values.size and values.max() > 20 * values.min():
            ax.set_yscale("log")  # dimensions spanning orders of magnitude (massive activations)
    axes[0][0].legend(fontsize="x-small")
    fig.suptitle(title)
    return fig


def short_site_labels(sites: Sequence[str]) -> list[str]:
    """Site strings without the dotted prefix and suffix they all share
    (``model.layers.3.output`` -> ``3`` when every site is a block output)."""
    if len(sites) < 2:
        return list(sites)
    parts = [s.split(".") for s in sites]
    head = 0
    while all(len(p) > head + 1 for p in parts) and len({p[head] for p in parts}) == 1:
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 for p in parts) and len({p[-1 - tail] for p in parts}) == 1:
        tail += 1
    return [".".join(p[head:len(p) - tail]) for p in parts]


def plot_cka_heatmap(matrix: pd.DataFrame, *, title: str = "Linear CKA between sites") -> Any:
    """A site-by-site heatmap of a symmetric similarity matrix (values in [0, 1]).

    Args:
        matrix: Square DataFrame with sites as index and columns, in depth order.
        title: Axes title.

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    labels = short_site_labels(list(matrix.index))
    n = len(labels)
    size = min(9.0, 3.5 + 0.18 * n)
    fig, ax = plt.subplots(figsize=(size + 1.2, size), layout="constrained")
    image = ax.imshow(matrix.to_numpy(float), vmin=0, vmax=1, cmap="magma", interpolation="nearest")
    ticks = np.arange(n)
    fontsize = 8 if n <= 16 else 6
    ax.set_xticks(ticks, labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels, fontsize=fontsize)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                value = matrix.iat[i, j]
                if np.isfinite(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if value > 0.6 else "white")
    fig.colorbar(image, ax=ax, label="linear CKA")
    ax.set_title(title)
    return fig


def _line(ax: Any, x: Any, y: pd.Series, interval: tuple[pd.Series, pd.Series] | None, **style: Any) -> str:
    """A line, with error bars from ``interval = (lo, hi)`` when given (a bootstrap interval
    need not contain its point estimate, so a bar starts at the point where it does not);
    returns the line's color."""
    if interval is None:
        return ax.plot(x, y, **style)[0].get_color()
    lo, hi = interval
    err = [(y - lo).clip(lower=0).fillna(0), (hi - y).clip(lower=0).fillna(0)]
    return ax.errorbar(x, y, yerr=err, capsize=2, **style).lines[0].get_color()


def _panel(ax: Any, column: str, chance: float | None) -> None:
    """A metric panel's reference lines (chance on accuracy, zero on selectivity), labels and grid."""
    if chance is not None and column == "accuracy":
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
    if column == "selectivity":
        ax.axhline(0, color="grey", linewidth=0.8)
    _integer_layers(ax)
    ax.set_ylabel(column)
    ax.grid(alpha=0.3)
