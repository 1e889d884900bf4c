"""Scoring probes on a dataset's pooled activations: the rows of ``runner.metrics``.

A probe is scored on the rows it could have trained on: labeled rows (every example, or
the labeled tokens) with finite activations, whose label is one of the probe's classes
(:func:`scored_rows`); a control twin on the control labels of the same rows
(:func:`targets`). :func:`metrics_table` gives one row per probe, with its twin's
accuracy and the selectivity beside it; a probe that cannot be scored gets NaN metrics
and the reason in ``score_error`` (with a warning), so one bad probe never costs the
others' scores.
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
from ..functional.metrics import METRIC_COLUMNS, REGRESSION_COLUMNS
from .checks import class_names
from .control import CONTROL_SUFFIX, ControlTask, is_control
from .probe import Probe

__all__ = ["metrics_table", "score", "scored_rows", "targets"]


def metrics_table(probes: Mapping[str, Probe], acts: Mapping[Request, np.ndarray], dataset: ProbeDataset,
                  sites: Mapping[str, Site], control: ControlTask | None) -> pd.DataFrame:
    """Every probe's metrics on ``dataset`` (see :meth:`lm_probe.ProbeRunner.evaluate`).

    Args:
        probes: The probes by name (control twins among them).
        acts: The dataset's pooled activations, ``{request: (rows, hidden)}``.
        dataset: The examples.
        sites: The resolved sites (for each row's site name and layer).
        control: The control task of the fit (for the twins).

    Returns:
        DataFrame indexed by probe name, twins folded into their probe's row
        (``control_accuracy``, ``selectivity``, ``control_compression``); the online
        codelength of each probe's training labels beside its metrics (``codelength_bits``,
        ``uniform_bits``, ``compression``, ``n_coded``: :mod:`lm_probe.probes.codelength`).
    """
    rows = []
    for name, probe in probes.items():
        if is_control(name):
            continue
        rows.append({**score(probe, acts, dataset, sites, control), "probe": name})
        twin = probes.get(name + CONTROL_SUFFIX)
        if twin is not None:
            twin_row = score(twin, acts, dataset, sites, control)
            rows[-1]["control_accuracy"] = twin_row["accuracy"]
            rows[-1]["selectivity"] = rows[-1]["accuracy"] - twin_row["accuracy"]
            rows[-1]["control_compression"] = twin_row["compression"]
    frame = pd.DataFrame(rows).set_index("probe")
    frame["layer"] = frame["layer"].astype("Int64")
    return frame


def score(probe: Probe, acts: Mapping[Request, np.ndarray], dataset: ProbeDataset, sites: Mapping[str, Site],
          control: ControlTask | None) -> dict[str, Any]:
    """One probe's metrics row on a dataset's pooled activations."""
    site = sites[probe.config.site]
    classes = probe.classes_ if probe.is_classifier else None
    X, y, unseen, nonfinite = scored_rows(probe, acts[probe.requests[0]], dataset, classes, "test", control)
    info = {"site": site.name, "pool": probe.config.pool, "layer": site.layer, "head": probe.config.head,
            "n_scored": len(y), "n_unseen_label": unseen, "n_nonfinite": nonfinite,
            "n_nonfinite_fit": probe.n_nonfinite_, **probe.codelength_.compute()}
    columns = METRIC_COLUMNS if probe.is_classifier else REGRESSION_COLUMNS
    if probe.n_steps_ == 0:
        logger.warning("probe {!r} has no metrics: it never trained ({}; {} training rows had non-finite "
                       "activations)", probe.name, probe.stopped_reason_, probe.n_nonfinite_)
        return {**dict.fromkeys(columns, np.nan), **info, **probe.solver_summary(), "n_steps": 0,
                "stopped_early": True, "stop_reason": str(probe.stopped_reason_)}
    state = probe.compute()
    summary = {key: state[key] for key in ("n_steps", "stopped_early", "stop_reason", "solver", "C", "alpha",
                                           "n_epochs", "converged")}
    if len(y) == 0:
        logger.warning("probe {!r} has no {} rows to score (all left out)", probe.name, "test")
        return {**dict.fromkeys(columns, np.nan), **info, **summary, "score_error": "no rows to score"}
    try:
        scores = probe.score(X, y)
    except (ValueError, FloatingPointError, np.linalg.LinAlgError) as err:  # keep the other probes' scores
        logger.warning("probe {!r} could not be scored: {}: {}", probe.name, type(err).__name__, err)
        return {**dict.fromkeys(columns, np.nan), **info, **summary, "score_error": f"{type(err).__name__}: {err}"}
    return {**scores, **info, **summary}


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
    y = targets(probe, data, control)
    keep = labeled(y)
    bad = keep & ~finite_rows(X)
    nonfinite = int(bad.sum())
    if nonfinite:
        logger.warning("probe {!r}: {} {} rows have non-finite activations at site {!r}; they are left out",
                       probe.name, nonfinite, what, probe.config.site)
    keep &= ~bad
    X, y = X[keep], y[keep]
    unseen = 0
    if probe.is_classifier and classes is not None:
        known = np.isin(y, np.asarray(classes))
        unseen = int((~known).sum())
        if unseen:
            logger.warning("probe {!r}: {} labeled tokens have tags never seen in training {}; they are left "
                           "out of its metrics", probe.name, unseen,
                           format_labels(sorted(set(y[~known].tolist())), class_names(data, [probe.config])))
            X, y = X[known], y[known]
    return X, y, unseen, nonfinite
