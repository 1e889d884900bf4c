"""Running a plan and writing what it found.

:func:`run_plan` runs each seed of a :class:`~lm_probe.app.plan.Plan`: ``fit_probes`` on the
seed's runner (probes, geometry and gauge on the same traces), or one ``collect`` pass
when the experiment has no probes. Each run folder then holds:

* ``metrics.csv``: one row per probe (``runner.metrics`` plus ``variant`` and a
  ``setting_<key>`` column per swept setting), in plan order;
* ``baselines.csv``: ``runner.baselines``, the text baselines of each probe task
  (majority class, bag of words...: :mod:`lm_probe.probes.baselines`), without ``support``;
* ``probes/``: the trained probes (``ProbeRunner.load`` reads them back);
* ``geometry/``: the :class:`~lm_probe.Geometry` bundle and ``cka_matrix.csv``
  (linear CKA between every pair of sites, from the geometry's paired reservoir sample);
* ``gauges/``: ``trajectory.csv`` and ``eigenvalues.csv`` (long form);
* ``run.json`` (model, data counts, sites, seeds, versions, times), ``config.json`` (the
  experiment with every default filled in, sites and probe names resolved), a copy of
  the experiment file, and ``report.html`` (:mod:`lm_probe.app.report`), built from these
  files alone.

With several seeds each seed writes a complete run folder ``seed_<s>/``, and the output
folder gets the metrics and baselines of all seeds (a ``seed`` column; each test metric's
mean and standard deviation across the seeds: :func:`seed_summary`) and a report over them.

Under data parallelism (``torchrun ... -m lm_probe run``) every rank runs the plan and rank 0
alone writes these files; the other ranks wait for it at the end.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from loguru import logger

from ..core.distributed import is_writer, wait_for_writer
from ..core.model import model_metadata
from ..core.versions import __version__
from ..functional.metrics import METRIC_COLUMNS, REGRESSION_COLUMNS
from .plan import RUN_FILES, Plan, SeedRun, replay_cache
from .schema import SECTIONS
from .tables import class_counts

__all__ = ["run_plan", "cka_matrix", "resolved_config", "remove_run", "seed_summary"]


def run_plan(plan: Plan) -> list[Path]:
    """Run every seed of a plan and write its outputs (see the module docstring).

    Returns:
        The run folders written (one per seed; with several seeds, the combined folder last).
    """
    exp, source = plan.experiment, plan.runs[0].runner.source
    writer = is_writer(source)  # under torchrun: rank 0 writes, the other ranks only trace
    if plan.overwrite and writer:
        for folder in {exp.out, *(run.out for run in plan.runs)}:
            remove_run(folder)
    written = [_run_seed(plan, run, writer) for run in plan.runs]
    if len(plan.runs) > 1:
        if writer:
            _write_combined(plan, written)
        written.append(exp.out)
    wait_for_writer(source)  # the other ranks end once rank 0 has written every file
    return written


def _run_seed(plan: Plan, run: SeedRun, writer: bool = True) -> Path:
    exp, started = plan.experiment, datetime.now(timezone.utc)
    clock = time.perf_counter()
    logger.info("seed {}: {} probes on {} training examples", run.seed, len(plan.probes), len(run.train))
    data = exp.data
    if plan.probes:
        p = exp.probes
        run.runner.fit_probes(run.train, run.test, batch_size=data.batch_size, num_epochs=p.num_epochs,
                              val_size=p.val_size, eval_every=p.eval_every, patience=p.patience,
                              min_delta=p.min_delta, warmup_steps=p.warmup_steps, max_steps=p.max_steps,
                              lr_decay=p.lr_decay or None, decay_patience=p.decay_patience,
                              cache=replay_cache(p, exp.base), ci=p.ci, n_boot=p.n_boot)
    else:
        run.runner.collect(run.examples, batch_size=data.batch_size)
    out = run.out
    if not writer:  # a rank other than 0: it joins the wait of the probes rank 0 saves, writes nothing
        if plan.probes and exp.probes.save:
            run.runner.save(out / "probes", overwrite=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    consumers = _write_artifacts(plan, run)
    chance = _chance(run) if plan.probes and exp.probes.task == "classification" else None
    meta = _metadata(plan, [run.seed], started, time.perf_counter() - clock, consumers, chance)
    meta["data"].update(n_examples=len(run.examples), n_train=len(run.train), n_fit=run.n_fit,
                        n_validation=len(run.train) - run.n_fit, n_test=len(run.test),
                        classes=class_counts(run.examples, plan.table.label_names, exp.probes.task))
    _write_common(plan, out, meta)
    from .report import write_report

    write_report(out)
    logger.info("seed {}: wrote {}", run.seed, out)
    return out


def _write_artifacts(plan: Plan, run: SeedRun) -> list[str]:
    """Metrics, saved probes, geometry and gauge tables; returns the consumers that ran."""
    out, ran = run.out, []
    if plan.probes:
        metrics = _metrics_table(plan, run.runner.metrics)
        metrics.to_csv(out / "metrics.csv")
        if run.runner.baselines is not None:
            run.runner.baselines.drop(columns=["support"], errors="ignore").to_csv(out / "baselines.csv", index=False)
        ran.append("probes")
        if plan.experiment.probes.save:
            run.runner.save(out / "probes", overwrite=True)
    if run.geometry is not None:
        run.geometry.save(out / "geometry")
        cka_matrix(run.geometry.sample, run.geometry.sites).to_csv(out / "geometry" / "cka_matrix.csv")
        ran.append("geometry")
    if run.gauge is not None:
        _save_gauge(run.gauge.trajectory, out / "gauges")
        ran.append("gauges")
    return ran


def _metrics_table(plan: Plan, metrics: pd.DataFrame) -> pd.DataFrame:
    """``runner.metrics`` with each probe's variant and swept settings as columns, in plan order."""
    specs = {p.name: p for p in plan.probes}
    frame = metrics.loc[[p.name for p in plan.probes]].copy()
    frame.insert(0, "variant", [specs[n].variant_label for n in frame.index])
    for key in plan.probes[0].variant:
        values = [specs[name].variant[key] for name in frame.index]
        frame[f"setting_{key}"] = [json.dumps(v) if isinstance(v, (list, dict)) else v for v in values]
    return frame


def _save_gauge(trajectory: pd.DataFrame, folder: Path) -> None:
    """``trajectory.csv`` (one row per measurement and site) and ``eigenvalues.csv`` (long form)."""
    folder.mkdir(parents=True, exist_ok=True)
    trajectory.drop(columns=["eigenvalues"]).to_csv(folder / "trajectory.csv", index=False)
    rows = [{"step": r["step"], "site": r["site"], "layer": r["layer"], "index": i + 1, "eigenvalue": float(v)}
            for _, r in trajectory.iterrows() for i, v in enumerate(r["eigenvalues"])]
    pd.DataFrame(rows).to_csv(folder / "eigenvalues.csv", index=False)


def cka_matrix(samples: dict[str, np.ndarray], sites: Sequence[str]) -> pd.DataFrame:
    """Linear CKA between every pair of sites from paired sample rows.

    With centered rows ``X (n, Dx)`` and ``Y (n, Dy)``, CKA = ⟨XXᵀ, YYᵀ⟩_F / (‖XXᵀ‖_F ‖YYᵀ‖_F),
    which equals ``||XᵀY||²_F / (||XᵀX||_F ||YᵀY||_F)`` (:func:`lm_probe.functional.spectra.linear_cka`);
    the ``(n, n)`` Gram form costs O(n² D) per site and O(n²) per pair.

    Args:
        samples: ``{site: (n, D) rows}``, row i of every site from the same example or token
            (a :class:`~lm_probe.Geometry` reservoir keeps them paired).
        sites: The order of rows and columns.

    Returns:
        A symmetric ``(sites, sites)`` DataFrame, 1 on the diagonal; NaN for a site whose
        rows are all equal (or fewer than 2 rows).
    """
    grams = {}
    for s in sites:
        x = np.asarray(samples[s], np.float64)
        x = x - x.mean(0) if len(x) else x
        gram = x @ x.T
        norm = np.linalg.norm(gram)
        grams[s] = gram / norm if len(x) >= 2 and norm > 0 else None
    values = np.full((len(sites), len(sites)), np.nan)
    for i, a in enumerate(sites):
        for j, b in enumerate(sites[i:], i):
            if grams[a] is not None and grams[b] is not None:
                values[i, j] = values[j, i] = float(np.sum(grams[a] * grams[b]))
    return pd.DataFrame(values, index=pd.Index(list(sites), name="site"), columns=list(sites))


def _chance(run: SeedRun) -> float:
    """Test accuracy of always predicting the training set's majority class."""
    classes, counts = np.unique(run.train.labels, return_counts=True)
    return float(np.mean(run.test.labels == classes[counts.argmax()]))


def _versions() -> dict[str, str]:
    versions = {"lm_probe": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "nnsight", "sklearn", "numpy", "pandas"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def _metadata(plan: Plan, seeds: list[int], started: datetime, seconds: float, consumers: list[str],
              chance: float | None) -> dict[str, Any]:
    exp = plan.experiment
    return {
        "name": exp.name, "experiment": str(exp.source) if exp.source else None, "seeds": seeds,
        "started": started.isoformat(timespec="seconds"), "duration_s": round(seconds, 1),
        "model": {**model_metadata(plan.model), "name": exp.model.name, "class": type(plan.model._module).__name__},
        "data": {"source": plan.table.description, "text_column": exp.data.text_column,
                 "label_column": exp.data.label_column, "max_length": exp.data.max_length,
                 "batch_size": exp.data.batch_size, "label_names": plan.table.label_names},
        "sites": plan.sites, "probes": [p.name for p in plan.probes], "task": exp.probes.task,
        "site_layers": {spec: site.layer for spec, site in plan.runs[0].runner.sites.items()},
        "consumers": consumers, "chance_accuracy": chance, "ci": exp.probes.ci, "n_boot": exp.probes.n_boot,
        "versions": _versions(),
    }


def _write_common(plan: Plan, out: Path, meta: dict[str, Any]) -> None:
    """run.json, the experiment file as given, and the resolved configuration."""
    (out / "run.json").write_text(json.dumps(meta, indent=2, default=str))
    (out / "experiment.toml").write_text(plan.experiment.text)
    (out / "config.json").write_text(json.dumps(resolved_config(plan), indent=2, default=str))


def resolved_config(plan: Plan) -> dict[str, Any]:
    """The experiment with every default filled in, sites expanded and probes named."""
    exp = plan.experiment
    tables = {name: _asdict(getattr(exp, name)) for name in SECTIONS if getattr(exp, name) is not None}
    tables["probes"]["estimator"] = {k: list(v) for k, v in exp.probes.estimator}
    return {"name": exp.name, "seeds": list(exp.seeds), "out": str(exp.out), **tables,
            "resolved_sites": plan.sites, "resolved_probes": {p.name: p.settings for p in plan.probes}}


def _asdict(section: Any) -> dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in fields(section)}


def _write_combined(plan: Plan, folders: list[Path]) -> None:
    """Several seeds: metrics (and baselines) of all seeds in one CSV each (a ``seed`` column) and a
    combined report."""
    out = plan.experiment.out
    frames = []
    for run, folder in zip(plan.runs, folders):
        if (folder / "metrics.csv").exists():
            frame = pd.read_csv(folder / "metrics.csv", index_col=0)
            frame.insert(0, "seed", run.seed)
            frames.append(frame)
    if frames:
        seed_summary(pd.concat(frames)).to_csv(out / "metrics.csv")
    baselines = [pd.read_csv(f / "baselines.csv").assign(seed=run.seed) for run, f in zip(plan.runs, folders)
                 if (f / "baselines.csv").exists()]
    if baselines:
        pd.concat(baselines)[["seed", *baselines[0].columns[:-1]]].to_csv(out / "baselines.csv", index=False)
    metas = [json.loads((f / "run.json").read_text()) for f in folders]
    chances = [m["chance_accuracy"] for m in metas if m.get("chance_accuracy") is not None]
    meta = {**metas[0], "seeds": list(plan.experiment.seeds), "seed_folders": [f.name for f in folders],
            "duration_s": round(sum(m["duration_s"] for m in metas), 1), "consumers": ["probes"] if frames else [],
            "chance_accuracy": float(np.mean(chances)) if chances else None}
    _write_common(plan, out, meta)
    from .report import write_report

    write_report(out)


def seed_summary(metrics: pd.DataFrame) -> pd.DataFrame:
    """The metrics of every seed (one row per probe and seed, indexed by probe) with
    ``<metric>_seed_mean`` and ``<metric>_seed_std`` (standard deviation with ddof=1: NaN
    for a single seed) of each test metric across the seeds, on each of the probe's rows."""
    frame = metrics.copy()
    names = [c for c in dict.fromkeys((*METRIC_COLUMNS, *REGRESSION_COLUMNS, "control_accuracy", "selectivity"))
             if c in frame and pd.api.types.is_numeric_dtype(frame[c])]
    groups = frame.groupby(level=0, sort=False)
    for name in names:
        frame[f"{name}_seed_mean"] = groups[name].transform("mean")
        frame[f"{name}_seed_std"] = groups[name].transform(lambda v: v.std(ddof=1))
    return frame


def remove_run(out: Path) -> None:
    """Delete the files a run writes in ``out`` (for ``--overwrite``); other files are left alone."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in ("probes", "geometry", "gauges"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
