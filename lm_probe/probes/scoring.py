"""Scoring probes on a dataset's pooled activations: the rows of ``runner.metrics``.

A probe is scored on the rows it could have trained on: labeled rows (every example, or
the labeled tokens) with finite activations, whose label is one of the probe's classes
(:func:`scored_rows`); a control twin on the control labels of the same rows
(:func:`targets`). :func:`metrics_table` gives one row per probe, with its twin's
accuracy and the selectivity beside it; a probe that cannot be scored gets NaN metrics
and the reason in ``score_error`` (with a warning), so one bad probe never costs the
others' scores. Every test metric gets a seeded percentile bootstrap interval over the
scored rows (``<metric>_lo``, ``<metric>_hi``: :mod:`lm_probe.functional.bootstrap`); the
selectivity's is paired, the probe and its twin scored on the same resampled rows.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd
from loguru import logger

from ..core.consumer import Request, finite_rows
from ..core.dataset import ProbeDataset
from ..core.labels import format_labels, labeled
from ..core.sites import Site
from ..functional.bootstrap import (bootstrap_interval, classification_statistics, mean_statistics,
                                   regression_statistics)
from ..functional.metrics import METRIC_COLUMNS, REGRESSION_COLUMNS, classification_metrics, regression_metrics
from .checks import class_names
from .control import CONTROL_SUFFIX, ControlTask, is_control
from .probe import Probe

__all__ = ["metrics_table", "score", "scored_rows", "scored_mask", "scored_with_intervals",
           "regression_with_intervals", "targets"]


def metrics_table(probes: Mapping[str, Probe], acts: Mapping[Request, np.ndarray], dataset: ProbeDataset,
                  sites: Mapping[str, Site], control: ControlTask | None, *, ci: float = 0.95, n_boot: int = 1000,
                  seed: int = 0) -> pd.DataFrame:
    """Every probe's metrics on ``dataset`` (see :meth:`lm_probe.ProbeRunner.evaluate`).

    Args:
        probes: The probes by name (control twins among them).
        acts: The dataset's pooled activations, ``{request: (rows, hidden)}``.
        dataset: The examples.
        sites: The resolved sites (for each row's site name and layer).
        control: The control task of the fit (for the twins).
        ci, n_boot, seed: The bootstrap intervals' coverage, resamples (0: no interval
            columns) and seed (every probe resamples with the same seed).

    Returns:
        DataFrame indexed by probe name, twins folded into their probe's row
        (``control_accuracy``, ``selectivity``, and their intervals; ``control_compression``);
        the online codelength of each probe's training labels beside its metrics
        (``codelength_bits``, ``uniform_bits``, ``compression``, ``n_coded``:
        :mod:`lm_probe.probes.codelength`).
    """
    rows, boot = [], dict(ci=ci, n_boot=n_boot, seed=seed)
    for name, probe in probes.items():
        if is_control(name):
            continue
        row, keep, correct = _scored(probe, acts, dataset, sites, control, **boot)
        rows.append({**row, "probe": name})
        twin = probes.get(name + CONTROL_SUFFIX)
        if twin is not None:
            twin_row, twin_keep, twin_correct = _scored(twin, acts, dataset, sites, control, **boot)
            rows[-1]["control_accuracy"] = twin_row["accuracy"]
            rows[-1]["selectivity"] = rows[-1]["accuracy"] - twin_row["accuracy"]
            rows[-1]["control_compression"] = twin_row["compression"]
            if n_boot:
                paired = correct is not None and twin_correct is not None and np.array_equal(keep, twin_keep)
                bounds = _bounds(mean_statistics({"selectivity": correct - twin_correct}), len(correct),
                                 **boot) if paired else {"selectivity_lo": np.nan, "selectivity_hi": np.nan}
                rows[-1].update({"control_accuracy_lo": twin_row["accuracy_lo"],
                                 "control_accuracy_hi": twin_row["accuracy_hi"], **bounds})
    frame = pd.DataFrame(rows).set_index("probe")
    frame["layer"] = frame["layer"].astype("Int64")
    return frame


def score(probe: Probe, acts: Mapping[Request, np.ndarray], dataset: ProbeDataset, sites: Mapping[str, Site],
          control: ControlTask | None, *, ci: float = 0.95, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """One probe's metrics row on a dataset's pooled activations, with bootstrap intervals
    (``n_boot=0``: none)."""
    return _scored(probe, acts, dataset, sites, control, ci=ci, n_boot=n_boot, seed=seed)[0]


def _scored(probe: Probe, acts: Mapping[Request, np.ndarray], dataset: ProbeDataset, sites: Mapping[str, Site],
            control: ControlTask | None, *, ci: float, n_boot: int,
            seed: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
    """:func:`score`'s row, the mask of the rows it scored, and whether each was predicted
    right (``None`` when it scored none, or is a regression)."""
    site = sites[probe.config.site]
    classes = probe.classes_ if probe.is_classifier else None
    keep, y, unseen, nonfinite = scored_mask(probe, acts[probe.requests[0]], dataset, classes, "test", control)
    X, y = acts[probe.requests[0]][keep], y[keep]
    head = getattr(probe, "head_", probe.config.head)  # the head trained ("auto" resolved)
    info = {"site": site.name, "pool": probe.config.pool, "layer": site.layer, "head": head,
            "n_scored": len(y), "n_unseen_label": unseen, "n_nonfinite": nonfinite,
            "n_nonfinite_fit": probe.n_nonfinite_, **probe.codelength_.compute()}
    columns = METRIC_COLUMNS if probe.is_classifier else REGRESSION_COLUMNS
    empty = dict.fromkeys([*columns, *(f"{c}_{end}" for c in columns for end in ("lo", "hi") if n_boot)], np.nan)
    if probe.n_steps_ == 0:
        logger.warning("probe {!r} has no metrics: it never trained ({}; {} training rows had non-finite "
                       "activations)", probe.name, probe.stopped_reason_, probe.n_nonfinite_)
        return {**empty, **info, **probe.solver_summary(), "n_steps": 0, "stopped_early": True,
                "stop_reason": str(probe.stopped_reason_)}, keep, None
    state = probe.compute()
    summary = {key: state[key] for key in ("n_steps", "stopped_early", "stop_reason", "solver", "C", "alpha",
                                           "n_epochs", "converged")}
    if len(y) == 0:
        logger.warning("probe {!r} has no {} rows to score (all left out)", probe.name, "test")
        return {**empty, **info, **summary, "score_error": "no rows to score"}, keep, None
    try:
        if probe.is_classifier:
            proba = probe.predict_proba(X)
            scores = scored_with_intervals(y, proba, probe.classes_, ci, n_boot, seed)
            correct = (probe.classes_[np.argmax(proba, axis=1)] == y).astype(np.float64)
        else:
            scores, correct = regression_with_intervals(y, probe.predict(X), ci, n_boot, seed), None
    except (ValueError, FloatingPointError, np.linalg.LinAlgError) as err:  # keep the other probes' scores
        logger.warning("probe {!r} could not be scored: {}: {}", probe.name, type(err).__name__, err)
        return {**empty, **info, **summary, "score_error": f"{type(err).__name__}: {err}"}, keep, None
    return {**scores, **info, **summary}, keep, correct


def scored_with_intervals(y: np.ndarray, proba: np.ndarray, classes: np.ndarray, ci: float = 0.95,
                          n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """:func:`~lm_probe.functional.metrics.classification_metrics` of ``(n, n_classes)``
    probabilities, plus ``<metric>_lo`` / ``<metric>_hi``: the percentile bootstrap interval
    of each at coverage ``ci`` over ``n_boot`` resamples of the rows (none if 0)."""
    y = np.asarray(y)
    return {**classification_metrics(y, proba, classes),
            **_bounds(classification_statistics(y, proba, classes), len(y), ci, n_boot, seed)}


def regression_with_intervals(y: np.ndarray, pred: np.ndarray, ci: float = 0.95, n_boot: int = 1000,
                              seed: int = 0) -> dict[str, Any]:
    """:func:`~lm_probe.functional.metrics.regression_metrics` plus their bootstrap
    intervals, as :func:`scored_with_intervals`."""
    y = np.asarray(y, np.float64)
    return {**regression_metrics(y, pred), **_bounds(regression_statistics(y, pred), len(y), ci, n_boot, seed)}


def _bounds(statistic: Any, n: int, ci: float, n_boot: int, seed: int) -> dict[str, float]:
    """``{<metric>_lo, <metric>_hi}`` of :func:`~lm_probe.functional.bootstrap.bootstrap_interval`."""
    out = {}
    for name, (lo, hi) in bootstrap_interval(statistic, n, ci=ci, n_boot=n_boot, seed=seed).items():
        out[f"{name}_lo"], out[f"{name}_hi"] = lo, hi
    return out


def targets(probe: Probe, data: ProbeDataset, control: ControlTask | None) -> np.ndarray:
    """A probe's targets on ``data`` in its row order: the control labels for a twin.

    Raises:
        RuntimeError: a control twin, but no control task (the probes were never fit).
    """
    token = probe.config.pool == "none"
    if is_control(probe.name):
        if control is None:
            raise RuntimeError(f"probe {probe.name!r} is a control twin but this runner has no control task; "
                               "train it with fit_probes first")
        return control.flat_labels(data)
    values = data.token_labels if token else data.labels
    return np.concatenate(values) if token else np.asarray(values)


def scored_rows(probe: Probe, X: np.ndarray, data: ProbeDataset, classes: Any, what: str,
                control: ControlTask | None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The rows a probe is scored on: labeled tokens (or all examples) with finite
    activations, labels in its classes.

    Args:
        probe: The probe.
        X: Its ``(rows, hidden)`` pooled activations on ``data``.
        data: The examples.
        classes: The probe's classes (``None``: keep every label).
        what: The rows' split, for messages (``"test"``, ``"validation"``).
        control: The control task of the fit (for a twin's targets).

    Returns:
        ``(X, y, n_unseen, n_nonfinite)``: rows, targets, labeled rows left out because
        their label is not among the probe's classes (token tasks only: a new tag in
        test), and labeled rows left out because their activations are non-finite.
    """
    keep, y, unseen, nonfinite = scored_mask(probe, X, data, classes, what, control)
    return X[keep], y[keep], unseen, nonfinite


def scored_mask(probe: Probe, X: np.ndarray, data: ProbeDataset, classes: Any, what: str,
                control: ControlTask | None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """:func:`scored_rows` as ``(keep, y, n_unseen, n_nonfinite)``: a boolean mask over all
    of ``data``'s rows and the targets of all of them (warnings as :func:`scored_rows`)."""
    y = targets(probe, data, control)
    keep = labeled(y)
    bad = keep & ~finite_rows(X)
    nonfinite = int(bad.sum())
    if nonfinite:
        logger.warning("probe {!r}: {} {} rows have non-finite activations at site {!r}; they are left out",
                       probe.name, nonfinite, what, probe.config.site)
    keep &= ~bad
    unseen = 0
    if probe.is_classifier and classes is not None:
        unknown = keep & ~np.isin(y, np.asarray(classes))
        unseen = int(unknown.sum())
        if unseen:
            logger.warning("probe {!r}: {} labeled tokens have tags never seen in training {}; they are left "
                           "out of its metrics", probe.name, unseen,
                           format_labels(sorted(set(y[unknown].tolist())), class_names(data, [probe.config])))
            keep &= ~unknown
    return keep, y, unseen, nonfinite
