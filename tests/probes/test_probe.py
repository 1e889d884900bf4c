import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import SGDClassifier

from lm_probe import LinearProbe, NotComputedError, ProbeConfig
from lm_probe.core.consumer import RunContext
from lm_probe.probes.config import DEFAULT_PROBE_KWARGS, default_alpha
from lm_probe.probes.training import Training

#: The defaults as scikit-learn takes them for a probe stepped by hand (no row count: alpha 1e-4).
BY_HAND = {**DEFAULT_PROBE_KWARGS, "alpha": 1e-4}  # as alpha="auto" gives a probe stepped by hand


def batches(seed=0, n=240, d=6, classes=(0, 1)):
    rng = np.random.default_rng(seed)
    y = rng.choice(classes, size=n)
    X = rng.normal(size=(n, d)) + np.asarray(y)[:, None] * 0.7 + 5.0
    return [(X[i:i + 16].astype(np.float32), y[i:i + 16]) for i in range(0, n, 16)]


def test_without_standardization_it_is_exactly_sgdclassifier():
    probe = LinearProbe(ProbeConfig("x.output", classes=[0, 1], standardize=False, alpha=1e-3,
                                    learning_rate="optimal", average=False), random_state=3)
    ref = SGDClassifier(loss="log_loss", random_state=3, **{**DEFAULT_PROBE_KWARGS, "alpha": 1e-3,
                                                           "learning_rate": "optimal", "average": False})
    for X, y in batches():
        probe.partial_fit(X, y)
        ref.partial_fit(X.astype(np.float64), y, classes=[0, 1])
    # After its first call the head steps in numpy (OnlineSGDClassifier): scikit-learn's
    # arithmetic, its dot products summed in another order.
    np.testing.assert_allclose(probe.coef_, ref.coef_, rtol=1e-11)
    X = batches(1)[0][0]
    np.testing.assert_allclose(probe.predict_proba(X), ref.predict_proba(X.astype(np.float64)), rtol=1e-11)


@pytest.mark.parametrize("classes", [(0, 1), (0, 1, 2)])
def test_averaged_sgd_equals_sklearns_single_pass_fit(classes):
    """One row per batch, the probe's ASGD is scikit-learn's averaged SGD over one pass
    (``fit``, which keeps the running intercept right; ``partial_fit`` with ``average``
    restarts it from a stale value on every call, which is why the probe averages itself)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4)) + 1.0
    y = np.where(X[:, 0] + rng.normal(size=300) > 1.8, classes[-1], classes[0])  # imbalanced: needs an intercept
    if len(classes) == 3:
        y[rng.random(300) < 0.3] = 1
    kwargs = dict(loss="log_loss", learning_rate="constant", eta0=0.01, alpha=1e-4)
    ref = SGDClassifier(**kwargs, average=True, shuffle=False, max_iter=1, tol=None, random_state=0)
    ref.fit(X, y)
    probe = LinearProbe(ProbeConfig("x.output", classes=classes, standardize=False, head="linear", **kwargs),
                        random_state=0)
    for i in range(len(y)):
        probe.partial_fit(X[i:i + 1], y[i:i + 1])
    np.testing.assert_allclose(probe.coef_, ref.coef_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(probe.intercept_, ref.intercept_, rtol=1e-9, atol=1e-12)
    buggy = SGDClassifier(**kwargs, average=True, random_state=0)
    for i in range(0, len(y), 30):
        buggy.partial_fit(X[i:i + 30], y[i:i + 30], classes=classes)
    assert np.abs(buggy.intercept_ - ref.intercept_).max() > 0.1, "scikit-learn fixed partial_fit + average"


def test_standardization_uses_running_float64_moments():
    ref = SGDClassifier(loss="log_loss", random_state=0, **{**BY_HAND, "average": False})
    probe = LinearProbe(ProbeConfig("x.output", classes=[0, 1], average=False), random_state=0)
    seen = []
    for X, y in batches():
        seen.append(X.astype(np.float64))
        allx = np.concatenate(seen)
        mean, std = allx.mean(0), allx.std(0)
        probe.partial_fit(X, y)
        ref.partial_fit((X - mean) / std, y, classes=[0, 1])
    np.testing.assert_allclose(probe.mean_, mean, rtol=1e-12)
    np.testing.assert_allclose(probe.scale_, std, rtol=1e-10)
    np.testing.assert_allclose(probe.coef_, ref.coef_, rtol=1e-9)


def test_multiclass_with_arbitrary_integer_labels():
    probe = LinearProbe(ProbeConfig("x.output", classes={7, -1, 3}), random_state=0)
    for X, y in batches(classes=(-1, 3, 7), n=480):
        probe.partial_fit(X, y)
    X, y = batches(5, classes=(-1, 3, 7), n=480)[0]
    assert probe.classes_.tolist() == [-1, 3, 7]
    assert probe.predict_proba(X).shape == (16, 3)
    assert set(probe.predict(X)) <= {-1, 3, 7}


def test_predict_before_fit_is_a_clear_error():
    probe = LinearProbe(ProbeConfig("x.output", classes=[0, 1]))
    with pytest.raises(NotFittedError, match="not fitted yet"):
        probe.predict(np.zeros((1, 3)))
    with pytest.raises(NotComputedError, match="not fitted yet"):  # the error of every consumer, too
        probe.compute()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(classes=[1]), ValueError, "at least two classes"),
        (dict(pool="avg"), ValueError, "unknown pool 'avg'"),
        (dict(head="cnn"), ValueError, r"head must be 'auto', 'linear', 'softmax' \(classification\) or 'mlp'"),
        (dict(task="regression", classes=[0, 1]), ValueError, "regression probe has no classes"),
        (dict(task="regression", control=True), ValueError, "control tasks are defined for classification"),
        (dict(head="mlp", eta0=0.1), TypeError, r"unknown MLPClassifier arguments \['eta0'\]"),
        (dict(alhpa=0.1), TypeError, r"unknown SGDClassifier arguments \['alhpa'\]"),
        (dict(loss="hinge"), ValueError, "log_loss"),
        (dict(class_weight="balanced"), ValueError, "pass a dict"),
    ],
)
def test_config_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        ProbeConfig("model.layers.0.output", **kwargs)


def test_defaults_are_a_small_constant_step_and_can_be_overridden():
    assert DEFAULT_PROBE_KWARGS == {"learning_rate": "constant", "eta0": 0.003, "average": True, "alpha": "auto"}
    assert LinearProbe(ProbeConfig("a.output")).estimator_.get_params()["learning_rate"] == "constant"
    params = LinearProbe(ProbeConfig("a.output", learning_rate="optimal")).estimator_.get_params()
    assert params["learning_rate"] == "optimal"


def test_config_passes_sgd_arguments_through():
    cfg = ProbeConfig("a.output", classes=[0, 1], alpha=0.01, penalty="l1", class_weight={0: 1.0, 1: 2.0})
    probe = LinearProbe(cfg)
    params = probe.estimator_.get_params()
    assert (params["alpha"], params["penalty"], params["class_weight"]) == (0.01, "l1", {0: 1.0, 1: 2.0})


def test_class_names_need_label_names_and_map_through_them():
    with pytest.raises(ValueError, match=r"probe 'l3': classes \['neg', 'pos'\] are class names, .*label_names="):
        ProbeConfig("model.layers.3.output", classes={"pos", "neg"}, name="l3")
    config = ProbeConfig("model.layers.3.output", classes={"pos", "neg"}, label_names=["neg", "pos"])
    assert config.classes == (0, 1) and config.label_names == ["neg", "pos"]
    assert ProbeConfig("x.output", classes={"neutral", "pos"}, label_names=["neg", "neutral", "pos"]).classes == (1, 2)
    with pytest.raises(ValueError, match=r"classes \['good'\] are not among label_names \['neg', 'pos'\]"):
        ProbeConfig("x.output", classes={"pos", "good"}, label_names=["neg", "pos"])
    with pytest.raises(ValueError, match="mix class names and integer labels"):
        ProbeConfig("x.output", classes={"pos", 0}, label_names=["neg", "pos"])
    with pytest.raises(ValueError, match=r"classes=\[1 \(pos\)\] needs at least two classes"):
        ProbeConfig("x.output", classes={"pos"}, label_names=["neg", "pos"])


def test_auto_alpha_is_logistic_regressions_C_in_sgd_units():
    """alpha="auto" = 1 / (C * rows) with C = 0.005: the L2 strength for which scikit-learn's
    SGD objective, mean(loss) + alpha/2 |w|^2, has the minimizer of LogisticRegression(C)'s
    C * sum(loss) + 1/2 |w|^2 on the same rows."""
    from scipy.optimize import minimize
    from sklearn.linear_model import LogisticRegression

    probe = LinearProbe(ProbeConfig("a.output", classes=[0, 1], alpha="auto"))
    assert probe.estimator_.alpha == 1e-4  # stepped by hand: no row count to scale by
    probe.start(RunContext(training={probe.name: Training(classes=(0, 1), n_rows=400)}))
    assert probe.estimator_.alpha == pytest.approx(1 / (0.005 * 400)) == default_alpha(400)
    assert LinearProbe(ProbeConfig("a.output", classes=[0, 1], alpha=0.02)).estimator_.alpha == 0.02
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 3))
    y = (X[:, 0] + rng.normal(size=400) > 0).astype(int)
    alpha = default_alpha(400)

    def sgd_objective(wb):  # scikit-learn's SGD loss, intercept not penalized
        z = X @ wb[:3] + wb[3]
        return np.mean(np.logaddexp(0, z) - y * z) + alpha / 2 * wb[:3] @ wb[:3]

    wb = minimize(sgd_objective, np.zeros(4), method="BFGS", options={"gtol": 1e-10}).x
    ref = LogisticRegression(C=0.005, tol=1e-10).fit(X, y)
    np.testing.assert_allclose(wb[:3], ref.coef_[0], atol=1e-5)
