"""OnlineSGDClassifier against scikit-learn's SGDClassifier: the same weights after many
partial_fit calls, whichever of the two takes the steps."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import SGDClassifier
from sklearn.utils._seq_dataset import ArrayDataset64

from lm_probe.functional.sgd import shuffled_order
from lm_probe.probes.config import ProbeConfig
from lm_probe.probes.online_sgd import OnlineSGDClassifier

SETTINGS = [
    dict(alpha=1e-3, eta0=0.01, learning_rate="constant", random_state=0),
    dict(alpha=1e-4, eta0=0.1, learning_rate="invscaling", power_t=0.4, random_state=3),
    dict(alpha=1e-3, eta0=0.01, learning_rate="constant", random_state=0, class_weight={1: 3.0, 3: 0.5}),
    dict(eta0=0.01, learning_rate="constant", penalty=None, random_state=7),
    dict(alpha=200.0, eta0=0.01, learning_rate="constant", random_state=0),  # shrinkage to 0 at every row
    dict(alpha=1e-3, eta0=0.01, learning_rate="constant", random_state=0, shuffle=False, fit_intercept=False),
    dict(alpha=1e-3, eta0=0.01, learning_rate="constant", random_state=None),
    dict(alpha=1e-3, eta0=5.0, learning_rate="constant", random_state=1),  # scores far past -37: the other branch
    dict(alpha=1e-3, learning_rate="optimal", random_state=0),
    dict(alpha=1e-3, eta0=0.02, learning_rate="adaptive", random_state=0),
    dict(alpha=1e-3, eta0=0.01, penalty="elasticnet", random_state=0),  # scikit-learn's own steps
]


def _train(cls, K: int, batches: int = 30, **kwargs) -> SGDClassifier:
    rng = np.random.default_rng(1)
    classes = np.arange(K) * 2 + 1  # labels that are not their own indices
    est = cls(loss="log_loss", **kwargs)
    np.random.seed(5)  # random_state=None draws from numpy's global generator
    for _ in range(batches):
        y = classes[rng.integers(0, K, 16)]
        X = rng.normal(size=(16, 20)) + 0.3 * y[:, None]
        est.partial_fit(X, y, classes=classes)
    return est


@pytest.mark.parametrize("K", [2, 3, 6])
@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_weights_equal_scikit_learns(K, kwargs):
    ours, theirs = _train(OnlineSGDClassifier, K, **kwargs), _train(SGDClassifier, K, **kwargs)
    assert np.abs(theirs.coef_).max() > 1e-3  # something was learned (not the all-zero start)
    huge = kwargs.get("eta0", 0) > 1 or kwargs.get("learning_rate") == "optimal"  # first steps near 5
    rtol = 1e-5 if huge else 1e-10  # huge steps amplify the rounding of the dot products' summation order
    np.testing.assert_allclose(ours.coef_, theirs.coef_, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(ours.intercept_, theirs.intercept_, rtol=rtol, atol=1e-12)
    assert ours.t_ == theirs.t_ and ours.coef_.shape == theirs.coef_.shape
    X = np.random.default_rng(2).normal(size=(8, 20))
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), rtol=100 * rtol, atol=1e-9)


def test_shuffled_order_is_scikit_learns_shuffle():
    for n, seed in [(9, 12345), (16, 2**31 - 2), (33, 0), (2, 7)]:
        dataset = ArrayDataset64(np.zeros((n, 1)), np.arange(n, dtype=np.float64), np.ones(n), seed=1)
        dataset._shuffle_py(seed)
        assert shuffled_order(n, seed).tolist() == [int(dataset._next_py()[1]) for _ in range(n)]


def test_sample_weights_go_to_scikit_learn():
    rng = np.random.default_rng(0)
    X, y, w = rng.normal(size=(16, 5)), np.arange(16) % 2, rng.uniform(0.5, 2, 16)
    ours, theirs = (cls(loss="log_loss", random_state=0) for cls in (OnlineSGDClassifier, SGDClassifier))
    for est in (ours, theirs):
        est.partial_fit(X, y, classes=[0, 1])
        est.partial_fit(X, y, sample_weight=w)
    np.testing.assert_allclose(ours.coef_, theirs.coef_, rtol=1e-12)


def test_bad_batches_are_refused():
    rng = np.random.default_rng(0)
    est = OnlineSGDClassifier(loss="log_loss", learning_rate="constant", eta0=0.1, random_state=0).partial_fit(rng.normal(size=(4, 5)), [0, 1, 0, 1], classes=[0, 1])
    with pytest.raises(ValueError, match=r"labels \[2\] are not in classes \[0, 1\]"):
        est.partial_fit(rng.normal(size=(4, 5)), [0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"expected \(rows, 5\)"):
        est.partial_fit(rng.normal(size=(4, 6)), [0, 1, 0, 1])


def test_the_linear_head_is_online_sgd_and_named_as_sklearns():
    config = ProbeConfig("model.layers.0.output")
    assert config.estimator is OnlineSGDClassifier and issubclass(OnlineSGDClassifier, SGDClassifier)
    with pytest.raises(TypeError, match=r"unknown SGDClassifier arguments \['alhpa'\]"):
        ProbeConfig("model.layers.0.output", alhpa=1.0)
