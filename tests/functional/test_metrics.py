"""AUROC, ECE and recall at a false-positive rate against scikit-learn and numpy loops."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from lm_probe.functional.metrics import (METRIC_COLUMNS, classification_metrics, expected_calibration_error,
                                         prediction_loss, recall_at_fpr)


def _data(n, k, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + np.eye(k)[y]
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


def _ece_loop(y, p, bins=15):
    """ECE by hand: bins (lo, hi], each weighted by its share of the rows."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        rows = [i for i in range(len(y)) if lo < p[i].max() <= hi]
        if rows:
            acc = sum(int(np.argmax(p[i]) == y[i]) for i in rows) / len(rows)
            conf = sum(float(p[i].max()) for i in rows) / len(rows)
            total += len(rows) / len(y) * abs(acc - conf)
    return total


def _recall_at_fpr_loop(positive, score, max_fpr=0.01):
    """The best recall over every threshold t (predict positive when score >= t) with
    false-positive rate <= max_fpr, by brute force."""
    best = 0.0
    for t in sorted(set(score.tolist())):
        predicted = score >= t
        fpr = np.sum(predicted & ~positive) / np.sum(~positive)
        if fpr <= max_fpr:
            best = max(best, np.sum(predicted & positive) / np.sum(positive))
    return best


def test_binary_metrics_equal_references():
    y, p = _data(400, 2, seed=0)
    m = classification_metrics(y, p, np.arange(2))
    assert set(METRIC_COLUMNS) <= set(m)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]), abs=1e-12)
    assert m["ece"] == pytest.approx(_ece_loop(y, p), abs=1e-12)
    assert m["recall_at_fpr"] == pytest.approx(_recall_at_fpr_loop(y == 1, p[:, 1]), abs=1e-12)
    assert 0 < m["recall_at_fpr"] < 1


def test_multiclass_auroc_is_one_vs_rest_macro():
    y, p = _data(300, 4, seed=1)
    m = classification_metrics(y, p, np.arange(4))
    per_class = [skm.roc_auc_score(y == c, p[:, c]) for c in range(4)]
    assert m["auroc"] == pytest.approx(np.mean(per_class), abs=1e-12)
    assert m["ece"] == pytest.approx(_ece_loop(y, p), abs=1e-12)
    assert np.isnan(m["recall_at_fpr"])  # binary tasks only


def test_labels_that_are_not_0_to_k():
    y, p = _data(200, 2, seed=2)
    labels = np.array([3, 7])
    m = classification_metrics(labels[y], p, labels)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]), abs=1e-12)
    assert m["recall_at_fpr"] == pytest.approx(_recall_at_fpr_loop(y == 1, p[:, 1]), abs=1e-12)


def test_undefined_with_a_single_class():
    _, p = _data(50, 2, seed=3)
    m = classification_metrics(np.zeros(50, int), p, np.arange(2))
    assert np.isnan(m["auroc"]) and np.isnan(m["recall_at_fpr"])
    assert m["ece"] == pytest.approx(_ece_loop(np.zeros(50, int), p), abs=1e-12)
    assert np.isnan(recall_at_fpr(np.ones(5, bool), np.arange(5.0)))


def test_ece_of_a_perfectly_calibrated_bin_is_zero():
    # confidence 0.75 (one bin), right on 3 of 4 rows: no gap
    p = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(np.array([0, 0, 0, 1]), p, np.arange(2)) == pytest.approx(0.0, abs=1e-15)
    assert expected_calibration_error(np.array([1, 1, 1, 1]), p, np.arange(2)) == pytest.approx(0.75)


@pytest.mark.parametrize("n_classes", [2, 3, 6])
def test_prediction_loss_is_scikit_learns_log_loss(n_classes):
    """The validation loss, computed without scikit-learn's input checks, equals its log_loss
    (labels not 0..K-1, certain and impossible predictions clipped the same way); bad input
    still gets scikit-learn's error."""
    rng = np.random.default_rng(n_classes)
    classes = np.array([3, 7, 9, 11, 12, 20][:n_classes])
    for n in (1, 5, 200):
        proba = rng.dirichlet(np.ones(n_classes), n)
        proba[: n // 2] = np.eye(n_classes)[rng.integers(0, n_classes, n // 2)]  # 0 and 1 exactly
        y = rng.choice(classes, n)
        assert prediction_loss(y, proba, classes) == pytest.approx(skm.log_loss(y, proba, labels=list(classes)),
                                                                   rel=1e-13, abs=1e-13)
    with pytest.raises(ValueError):
        prediction_loss(np.array([3, 4]), np.full((2, n_classes), 1 / n_classes), classes)  # 4 is no class
