"""Text baselines: what a probe has to beat without ever looking at the model.

A probe that reaches 85% accuracy says little when the majority class alone reaches 80%,
or when a bag of words on the same texts reaches 90%. :func:`baselines_table` fits, for
each distinct task of a runner's probes (the target: example ``labels`` or, for
``pool="none"`` probes, ``token_labels``; classification with its classes, or
regression), a few baselines on the fit rows (the training examples less the validation
split, the rows the probes trained on) and scores them on the test rows each probe is
scored on (labeled rows whose label is one of the probe's classes:
:func:`~lm_probe.probes.scoring.scored_rows`), with the metric functions the probes use,
so their columns line up with ``runner.metrics``:

* ``majority`` (classification): the fit rows' class frequencies as probabilities, so it
  predicts the most frequent fit class and its log-loss is the prior's;
* ``mean`` (regression): the fit rows' mean target;
* ``bag_of_words`` (example targets): scikit-learn's ``CountVectorizer`` and
  ``LogisticRegression(C=1)`` (``Ridge`` for regression) on the examples' texts, or on
  their token ids when the dataset has no texts (column ``input``);
* ``token_identity`` (token classification): each token id's most frequent fit label
  (:func:`token_identity_proba`), the majority class for ids never seen in the fit rows.

The pure functions take arrays and return predictions; a baseline that cannot be fit or
scored gets NaN metrics and the reason in ``score_error`` (with a warning), as a probe does.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from loguru import logger

from ..core.dataset import ProbeDataset
from ..core.labels import labeled
from ..functional.metrics import METRIC_COLUMNS, REGRESSION_COLUMNS
from .control import is_control
from .probe import Probe
from .scoring import regression_with_intervals, scored_with_intervals

__all__ = ["baselines_table", "majority_proba", "token_identity_proba", "bag_of_words", "BOW_MAX_ITER"]

#: ``max_iter`` of the bag-of-words logistic regression (lbfgs), high enough to converge.
BOW_MAX_ITER = 5000


def majority_proba(y_fit: np.ndarray, classes: np.ndarray, n: int) -> np.ndarray:
    """``(n, n_classes)``: every row the fit labels' class frequencies (columns in the
    order of ``classes``), so the arg max is the most frequent fit class (ties: the first
    of ``classes``)."""
    counts = (np.asarray(y_fit)[:, None] == np.asarray(classes)[None, :]).sum(0).astype(np.float64)
    if counts.sum() == 0:
        raise ValueError("no fit rows with a label among the classes")
    return np.tile(counts / counts.sum(), (n, 1))


def token_identity_proba(ids_fit: np.ndarray, y_fit: np.ndarray, ids_test: np.ndarray,
                         classes: np.ndarray) -> np.ndarray:
    """``(n_test, n_classes)`` label probabilities from the token id alone.

    A token id seen ``m`` times in the fit rows, ``c_k`` of them with class ``k``, gets
    ``(c_k + p_k) / (m + 1)``, where ``p`` is the fit rows' class frequencies (one pseudo
    count of the prior keeps the log-loss finite); an id never seen gets ``p``. The arg
    max is the id's most frequent fit label; ties go to the more frequent class overall,
    then to the first of ``classes``.

    Args:
        ids_fit: ``(n_fit,)`` token ids of the fit rows.
        y_fit: ``(n_fit,)`` their labels, each one of ``classes``.
        ids_test: ``(n_test,)`` token ids to predict.
        classes: The sorted classes.
    """
    classes = np.asarray(classes)
    prior = majority_proba(y_fit, classes, 1)[0]
    vocab, inverse = np.unique(np.asarray(ids_fit, np.int64), return_inverse=True)
    counts = np.zeros((len(vocab), len(classes)))
    np.add.at(counts, (inverse, np.searchsorted(classes, y_fit)), 1.0)
    ids_test = np.asarray(ids_test, np.int64)
    pos = np.minimum(np.searchsorted(vocab, ids_test), max(len(vocab) - 1, 0))
    seen = vocab[pos] == ids_test if len(vocab) else np.zeros(len(ids_test), bool)
    proba = np.tile(prior, (len(ids_test), 1))
    own = counts[pos[seen]]
    proba[seen] = (own + prior) / (own.sum(1, keepdims=True) + 1.0)
    return proba


def bag_of_words(docs_fit: Sequence[str], y_fit: np.ndarray, docs_test: Sequence[str],
                 classes: np.ndarray | None, *, token_ids: bool = False) -> np.ndarray:
    """A bag-of-words model fit on ``docs_fit`` and applied to ``docs_test``.

    Args:
        docs_fit, docs_test: The documents: texts, or token ids joined by spaces
            (``token_ids=True``: each id is one word).
        y_fit: The fit labels (or regression targets).
        classes: The sorted classes; ``None`` for regression.
        token_ids: Split the documents on whitespace instead of scikit-learn's word pattern.

    Returns:
        ``(n_test, n_classes)`` probabilities (``LogisticRegression(C=1)``, columns in the
        order of ``classes``; a class absent from the fit rows gets 0), or ``(n_test,)``
        predictions (``Ridge(alpha=1)``) for regression.
    """
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge

    vectorizer = CountVectorizer(token_pattern=r"\S+", lowercase=False) if token_ids else CountVectorizer()
    X_fit = vectorizer.fit_transform(docs_fit)
    X_test = vectorizer.transform(docs_test)
    if classes is None:
        return Ridge(alpha=1.0, tol=1e-10).fit(X_fit, np.asarray(y_fit, np.float64)).predict(X_test)
    model = LogisticRegression(C=1.0, max_iter=BOW_MAX_ITER).fit(X_fit, y_fit)
    proba = np.zeros((X_test.shape[0], len(classes)))
    proba[:, np.searchsorted(classes, model.classes_)] = model.predict_proba(X_test)
    return proba


def _task_key(probe: Probe) -> tuple[str, str, tuple[int, ...] | None]:
    """``(target, task, classes)``: the probes that share it share their baselines."""
    target = "token_labels" if probe.config.pool == "none" else "labels"
    if not probe.is_classifier:
        return target, "regression", None
    return target, "classification", tuple(int(c) for c in probe.classes_)


def _rows(data: ProbeDataset, target: str, classes: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, y)``: the rows a task is fit or scored on (labeled, label in ``classes``)
    and their targets, in the row order of the task's probes."""
    y = data.flat_token_labels() if target == "token_labels" else np.asarray(data.labels)
    keep = labeled(y)
    if classes is not None:
        keep &= np.isin(y, np.asarray(classes))
    return keep, y[keep] if classes is not None else y[keep].astype(np.float64)


def _documents(data: ProbeDataset, keep: np.ndarray) -> tuple[list[str], str]:
    """The kept examples as documents: their texts, else their token ids as words."""
    picked = np.flatnonzero(keep)
    if data.texts is not None:
        return [data.texts[i] for i in picked], "text"
    return [" ".join(map(str, data.ids[i].tolist())) for i in picked], "token_ids"


def _predictors(target: str, classes: tuple[int, ...] | None, fit: ProbeDataset, test: ProbeDataset,
                keep_fit: np.ndarray, keep_test: np.ndarray) -> list[tuple[str, str, Callable[[Any], Any]]]:
    """``(baseline, input, predict)`` for one task: ``predict(y_fit)`` gives the test rows'
    probabilities (classification) or predictions (regression)."""
    cls = None if classes is None else np.asarray(classes)
    n = int(keep_test.sum())
    out: list[tuple[str, str, Callable[[Any], Any]]] = [
        ("majority", "labels", lambda y: majority_proba(y, cls, n)) if cls is not None else
        ("mean", "labels", lambda y: np.full(n, float(np.mean(y))))]
    if target == "token_labels":
        if cls is not None:
            ids_fit, ids_test = np.concatenate(fit.ids)[keep_fit], np.concatenate(test.ids)[keep_test]
            out.append(("token_identity", "token_ids", lambda y: token_identity_proba(ids_fit, y, ids_test, cls)))
        return out
    (docs_fit, kind), (docs_test, _) = _documents(fit, keep_fit), _documents(test, keep_test)
    out.append(("bag_of_words", kind, lambda y: bag_of_words(docs_fit, y, docs_test, cls,
                                                             token_ids=kind == "token_ids")))
    return out


def _score(name: str, predict: Callable[[Any], Any], y_fit: np.ndarray, y_test: np.ndarray,
           classes: tuple[int, ...] | None, **boot: Any) -> dict[str, Any]:
    """One baseline's metrics row, with the probes' bootstrap intervals (``boot``: ``ci``,
    ``n_boot``, ``seed``); NaN metrics and ``score_error`` when it fails."""
    columns = METRIC_COLUMNS if classes is not None else REGRESSION_COLUMNS
    if len(y_test) == 0 or len(y_fit) == 0:
        logger.warning("baseline {!r} has no {} rows", name, "test" if len(y_fit) else "fit")
        return {**dict.fromkeys(columns, np.nan), "score_error": "no rows to fit or score"}
    try:
        pred = predict(y_fit)
        if classes is None:
            return regression_with_intervals(y_test, pred, **boot)
        return scored_with_intervals(y_test, pred, np.asarray(classes), **boot)
    except (ValueError, FloatingPointError, np.linalg.LinAlgError) as err:  # keep the other baselines
        logger.warning("baseline {!r} could not be fit or scored: {}: {}", name, type(err).__name__, err)
        return {**dict.fromkeys(columns, np.nan), "score_error": f"{type(err).__name__}: {err}"}


def baselines_table(probes: Mapping[str, Probe], fit: ProbeDataset, test: ProbeDataset, *, ci: float = 0.95,
                    n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Every baseline of every distinct task of ``probes`` (control twins left out),
    fit on ``fit`` and scored on ``test``.

    Args:
        probes: The probes by name (their classes are those of the fit).
        fit: The rows the probes trained on (training set less validation).
        test: The rows they are scored on.
        ci, n_boot, seed: The percentile bootstrap intervals of the test metrics, as the
            probes get them (``<metric>_lo``/``<metric>_hi``; ``n_boot=0``: none).

    Returns:
        One row per baseline and task: ``baseline``, ``target`` (``labels`` or
        ``token_labels``), ``task``, ``input`` (what the baseline reads: ``labels``,
        ``text`` or ``token_ids``), ``probes`` (the probes of the task, comma-separated),
        the metric columns of ``runner.metrics`` (``loss``, ``accuracy``, ..., or ``r2``,
        ``mse``, ..., each with its interval), ``n_train`` (fit rows), ``n_scored`` (test rows) and
        ``score_error`` where a baseline failed.
    """
    tasks: dict[tuple, list[str]] = {}
    for name, probe in probes.items():
        if not is_control(name):
            tasks.setdefault(_task_key(probe), []).append(name)
    rows = []
    for (target, task, classes), names in tasks.items():
        keep_fit, y_fit = _rows(fit, target, classes)
        keep_test, y_test = _rows(test, target, classes)
        for baseline, kind, predict in _predictors(target, classes, fit, test, keep_fit, keep_test):
            scored = _score(baseline, predict, y_fit, y_test, classes, ci=ci, n_boot=n_boot, seed=seed)
            rows.append({"baseline": baseline, "target": target, "task": task, "input": kind,
                         "probes": ",".join(names), **scored, "n_train": len(y_fit), "n_scored": len(y_test)})
    return pd.DataFrame(rows)
