"""report.html: one self-contained page per run, rebuilt from the run's files.

An experiment run (:mod:`lm_probe.app.experiment`) writes its results as plain files
(``metrics.csv``, ``geometry/``, ``gauges/``, ``run.json``); :func:`load_run` reads them
back and :func:`write_report` turns them into one HTML file that needs nothing else: the
figures are PNGs inlined as ``data:`` URIs, the style is inline CSS, and nothing is
fetched from the network (no fonts, scripts or links outside the page). So
``lm-probe report RUN_DIR`` rebuilds the same page from the files alone, and the page
can be mailed or archived as it is.

Sections: the run's metadata; probe accuracy by layer (with selectivity where control
tasks ran) and the text baselines; covariance spectrum metrics by layer; a site-by-site linear CKA heatmap;
diffusion spectra and spectral gaps; the tables behind them. A section whose consumer did
not run says so. A small inline script counts the figures that decoded and writes the
count to ``<body data-figures="loaded/total">``, which the tests read from headless Chromium.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..consumers.geometry import Geometry
from ..consumers.geometry_results import GeometryResults

__all__ = ["RunRecord", "load_run", "render_report", "write_report"]


@dataclass
class RunRecord:
    """What a report shows, as read from a run folder.

    Attributes:
        folder: The run folder.
        meta: ``run.json`` (model, data, sites, seeds, consumers, versions, times).
        config_text: The experiment file as given.
        metrics: Probe metrics (``metrics.csv``), or None without probes.
        baselines: The text baselines (``baselines.csv``), or None.
        geometry: The geometry bundle, or None.
        cka: The site-by-site CKA matrix, or None.
        gauge: The gauge trajectory with an ``eigenvalues`` array per row, or None.
    """

    folder: Path
    meta: dict[str, Any]
    config_text: str = ""
    metrics: pd.DataFrame | None = None
    baselines: pd.DataFrame | None = None
    geometry: GeometryResults | None = None
    cka: pd.DataFrame | None = None
    gauge: pd.DataFrame | None = None
    figures: list[str] = field(default_factory=list)


def load_run(folder: str | Path) -> RunRecord:
    """Read a run folder written by ``lm-probe run``.

    Raises:
        FileNotFoundError: ``folder`` has no ``run.json`` (it is not a run folder), or a
            consumer listed in it left no files.
    """
    folder = Path(folder)
    if not (folder / "run.json").is_file():
        raise FileNotFoundError(f"{folder} is not a run folder: it has no run.json (write one with lm-probe run)")
    meta = json.loads((folder / "run.json").read_text())
    record = RunRecord(folder, meta)
    if (folder / "experiment.toml").is_file():
        record.config_text = (folder / "experiment.toml").read_text()
    ran = set(meta.get("consumers", []))
    if "probes" in ran:
        record.metrics = pd.read_csv(_needed(folder / "metrics.csv"), index_col=0)
        if (folder / "baselines.csv").is_file():
            record.baselines = pd.read_csv(folder / "baselines.csv")
    if "geometry" in ran:
        record.geometry = Geometry.load(_needed(folder / "geometry"))
        record.cka = pd.read_csv(_needed(folder / "geometry" / "cka_matrix.csv"), index_col=0)
    if "gauges" in ran:
        record.gauge = _read_gauge(folder / "gauges")
    return record


def _needed(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; the run's run.json says it was written")
    return path


def _read_gauge(folder: Path) -> pd.DataFrame:
    trajectory = pd.read_csv(_needed(folder / "trajectory.csv"))
    eigen = pd.read_csv(_needed(folder / "eigenvalues.csv"))
    arrays = {key: group.sort_values("index")["eigenvalue"].to_numpy()
              for key, group in eigen.groupby(["step", "site"])}
    trajectory["eigenvalues"] = [arrays.get((step, site), np.array([]))
                                 for step, site in zip(trajectory["step"], trajectory["site"])]
    return trajectory


def write_report(folder: str | Path, path: str | Path | None = None) -> Path:
    """Write ``report.html`` for a run folder (see the module docstring).

    Args:
        folder: A run folder written by ``lm-probe run``.
        path: Where to write (default: ``folder/report.html``).

    Returns:
        The path written.
    """
    record = load_run(folder)
    path = Path(path) if path is not None else Path(folder) / "report.html"
    path.write_text(render_report(record), encoding="utf-8")
    return path


def render_report(record: RunRecord) -> str:
    """The report's HTML for a :class:`RunRecord`."""
    meta = record.meta
    sections = [_metadata_section(record), _probe_section(record), _geometry_section(record),
                _gauge_section(record)]
    title = f"lm_probe report: {meta.get('name', record.folder.name)}"
    return _PAGE.format(title=html.escape(title), css=_CSS, script=_SCRIPT, n_figures=len(record.figures),
                        body="\n".join(sections))


# ---------------------------------------------------------------------------- sections
def _metadata_section(record: RunRecord) -> str:
    meta, model, data = record.meta, record.meta.get("model", {}), record.meta.get("data", {})
    rows = [
        ("experiment", meta.get("experiment") or "-"),
        ("started (UTC)", meta.get("started", "-")),
        ("duration", f"{meta.get('duration_s', float('nan')):.1f} s"),
        ("seeds", ", ".join(map(str, meta.get("seeds", [])))),
        ("model", f"{model.get('name')} ({model.get('class')}, {model.get('num_hidden_layers')} layers, "
                  f"hidden size {model.get('hidden_size')})"),
        ("data", data.get("source", "-")),
    ]
    if "n_examples" in data:
        rows.append(("examples", f"{data['n_examples']} used: train {data['n_train']} ({data['n_fit']} fit, "
                                 f"{data['n_validation']} validation), test {data['n_test']}"))
    if data.get("classes"):
        rows.append(("classes", ", ".join(f"{k}: {v}" for k, v in data["classes"].items())))
    rows += [
        ("columns", f"text {data.get('text_column')!r}, label {data.get('label_column')!r}; max_length "
                    f"{data.get('max_length')}, batch_size {data.get('batch_size')}"),
        ("sites", f"{len(meta.get('sites', []))}: " + ", ".join(meta.get("sites", []))),
        ("probes", f"{len(meta.get('probes', []))} ({meta.get('task', 'classification')})"
                   + (", each with a control-task twin on the same traces" if _has_control(record) else "")),
        ("consumers", ", ".join(meta.get("consumers", [])) or "-"),
        ("versions", ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())),
    ]
    if meta.get("seed_folders"):
        links = ", ".join(f'<a href="{html.escape(f)}/report.html">{html.escape(f)}</a>'
                          for f in meta["seed_folders"])
        rows.append(("per-seed reports", links))
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{v if k == 'per-seed reports' else html.escape(str(v))}"
                    f"</td></tr>" for k, v in rows)
    config = (f"<details><summary>experiment file</summary><pre>{html.escape(record.config_text)}</pre></details>"
              if record.config_text else "")
    return f'<section id="metadata"><h2>Run</h2><table class="meta">{table}</table>{config}</section>'


def _has_control(record: RunRecord) -> bool:
    metrics = record.metrics
    return metrics is not None and "selectivity" in metrics and bool(metrics["selectivity"].notna().all())


def _probe_section(record: RunRecord) -> str:
    metrics, meta = record.metrics, record.meta
    head = '<section id="probes"><h2>Probes by layer</h2>'
    if metrics is None:
        return head + "<p class=note>No probes ran in this experiment ([probes] enabled = false).</p></section>"
    regression = meta.get("task") == "regression"
    columns = ["r2"] if regression else ["accuracy"]
    has_control = "selectivity" in metrics and metrics["selectivity"].notna().any()
    if has_control:
        columns.append("selectivity")
    with_layer = metrics["layer"].notna()
    parts = [head]
    if with_layer.any():
        from .plots import plot_probe_metrics_by_layer

        seeds = metrics["seed"].nunique() if "seed" in metrics else 1
        fig = plot_probe_metrics_by_layer(metrics, columns, chance=meta.get("chance_accuracy"),
                                          title=f"Test {' and '.join(columns)} by layer"
                                          + (f" (mean over {seeds} seeds, band: min to max)" if seeds > 1 else ""))
        caption = (f"Test {columns[0]} of each probe by layer" + (
            "; selectivity = accuracy - control-task accuracy (Hewitt and Liang)" if has_control else
            "; no control tasks ran (set control = true in [probes] for selectivity)") +
            (f"; error bars: {100 * meta.get('ci', 0.95):g}% percentile bootstrap interval over test examples"
             if seeds == 1 and f"{columns[0]}_lo" in metrics else "") +
            (f"; dashed: majority-class accuracy {meta['chance_accuracy']:.3f}" if meta.get("chance_accuracy")
             is not None else "") + ("; dashed lines: the same probes on a randomly initialized copy of the "
                                     "model" if f"baseline_{columns[0]}" in metrics else "") + ".")
        parts.append(_figure(record, fig, "probe metrics by layer", caption))
        parts.append(_compression_figure(record))
    if (~with_layer).any():
        parts.append(f"<p class=note>{int((~with_layer).sum())} probes read sites without a layer index and are "
                     "in the table only.</p>")
    shown = [c for c in ("pool", "layer", "accuracy", "accuracy_lo", "accuracy_hi", "baseline_accuracy",
                         "selectivity", "selectivity_lo", "selectivity_hi", "control_accuracy", "f1", "matthews",
                         "auroc", "auroc_lo", "auroc_hi", "ece", "recall_at_fpr", "r2", "r2_lo", "r2_hi", "mse",
                         "pearson", "loss", "n_steps", "stop_reason") if c in metrics]
    if "seed" in metrics:
        shown.insert(0, "seed")
    parts.append(_table(metrics[shown], "metrics"))
    if record.baselines is not None:
        base = record.baselines
        shown = [c for c in ("seed", "baseline", "target", "input", "accuracy", "f1", "matthews", "r2", "mse",
                             "loss", "n_train", "n_scored", "score_error") if c in base]
        parts.append(_table(base[shown], "text baselines (no model: fit on the probes' training rows, scored on "
                                         "their test rows)", index=False))
    return "\n".join(parts) + "</section>"


def _compression_figure(record: RunRecord) -> str:
    """Compression by layer, trained and random-init (``""`` without a compression column)."""
    if "compression" not in record.metrics or not record.metrics["compression"].notna().any():
        return ""
    from .plots import plot_compression_by_layer

    fig = plot_compression_by_layer(record.metrics)
    return _figure(record, fig, "compression by layer",
                   "Online-code compression of the test labels (uniform bits / the probe's online codelength) "
                   "by layer" + ("; dashed: the same probes on a randomly initialized copy of the model"
                                 if "baseline_compression" in record.metrics else "") + ".")


def _geometry_section(record: RunRecord) -> str:
    head = '<section id="geometry"><h2>Geometry</h2>'
    if record.geometry is None:
        reason = ("see each seed's report" if record.meta.get("seed_folders") else
                  "no [geometry] table in the experiment file")
        return head + f"<p class=note>Geometry did not run here ({reason}).</p></section>"
    from .plots import plot_cka_heatmap, plot_spectrum_by_layer

    geo, layers = record.geometry, record.meta.get("site_layers", {})
    parts = [head]
    frame = geo.metrics
    with_layer = [s for s in frame.index if layers.get(s) is not None]
    if with_layer:
        fig = plot_spectrum_by_layer(frame, layers)
        parts.append(_figure(record, fig, "spectrum metrics by layer",
                             f"Covariance spectrum of {geo.metadata.get('n_rows')} rows "
                             f"(pool {geo.metadata.get('pool')!r}) at each site: participation ratio d_pr, entropy "
                             "dimension, stable rank (log scale when they span orders of magnitude) and the top "
                             "eigenvalue's share of the variance."))
    missing = len(frame) - len(with_layer)
    if missing:
        parts.append(f"<p class=note>{missing} sites without a layer index are in the table only.</p>")
    if record.cka is not None and len(record.cka) > 1:
        n_sample = min(int(geo.metadata.get("n_rows", 0)), int(geo.metadata.get("sample_limit", 0)))
        fig = plot_cka_heatmap(record.cka)
        parts.append(_figure(record, fig, "CKA heatmap",
                             f"Linear CKA between every pair of sites, from the paired reservoir sample of "
                             f"{n_sample} rows (all rows when there are at most sample_limit); the CKA of "
                             "consecutive sites from the full streamed moments is in the novelty table."))
    columns = [c for c in ("n_rows", "d_pr", "d_entropy", "stable_rank", "top1_share", "k90", "cos_sim_mean",
                           "reason") if c in frame]
    parts.append(_table(frame[columns], "geometry metrics"))
    parts.append(_table(geo.novelty[[c for c in ("site_a", "site_b", "linear_cka", "layer_cosine_sim",
                                                 "feature_subspace_novelty") if c in geo.novelty]],
                        "novelty (consecutive sites)", index=False))
    return "\n".join(parts) + "</section>"


def _gauge_section(record: RunRecord) -> str:
    head = '<section id="gauges"><h2>Diffusion gauges</h2>'
    trajectory = record.gauge
    if trajectory is None:
        reason = ("see each seed's report" if record.meta.get("seed_folders") else
                  "no [gauges] table in the experiment file")
        return head + f"<p class=note>No diffusion gauge ran here ({reason}).</p></section>"
    from .plots import plot_diffusion_spectra, plot_spectral_gap

    n = int(trajectory["n_samples"].iloc[0]) if "n_samples" in trajectory else "?"
    figures = [_figure(record, plot_diffusion_spectra(trajectory), "diffusion spectra",
                       f"Top eigenvalues of each site's diffusion operator on the same {n} examples.")]
    if trajectory["layer"].notna().any():
        figures.append(_figure(record, plot_spectral_gap(trajectory, x="layer"), "spectral gap by layer",
                               "Spectral gap 1 - λ₂ by layer: a small gap means slow mixing (well-separated "
                               "clusters)."))
    else:
        figures.append("<p class=note>No gauge site has a layer index: the gaps are in the table only.</p>")
    parts = [head, f'<div class="row">{"".join(figures)}</div>']
    summary = trajectory[[c for c in ("site", "layer", "spectral_gap", "entropy") if c in trajectory]].copy()
    summary["lambda_2"] = [e[1] if len(e) > 1 else np.nan for e in trajectory["eigenvalues"]]
    parts.append(_table(summary, "gauge summary", index=False))
    return "\n".join(parts) + "</section>"


# ---------------------------------------------------------------------------- html pieces
def _figure(record: RunRecord, fig: Any, alt: str, caption: str) -> str:
    """A figure as an inline PNG (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    record.figures.append(alt)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<figure><img class="figure" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(frame: pd.DataFrame, caption: str, index: bool = True) -> str:
    body = frame.to_html(index=index, float_format=lambda x: f"{x:.4g}", na_rep="-", border=0, classes="data",
                         escape=True)
    return (f"<details open><summary>{html.escape(caption)} ({len(frame)} rows)</summary>"
            f'<div class="scroll">{body}</div></details>')


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table.meta th { text-align: left; padding-right: 1em; vertical-align: top; white-space: nowrap; }
table.meta td { word-break: break-word; }
table.data { border-collapse: collapse; font-size: .85em; margin: .5em 0; }
table.data th, table.data td { padding: .2em .6em; border-bottom: 1px solid #eee; text-align: right; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
div.row { display: flex; flex-wrap: wrap; gap: 1em; } div.row figure { flex: 1 1 480px; margin: 1em 0 0; }
div.scroll { overflow-x: auto; }
figcaption { color: #555; font-size: .9em; } p.note { color: #8a5a00; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; } summary { cursor: pointer; color: #335; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var images = document.querySelectorAll("img.figure"), loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { loaded++; }
  }
  document.body.setAttribute("data-figures", loaded + "/" + images.length);
});
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="lm-probe-figures" content="{n_figures}">
<style>{css}</style><script>{script}</script></head>
<body data-figures="pending"><h1>{title}</h1>
{body}
</body></html>
"""
