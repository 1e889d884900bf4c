"""Classification and regression metrics for a probe's predictions, as plain floats.

Beside the label metrics, a classifier gets the figures a monitor is judged by: ``auroc``
(binary, or one-vs-rest macro beyond two classes), ``ece`` (expected calibration error of the
top-class confidence over :data:`ECE_BINS` equal-width bins, weighted by bin counts) and,
for two classes, ``recall_at_fpr`` (the largest recall whose false-positive rate on the test
set is at most :data:`MAX_FPR`). Each is NaN where it is undefined (a single class in ``y``).
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

ECE_BINS = 15
MAX_FPR = 0.01

__all__ = ["classification_metrics", "regression_metrics", "prediction_loss", "expected_calibration_error",
           "recall_at_fpr", "confidence_bins",
           "METRIC_COLUMNS", "REGRESSION_COLUMNS", "ECE_BINS", "MAX_FPR"]

METRIC_COLUMNS = ("loss", "accuracy", "precision", "recall", "f1", "matthews", "auroc", "ece", "recall_at_fpr")
REGRESSION_COLUMNS = ("loss", "r2", "mse", "pearson")


def classification_metrics(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """Log-loss and label metrics of predicted probabilities.

    Args:
        y: ``(n,)`` true labels.
        proba: ``(n, n_classes)`` probabilities, columns in the order of ``classes``.
        classes: The probe's classes.

    Returns:
        ``loss`` (mean log-loss), ``accuracy``, macro ``precision``, ``recall`` and
        ``f1`` over ``classes`` (0 where a class is never predicted), ``matthews``,
        ``auroc``, ``ece``, ``recall_at_fpr`` (see the module) and ``support``:
        ``{class: count of true labels}``.
    """
    y, proba = np.asarray(y), np.asarray(proba, np.float64)
    classes = np.asarray(classes)
    pred = classes[np.argmax(proba, axis=1)]
    labels = list(classes)
    present = all(0 < np.sum(y == c) < len(y) for c in labels) and len(labels) >= 2
    if len(labels) == 2:
        auroc = float(skm.roc_auc_score(y == labels[1], proba[:, 1])) if present else np.nan
        at_fpr = recall_at_fpr(y == labels[1], proba[:, 1]) if present else np.nan
    else:
        auroc = float(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=labels)) \
            if present else np.nan
        at_fpr = np.nan
    return {
        "loss": prediction_loss(y, proba, classes),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "precision": float(skm.precision_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "recall": float(skm.recall_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "f1": float(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "matthews": float(skm.matthews_corrcoef(y, pred)),
        "auroc": auroc,
        "ece": expected_calibration_error(y, proba, classes),
        "recall_at_fpr": float(at_fpr),
        "support": {int(c): int(np.sum(np.asarray(y) == c)) for c in labels},
    }


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """``loss`` (= ``mse``), ``r2``, ``mse`` and ``pearson`` of predictions against targets."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    mse = prediction_loss(y, pred)
    pearson = float(np.corrcoef(y, pred)[0, 1]) if len(y) > 1 and y.std() > 0 and pred.std() > 0 else float("nan")
    return {"loss": mse, "r2": float(skm.r2_score(y, pred)), "mse": mse, "pearson": pearson}


def prediction_loss(y: np.ndarray, out: np.ndarray, classes: np.ndarray | None = None) -> float:
    """The ``loss`` of :func:`classification_metrics` (log-loss of ``(n, n_classes)``
    probabilities over ``classes``) or, with ``classes=None``, of :func:`regression_metrics`
    (mean squared error of predictions): what a probe is validated on, without the other
    metrics."""
    if classes is None:
        return float(skm.mean_squared_error(np.asarray(y, np.float64), np.asarray(out, np.float64)))
    y, proba, labels = np.asarray(y), np.asarray(out, np.float64), np.unique(np.asarray(classes))
    col = np.clip(np.searchsorted(labels, y), 0, len(labels) - 1)
    if not len(y) or proba.shape != (len(y), len(labels)) or np.any(labels[col] != y):  # scikit-learn's errors
        return float(skm.log_loss(y, proba, labels=list(classes)))
    eps = np.finfo(np.float64).eps  # scikit-learn's log_loss, without its input checks (a probe validates often)
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), col], eps, 1 - eps))))


def confidence_bins(conf: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """The bin of each top-class confidence among ``bins`` equal-width bins
    ``(k / bins, (k + 1) / bins]`` (the first bin also takes 0)."""
    return np.clip(np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], conf, side="left"), 0, bins - 1)


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, classes: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-class confidence.

    The confidences are split into ``bins`` equal-width bins ``(k / bins, (k + 1) / bins]``;
    ECE = sum over bins of ``n_bin / n * |accuracy_bin - mean confidence_bin|``.

    Args:
        y: ``(n,)`` true labels.
        proba: ``(n, n_classes)`` probabilities, columns in the order of ``classes``.
        classes: The classes.
    """
    proba = np.asarray(proba, np.float64)
    if len(proba) == 0:
        return float("nan")
    correct = np.asarray(classes)[np.argmax(proba, axis=1)] == np.asarray(y)
    conf = proba.max(axis=1)
    gaps = np.bincount(confidence_bins(conf, bins), weights=correct - conf, minlength=bins)
    return float(np.abs(gaps).sum() / len(conf))


def recall_at_fpr(positive: np.ndarray, score: np.ndarray, max_fpr: float = MAX_FPR) -> float:
    """The largest recall (true-positive rate) at a threshold whose false-positive rate is at
    most ``max_fpr``, from scikit-learn's ``roc_curve`` (every threshold kept); NaN with a
    single class.

    Args:
        positive: ``(n,)`` booleans, True for the positive class.
        score: ``(n,)`` scores, higher for the positive class.
    """
    positive = np.asarray(positive, bool)
    if positive.all() or not positive.any():
        return float("nan")
    fpr, tpr, _ = skm.roc_curve(positive, np.asarray(score, np.float64), drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max())
