"""Classification metrics for a probe's predictions, as plain floats."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

__all__ = ["classification_metrics", "regression_metrics", "METRIC_COLUMNS", "REGRESSION_COLUMNS"]

METRIC_COLUMNS = ("loss", "accuracy", "precision", "recall", "f1", "matthews")
REGRESSION_COLUMNS = ("loss", "r2", "mse", "pearson")


def classification_metrics(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """Log-loss and label metrics of predicted probabilities.

    Args:
        y: ``(n,)`` true labels.
        proba: ``(n, n_classes)`` probabilities, columns in the order of ``classes``.
        classes: The probe's classes.

    Returns:
        ``loss`` (mean log-loss), ``accuracy``, macro ``precision``, ``recall`` and
        ``f1`` over ``classes`` (0 where a class is never predicted), ``matthews``, and
        ``support``: ``{class: count of true labels}``.
    """
    pred = np.asarray(classes)[np.argmax(proba, axis=1)]
    labels = list(classes)
    return {
        "loss": float(skm.log_loss(y, np.asarray(proba, np.float64), labels=labels)),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "precision": float(skm.precision_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "recall": float(skm.recall_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "f1": float(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "matthews": float(skm.matthews_corrcoef(y, pred)),
        "support": {int(c): int(np.sum(np.asarray(y) == c)) for c in labels},
    }


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """``loss`` (= ``mse``), ``r2``, ``mse`` and ``pearson`` of predictions against targets."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    mse = float(skm.mean_squared_error(y, pred))
    pearson = float(np.corrcoef(y, pred)[0, 1]) if len(y) > 1 and y.std() > 0 and pred.std() > 0 else float("nan")
    return {"loss": mse, "r2": float(skm.r2_score(y, pred)), "mse": mse, "pearson": pearson}
