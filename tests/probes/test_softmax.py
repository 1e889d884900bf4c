"""The multinomial online head (head="softmax"): against scikit-learn's multinomial
LogisticRegression on the same rows, and where one-vs-rest cannot follow it."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from lm_probe import ProbeConfig, ProbeDataset, ProbeRunner
from lm_probe.core.sites import Site
from lm_probe.core.sources import ArraySource
from lm_probe.functional.sgd import softmax_sgd_step
from lm_probe.probes.config import default_alpha
from lm_probe.probes.softmax import SoftmaxSGDClassifier

SITE = "x.output"


def ordinal(n=1500, d=6, seed=0):
    """Rows whose label is one of 5 ordinal bins of a noisy direction: the middle bins are
    slabs, which one-vs-rest hyperplanes cannot cut out."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d) + rng.standard_normal(d)
    score = X @ rng.standard_normal(d) + 0.3 * rng.standard_normal(n)
    y = np.digitize(score, np.quantile(score, [0.2, 0.4, 0.6, 0.8]))
    data = ProbeDataset([np.array([1, 2])] * n, y)
    source = ArraySource({(SITE, "mean"): X.astype(np.float32)}, data.example_ids,
                         {SITE: Site(0, "x", "output", SITE, None)})
    return X, y, data, source


def test_one_step_is_the_summed_cross_entropy_gradient():
    """The step against a slow loop: each row's own softmax gradient at the batch-start
    weights, the shrinkage (1 - eta * alpha) once per row."""
    rng = np.random.default_rng(1)
    W, b, X = rng.normal(size=(3, 4)), rng.normal(size=3), rng.normal(size=(5, 4))
    y = np.array([0, 2, 1, 2, 0])
    Y = np.eye(3)[y]
    eta, alpha = 0.05, 0.1
    gW, gb = np.zeros_like(W), np.zeros_like(b)
    for x, t in zip(X, Y):
        z = W @ x + b
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        gW += np.outer(p - t, x)
        gb += p - t
    W2, b2 = softmax_sgd_step(W, b, X, Y, np.ones(5), eta, alpha)
    np.testing.assert_allclose(W2, W * (1 - eta * alpha) ** 5 - eta * gW, rtol=1e-12)
    np.testing.assert_allclose(b2, b - eta * gb, rtol=1e-12)


@pytest.mark.parametrize("rows_per_step", [1, 4, 100])
def test_a_batch_is_stepped_rows_per_step_rows_at_a_time(rows_per_step):
    """partial_fit against a slow loop: the batch's rows in order, ``rows_per_step`` at a
    time, each chunk one step of its rows' summed gradient at the chunk's starting weights
    (``rows_per_step=1``: plain per-row SGD), invscaling's step from the rows seen before the chunk."""
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(10, 4)), rng.integers(0, 3, 10)
    est = SoftmaxSGDClassifier(alpha=0.1, eta0=0.2, learning_rate="invscaling", power_t=0.5,
                               class_weight={2: 3.0}, rows_per_step=rows_per_step)
    est.partial_fit(X, y, classes=[0, 1, 2])
    W, b, t = np.zeros((3, 4)), np.zeros(3), 1.0
    for lo in range(0, 10, rows_per_step):
        eta, gW, gb = 0.2 / t ** 0.5, np.zeros((3, 4)), np.zeros(3)
        for x, label in zip(X[lo:lo + rows_per_step], y[lo:lo + rows_per_step]):
            z = W @ x + b
            g = (np.exp(z) / np.exp(z).sum() - np.eye(3)[label]) * (3.0 if label == 2 else 1.0)
            gW, gb = gW + np.outer(g, x), gb + g
        n = len(y[lo:lo + rows_per_step])
        W, b, t = W * (1 - eta * 0.1) ** n - eta * gW, b - eta * gb, t + n
    np.testing.assert_allclose(est.coef_, W, rtol=1e-12)
    np.testing.assert_allclose(est.intercept_, b, rtol=1e-12)
    assert est.t_ == t == 11


def test_it_converges_to_the_multinomial_logistic_regression_with_the_same_C():
    """Many epochs with a decaying step: the averaged weights reach the minimizer of
    LogisticRegression(C) at alpha = 1 / (C * rows) (same standardized rows)."""
    X, y, _, _ = ordinal(n=600, d=4)
    Z = StandardScaler().fit_transform(X)
    C = 0.5
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(Z, y)
    est = SoftmaxSGDClassifier(alpha=default_alpha(len(y), C), eta0=0.01)
    rng = np.random.default_rng(0)
    avg, seen = None, 0
    for epoch in range(200):
        order = rng.permutation(len(y))
        for i in range(0, len(y), 10):
            rows = order[i:i + 10]
            est.partial_fit(Z[rows], y[rows], classes=np.arange(5))
            if epoch >= 100:  # the average of the iterates after a burn-in
                seen += 1
                avg = est.coef_.copy() if avg is None else avg + (est.coef_ - avg) / seen
    assert np.abs(ref.coef_).max() > 1, "a non-trivial solution"
    np.testing.assert_allclose(avg, ref.coef_, atol=0.005)


def test_softmax_probes_follow_ordinal_bins_where_one_vs_rest_cannot():
    """On 5 ordinal bins the online softmax probe is within 0.03 of the offline multinomial
    logistic regression; the one-vs-rest SGD probe of the same schedule is well below it."""
    X, y, data, source = ordinal()
    train, test = data.tt_split(0.25, seed=0)
    tr, te = train.example_ids, test.example_ids
    scaler = StandardScaler().fit(X[tr])
    offline = LogisticRegression(C=1.0, max_iter=5000).fit(scaler.transform(X[tr]), y[tr])
    ceiling = offline.score(scaler.transform(X[te]), y[te])
    schedule = dict(num_epochs=60, lr_decay=0.5, decay_patience=3, patience=15)
    acc = {}
    for head in ("softmax", "linear"):
        runner = ProbeRunner.from_source(source, [ProbeConfig(SITE, head=head, eta0=0.01)], progress=False)
        acc[head] = runner.fit_probes(train, test, **schedule).metrics.loc[SITE, "accuracy"]
    assert acc["softmax"] >= ceiling - 0.03, (acc, ceiling)
    assert acc["linear"] < ceiling - 0.08, (acc, ceiling)


def test_softmax_probes_save_and_load(tmp_path):
    _, _, data, source = ordinal(n=300)
    runner = ProbeRunner.from_source(source, [ProbeConfig(SITE, head="softmax")], progress=False)
    runner.fit_probes(data, num_epochs=2)
    runner.save(tmp_path / "p")
    back = ProbeRunner.load(tmp_path / "p")
    X = source.arrays[(SITE, "mean")][:20] if hasattr(source, "arrays") else None
    X = np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32) if X is None else X
    np.testing.assert_array_equal(back[SITE].predict_proba(X), runner[SITE].predict_proba(X))
    assert type(back[SITE].estimator_) is SoftmaxSGDClassifier


def test_softmax_is_refused_for_regression():
    with pytest.raises(ValueError, match="'softmax'"):
        ProbeConfig(SITE, head="softmax", task="regression")
