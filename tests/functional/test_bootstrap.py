"""Bootstrap intervals against a slow reference loop over the same rng draws."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from lm_probe.functional.bootstrap import (bootstrap_interval, classification_statistics, mean_statistics,
                                           regression_statistics)


def _proba(n, k, seed, decimals=1):
    """Probabilities that mostly favour the true class, rounded so that scores tie."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = np.round(rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y], decimals)
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


def _reference(n, n_boot, seed, ci, metric):
    """Percentiles of ``metric(idx)`` over resamples drawn one at a time: row indices
    floor(u * n), u = rng.random(n), as the module documents."""
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n_boot):
            idx = np.minimum(np.floor(rng.random(n) * n).astype(int), n - 1)
            for name, value in metric(idx).items():
                values.setdefault(name, []).append(value)
    out = {}
    for name, v in values.items():
        v = np.array(v, float)
        v = v[~np.isnan(v)]
        out[name] = tuple(np.percentile(v, [50 * (1 - ci), 50 * (1 + ci)])) if len(v) else (np.nan, np.nan)
    return out


def _sk_classification(y, p, classes):
    """Every bootstrapped classification metric, from scikit-learn (and a numpy ECE loop)."""
    pred = classes[p.argmax(1)]
    labels = list(classes)
    out = {"loss": skm.log_loss(y, p, labels=labels), "accuracy": skm.accuracy_score(y, pred),
           "precision": skm.precision_score(y, pred, labels=labels, average="macro", zero_division=0),
           "recall": skm.recall_score(y, pred, labels=labels, average="macro", zero_division=0),
           "f1": skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0),
           "matthews": skm.matthews_corrcoef(y, pred)}
    conf, ece = p.max(1), 0.0
    for lo, hi in zip(np.linspace(0, 1, 16)[:-1], np.linspace(0, 1, 16)[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(np.mean(pred[inside] == y[inside]) - conf[inside].mean())
    out["ece"] = ece
    one_class = any(np.all(y == c) or not np.any(y == c) for c in labels)
    if len(labels) == 2:
        out["auroc"] = np.nan if one_class else skm.roc_auc_score(y == labels[1], p[:, 1])
        if one_class:
            out["recall_at_fpr"] = np.nan
        else:
            fpr, tpr, _ = skm.roc_curve(y == labels[1], p[:, 1], drop_intermediate=False)
            out["recall_at_fpr"] = tpr[fpr <= 0.01].max()
    else:
        out["auroc"] = np.nan if one_class else skm.roc_auc_score(y, p, multi_class="ovr", labels=labels)
        out["recall_at_fpr"] = np.nan
    return out


@pytest.mark.parametrize("k, n, n_boot", [(2, 37, 150), (3, 37, 150), (2, 300, 60)])
def test_classification_intervals_equal_a_reference_loop(k, n, n_boot):
    """Small sets with many ties; 300 rows: 1% of the negatives is one row, so recall_at_fpr
    is neither 0 nor 1."""
    seed, ci = 4, 0.9
    y, p = _proba(n, k, seed=k, decimals=1 if n < 100 else 2)
    classes = np.arange(k)
    # max_cells=100: chunks of 2 resamples, so the chunking is exercised
    got = bootstrap_interval(classification_statistics(y, p, classes), n, ci=ci, n_boot=n_boot, seed=seed,
                             max_cells=100)
    ref = _reference(n, n_boot, seed, ci, lambda idx: _sk_classification(y[idx], p[idx], classes))
    assert set(got) == set(ref)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-12, equal_nan=True, err_msg=name)


def test_intervals_contain_the_point_estimate():
    y, p = _proba(200, 2, seed=0, decimals=3)
    classes = np.arange(2)
    got = bootstrap_interval(classification_statistics(y, p, classes), 200, n_boot=500, seed=1)
    point = _sk_classification(y, p, classes)
    for name, (lo, hi) in got.items():
        assert lo <= point[name] <= hi, name
        assert hi > lo, name


def test_regression_intervals_equal_a_reference_loop():
    rng = np.random.default_rng(0)
    n = 30
    y = rng.normal(size=n) + 100.0  # an offset: the moments are centred first
    pred = y + rng.normal(scale=0.5, size=n)
    got = bootstrap_interval(regression_statistics(y, pred), n, ci=0.8, n_boot=200, seed=2, max_cells=90)
    ref = _reference(n, 200, 2, 0.8, lambda i: {
        "loss": skm.mean_squared_error(y[i], pred[i]), "mse": skm.mean_squared_error(y[i], pred[i]),
        "r2": skm.r2_score(y[i], pred[i]), "pearson": np.corrcoef(y[i], pred[i])[0, 1]})
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-9, err_msg=name)


def test_mean_statistics_and_seeding():
    rng = np.random.default_rng(0)
    d = rng.integers(-1, 2, 50).astype(float)
    got = bootstrap_interval(mean_statistics({"d": d}), 50, n_boot=300, seed=7)
    assert got == bootstrap_interval(mean_statistics({"d": d}), 50, n_boot=300, seed=7, max_cells=50)
    assert got["d"] == pytest.approx(_reference(50, 300, 7, 0.95, lambda i: {"d": d[i].mean()})["d"], abs=1e-12)
    assert got != bootstrap_interval(mean_statistics({"d": d}), 50, n_boot=300, seed=8)


def test_undefined_resamples_are_left_out_and_empty_sets_give_nothing():
    y = np.array([0] * 9 + [1])  # many resamples have no positive: AUROC undefined there
    p = np.column_stack([np.linspace(0.9, 0.1, 10), np.linspace(0.1, 0.9, 10)])
    got = bootstrap_interval(classification_statistics(y, p, np.arange(2)), 10, n_boot=200, seed=0)
    assert got["auroc"] == (1.0, 1.0)  # defined resamples only: the positive always ranks first
    only_one = bootstrap_interval(classification_statistics(np.zeros(5, int), p[:5], np.arange(2)), 5,
                                  n_boot=50, seed=0)
    assert np.isnan(only_one["auroc"]).all() and np.isnan(only_one["recall_at_fpr"]).all()
    assert bootstrap_interval(mean_statistics({"d": np.zeros(0)}), 0, n_boot=10) == {}
