"""``solver="lbfgs"``: one full-batch L2 logistic regression per probe, ``C`` chosen on held-out rows.

A probe with ``solver="lbfgs"`` keeps its fit rows through the first epoch
(:class:`FitRows`, within the replay cache's memory budget), in example-id order so that
folds do not depend on the batch order, and solves once at the end of that epoch: a
logistic regression for each ``C`` of the grid, scored on held-out rows (:func:`choose_C`)
either in a ``cv``-fold stratified cross-validation over the fit and validation rows
together (as ``LogisticRegressionCV``) or on the validation split alone
(``cv="validation"``); the ``C`` of the best accuracy (as ``LogisticRegressionCV``'s
default scoring; ties to the lower log-loss) or of the lowest log-loss
(``scoring="log_loss"``) is chosen (:func:`best_C`), then refit on all those rows
(:func:`fit_logistic`).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression

from ..core.consumer import PooledBatch
from ..core.labels import format_labels

__all__ = ["FitRows", "row_keys", "solve", "choose_C", "held_out_scores", "best_C", "fit_logistic"]


class FitRows:
    """The fit rows a ``solver="lbfgs"`` probe holds until it solves.

    Args:
        name: The probe's name, for the message.
        max_bytes: The most bytes of rows it may hold (``None``: no bound).
    """

    def __init__(self, name: str, max_bytes: int | None) -> None:
        self.name, self.max_bytes = name, max_bytes
        self.rows: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.keys: list[np.ndarray] = []
        self.nbytes = 0

    def __bool__(self) -> bool:
        return bool(self.rows)

    def add(self, X: np.ndarray, y: np.ndarray, keys: np.ndarray | None) -> None:
        """Keep a batch's rows ``X (rows, hidden)`` as float32, targets ``y (rows,)`` and their
        ``(example id, token position)`` keys ``(rows, 2)``.

        Raises:
            MemoryError: the rows held would pass ``max_bytes``.
        """
        rows = np.array(X, np.float32)
        self.nbytes += rows.nbytes
        if self.max_bytes is not None and self.nbytes > self.max_bytes:
            raise MemoryError(f"probe {self.name!r}: solver='lbfgs' needs all its fit rows in memory, more than "
                              f"the {self.max_bytes / 2**20:.1f} MiB of the cache budget; raise "
                              "Cache(memory_budget=...) or use solver='sgd'")
        self.rows.append(rows)
        self.targets.append(np.asarray(y))
        if keys is not None:
            self.keys.append(keys)

    def take(self, transform: Any) -> tuple[np.ndarray, np.ndarray]:
        """All the rows, through ``transform``, and their targets, in example-id order when
        every batch came with keys; the rows are let go."""
        X, y = transform(np.vstack(self.rows)), np.concatenate(self.targets)
        if self.keys:  # rows in example-id order: folds free of batch order (keys come with every batch)
            keys = np.concatenate(self.keys)
            order = np.lexsort((keys[:, 1], keys[:, 0]))
            X, y = X[order], y[order]
        self.rows, self.targets, self.keys = [], [], []
        return X, y


def row_keys(batch: PooledBatch, token: bool, keep: np.ndarray) -> np.ndarray | None:
    """``(rows, 2)`` ``(example id, token position)`` of a batch's kept rows (``keep``, a
    mask over its rows; ``token``: one row per real token), or ``None`` for a batch that
    has neither ``example_ids`` nor ``index``."""
    has_ids = batch.example_ids is not None or batch.index is not None
    ids, positions = batch.row_ids(token) if has_ids else (None, None)
    return None if ids is None else np.stack([ids, positions], 1)[keep]


def fit_logistic(C: float, X: np.ndarray, y: np.ndarray, random_state: int | None,
                 kwargs: dict[str, Any]) -> LogisticRegression:
    """scikit-learn's L2 ``LogisticRegression(C=C, **kwargs)`` fit on ``X (rows, hidden)``, ``y``."""
    return LogisticRegression(C=C, random_state=random_state, **kwargs).fit(X, y)


def choose_C(X: np.ndarray, y: np.ndarray, validation: tuple[np.ndarray, np.ndarray] | None, *,
             Cs: Sequence[float], folds: int | str, classes: np.ndarray, random_state: int | None,
             kwargs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The held-out accuracy and log-loss of each ``C`` of ``Cs``, and the rows to refit on.

    Each split fits one ``LogisticRegression`` per ``C``, each from zero (not warm-started
    along the grid as ``LogisticRegressionCV``'s path is: a warm start stops within the
    solver's tolerance of the previous ``C``'s solution, enough to flip a held-out row).

    Args:
        X, y: The fit rows (standardized) and targets.
        validation: The validation rows (standardized) and targets, or ``None``.
        Cs: The grid.
        folds: Folds of a stratified cross-validation (unshuffled, as
            ``LogisticRegressionCV``) over the fit and validation rows together, or
            ``"validation"``: score on the validation split (5 folds without one).
        classes: The probe's classes (the columns of the log-loss).
        random_state: Seed of the estimators.
        kwargs: ``LogisticRegression`` arguments.

    Returns:
        ``(accuracy, loss, X, y)``: the mean held-out accuracy and log-loss of each ``C``
        ``(len(Cs),)``; the fit and validation rows together.
    """
    from sklearn.model_selection import StratifiedKFold

    n_fit = len(y)
    if validation is not None:
        X, y = np.vstack([X, validation[0]]), np.concatenate([y, validation[1]])
    if validation is not None and folds == "validation":
        splits = [(np.arange(n_fit), np.arange(n_fit, len(y)))]
    else:
        with warnings.catch_warnings():  # a class with fewer rows than folds: scikit-learn warns, as in LRCV
            warnings.simplefilter("ignore", UserWarning)
            splits = list(StratifiedKFold(5 if folds == "validation" else int(folds)).split(X, y))
    scores = np.array([held_out_scores(X[fit], y[fit], X[held], y[held], Cs, classes, random_state, kwargs)
                       for fit, held in splits])  # (splits, 2, Cs)
    accuracy, loss = scores.mean(axis=0)
    return accuracy, loss, X, y


def held_out_scores(X: np.ndarray, y: np.ndarray, Xh: np.ndarray, yh: np.ndarray, Cs: Sequence[float],
                    classes: np.ndarray, random_state: int | None, kwargs: dict[str, Any]) -> np.ndarray:
    """``(2, len(Cs))``: the accuracy and log-loss on ``Xh, yh`` of a logistic regression
    fit on ``X, y`` for each ``C``."""
    from sklearn.metrics import log_loss

    columns = np.searchsorted(classes, np.unique(y))  # a fold may lack a class: its probability is 0
    scores = np.empty((2, len(Cs)))
    for j, C in enumerate(Cs):
        proba = np.zeros((len(yh), len(classes)))
        proba[:, columns] = fit_logistic(C, X, y, random_state, kwargs).predict_proba(Xh)
        scores[:, j] = np.mean(classes[proba.argmax(1)] == yh), log_loss(yh, proba, labels=classes)
    return scores


def best_C(accuracy: np.ndarray, loss: np.ndarray, scoring: str) -> int:
    """The index of the chosen ``C``: the highest accuracy, ties to the lowest log-loss
    (``scoring="accuracy"``), or the lowest log-loss (``"log_loss"``); ties after that go
    to the first."""
    if scoring == "log_loss":
        return int(np.argmin(loss))
    return int(np.lexsort((loss, -accuracy))[0])


def solve(X: np.ndarray, y: np.ndarray, validation: tuple[np.ndarray, np.ndarray] | None, *, config: Any,
          classes: np.ndarray, random_state: int | None,
          name: str) -> tuple[np.ndarray, int, LogisticRegression]:
    """A probe's full-batch solve: :func:`choose_C` on its grid, then the refit.

    Args:
        X, y: The fit rows (standardized) and targets.
        validation: The validation rows (standardized) and targets, or ``None``.
        config: The probe's :class:`~lm_probe.probes.config.ProbeConfig` (``Cs``, ``cv``,
            ``scoring``, the estimator's arguments).
        classes: The probe's classes (sorted); each must have fit rows.
        random_state: Seed of the estimators.
        name: The probe's name, for the message.

    Returns:
        ``(loss, best, estimator)``: the held-out log-loss of each ``C``, the index of the
        chosen one (:func:`best_C`), and the logistic regression refit with it on the fit
        and validation rows.

    Raises:
        ValueError: a class has no fit rows.
    """
    missing = sorted(set(classes.tolist()) - set(np.unique(y).tolist()))
    if missing:
        raise ValueError(f"probe {name!r}: solver='lbfgs' needs every class in the fit rows; classes "
                         f"{format_labels(missing, getattr(config, 'label_names', None))} have none")
    kwargs = dict(config.probe_kwargs)
    Cs, folds = config.Cs, getattr(config, "cv", "validation")  # configs saved before cv
    accuracy, loss, X, y = choose_C(X, y, validation, Cs=Cs, folds=folds, classes=np.asarray(classes),
                                    random_state=random_state, kwargs=kwargs)
    best = best_C(accuracy, loss, getattr(config, "scoring", "log_loss"))  # configs saved before scoring
    return loss, best, fit_logistic(Cs[best], X, y, random_state, kwargs)
