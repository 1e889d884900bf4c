"""head="auto" (the default): the multinomial softmax head past two classes, the linear one
for two; the torch bank trains both."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import SGDRegressor

from lm_probe import ProbeConfig, ProbeDataset, ProbeRunner
from lm_probe.functional.sgd import logistic_sgd_step
from lm_probe.probes.online_sgd import OnlineSGDClassifier
from lm_probe.probes.probe import Probe
from lm_probe.probes.config import DEFAULT_PROBE_KWARGS, SOFTMAX_ETA0
from lm_probe.probes.softmax import SoftmaxSGDClassifier
from lm_probe.probes.stacked import check_kwargs
from lm_probe.testing import tiny_tokenizer, toy_texts

from test_backend import rows, train_both
from test_token_probes import tagged

SOFTMAX_SETTINGS = [
    dict(),  # the defaults: constant step, averaged, standardized
    dict(standardize=False, average=False),
    dict(standardize=False, alpha=0.05, average=False),
    dict(standardize=False, learning_rate="invscaling", eta0=0.1, average=False),
    dict(standardize=False, class_weight={0: 2.0, 1: 0.5, 2: 1.5}, average=False),
    dict(standardize=False, average=10),
    dict(standardize=False, fit_intercept=False),
]


def test_auto_resolves_by_the_number_of_classes():
    for classes, head, estimator in (((0, 1), "linear", OnlineSGDClassifier), ((0, 1, 2), "softmax",
                                                                                SoftmaxSGDClassifier)):
        probe = Probe(ProbeConfig("s", classes=classes), random_state=0)
        assert probe.config.head == "auto" and probe.head_ == head and type(probe.estimator_) is estimator
    linear = Probe(ProbeConfig("s", classes=(0, 1, 2), head="linear"), random_state=0)
    assert linear.head_ == "linear" and type(linear.estimator_) is OnlineSGDClassifier  # one-vs-rest, as asked
    regression = Probe(ProbeConfig("s", task="regression"), random_state=0)
    assert regression.head_ == "linear" and type(regression.estimator_) is SGDRegressor


@pytest.mark.parametrize("n_classes, head", [(2, "linear"), (3, "softmax")])
def test_auto_trains_exactly_the_head_it_resolves_to(n_classes, head):
    X, y = rows(n=96, n_classes=n_classes)
    auto, explicit = (Probe(ProbeConfig("s", classes=range(n_classes), head=h), random_state=0) for h in ("auto", head))
    for probe in (auto, explicit):
        for i in range(0, len(y), 16):
            probe.partial_fit(X[i:i + 16], y[i:i + 16])
    assert np.abs(auto.coef_).max() > 0.01
    np.testing.assert_array_equal(auto.coef_, explicit.coef_)
    np.testing.assert_array_equal(auto.intercept_, explicit.intercept_)


def test_the_softmax_head_steps_at_its_own_eta0_unless_one_is_given():
    """head="auto" puts the softmax head's defaults (eta0=0.01) under the arguments given:
    a given eta0 is kept, the linear head's default 0.003 is not carried over; the torch
    bank reads the same step."""
    def eta0(**kw):
        probe = Probe(ProbeConfig("s", **kw), random_state=0)
        banked = check_kwargs(probe)["eta0"] if probe.head_ in ("linear", "softmax") else None
        assert banked == probe.estimator_.eta0
        return probe.estimator_.eta0
    assert SOFTMAX_ETA0 == 0.01 and DEFAULT_PROBE_KWARGS["eta0"] == 0.003
    assert eta0(classes=(0, 1, 2)) == eta0(classes=(0, 1, 2), head="softmax") == 0.01
    assert eta0(classes=(0, 1)) == eta0(classes=(0, 1, 2), head="linear") == 0.003
    assert eta0(classes=(0, 1, 2), eta0=0.003) == eta0(classes=(0, 1, 2), head="softmax", eta0=0.003) == 0.003
    assert eta0(classes=(0, 1), eta0=0.05) == 0.05
    assert "eta0" not in repr(ProbeConfig("s")) and "eta0=0.003" in repr(ProbeConfig("s", eta0=0.003))  # as given
    # the other defaults stay: constant, averaged by the probe, alpha="auto"
    probe = Probe(ProbeConfig("s", classes=(0, 1, 2)), random_state=0)
    assert probe.estimator_.learning_rate == "constant" and probe._average is True
    assert probe.estimator_.alpha == 1e-4  # alpha="auto" with no rows yet: scikit-learn's


def test_saved_probes_keep_the_arguments_given(gpt2, tmp_path):
    """A saved config is rebuilt from the arguments given, so a reloaded default 3-class probe
    steps at the softmax head's eta0 and a given eta0 stays given; a save that stored only the
    merged arguments (before given_kwargs) loads as it did."""
    import json
    texts, _ = toy_texts(60, seed=3)
    labels = [len(t.split()) % 3 for t in texts]
    data = ProbeDataset.from_texts(texts, labels, tiny_tokenizer())
    configs = [ProbeConfig("transformer.h.1.output", name="default", Cs=()),
               ProbeConfig("transformer.h.1.output", name="given", Cs=(), eta0=0.003)]
    runner = ProbeRunner(gpt2, configs, progress=False)
    runner.fit_probes(data, num_epochs=1, batch_size=16, val_size=0)
    runner.save(tmp_path / "run")
    back = ProbeRunner.load(tmp_path / "run")
    assert back["default"].config.given_kwargs == {} and back["given"].config.given_kwargs == {"eta0": 0.003}
    for name in ("default", "given"):  # one probe each (Cs=()), not the default twins
        assert type(back[name]) is Probe and back[name].config == runner[name].config
    assert back["default"].estimator_.eta0 == runner["default"].estimator_.eta0 == 0.01
    assert back["given"].estimator_.eta0 == runner["given"].estimator_.eta0 == 0.003
    document = json.loads((tmp_path / "run" / "probes.json").read_text())
    for entry in document["probes"]:
        del entry["given_kwargs"]
    (tmp_path / "run" / "probes.json").write_text(json.dumps(document))
    old = ProbeRunner.load(tmp_path / "run")
    assert old["default"].config.given_kwargs == runner["default"].config.probe_kwargs
    assert old["default"].estimator_.eta0 == 0.003  # the merged linear defaults were all an old save kept


def test_auto_refuses_what_the_softmax_head_cannot_do_before_training():
    with pytest.raises(ValueError, match=r"head='auto' trains the multinomial softmax head for 3 classes, which "
                                         r"does not take penalty='l1'.*give head='linear'"):
        Probe(ProbeConfig("s", classes=(0, 1, 2), penalty="l1"), random_state=0)
    with pytest.raises(ValueError, match=r"learning_rate='optimal'"):
        Probe(ProbeConfig("s", classes=(0, 1, 2), learning_rate="optimal"), random_state=0)
    assert Probe(ProbeConfig("s", classes=(0, 1), penalty="l1"), random_state=0).head_ == "linear"
    assert Probe(ProbeConfig("s", classes=(0, 1, 2), penalty="l1", head="linear"), random_state=0).head_ == "linear"


def test_multinomial_step_against_a_float64_reference():
    """The bank's multinomial step: every row's softmax cross-entropy gradient at the batch's
    starting weights, decay once per row."""
    rng = np.random.default_rng(3)
    P, R, K, D = 2, 5, 3, 4
    W, b = rng.normal(size=(P, K, D)), rng.normal(size=(P, K))
    X, T = rng.normal(size=(P, R, D)), np.eye(K)[rng.integers(0, K, (P, R))]
    weight = np.repeat(rng.random((P, R, 1)), K, axis=2)
    eta, alpha, fit = rng.random((P, R)) * 0.1, np.array([0.0, 0.3]), np.array([1.0, 0.0])
    W_ref, b_ref = W.copy(), b.copy()
    for p in range(P):
        grad_W, grad_b = np.zeros((K, D)), np.zeros(K)
        for r in range(R):
            z = W[p] @ X[p, r] + b[p]
            g = (np.exp(z) / np.exp(z).sum() - T[p, r]) * weight[p, r] * eta[p, r]
            grad_W += np.outer(g, X[p, r])
            grad_b += g
        W_ref[p] = W[p] * np.prod(1 - eta[p] * alpha[p]) - grad_W
        b_ref[p] = b[p] - fit[p] * grad_b
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    W_new, b_new = logistic_sgd_step(t(W), t(b), t(X), t(T), t(weight), t(eta), t(alpha), t(fit), multinomial=True)
    np.testing.assert_allclose(W_new.numpy(), W_ref, rtol=1e-12)
    np.testing.assert_allclose(b_new.numpy(), b_ref, rtol=1e-12)


@pytest.mark.parametrize("head", ["auto", "softmax"])
@pytest.mark.parametrize("settings", SOFTMAX_SETTINGS,
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_bank_trains_the_softmax_head_as_the_sklearn_backend(settings, head):
    """One row per batch, the softmax head's step is the bank's (both step each row against
    its own weights): the two agree to float32 precision."""
    X, y = rows(n_classes=3)
    ref, banked = train_both(ProbeConfig("s", classes=range(3), head=head, **settings), X, y, batch=1)
    assert ref.head_ == banked.head_ == "softmax" and isinstance(banked.estimator_, SoftmaxSGDClassifier)
    scale = np.abs(ref.coef_).max()
    assert ref.coef_.shape == (3, X.shape[1]) and scale > 0.01
    np.testing.assert_allclose(banked.coef_, ref.coef_, atol=2e-5 * scale)
    np.testing.assert_allclose(banked.intercept_, ref.intercept_, atol=2e-5 * max(scale, 1))
    np.testing.assert_allclose(banked.predict_proba(X), ref.predict_proba(X), atol=1e-5)


def test_metrics_name_the_head_trained(llama):
    """A 3-class token probe with the default head trains softmax on both backends, close
    to each other, and the metrics say so."""
    tok = tiny_tokenizer()
    words, tags = tagged(120, seed=4)
    data = ProbeDataset.from_tagged(words, tags, tok)
    train, test = data.tt_split(0.25, seed=0)
    rows_ = {}
    for backend in ("sklearn", "torch"):
        runner = ProbeRunner(llama, [ProbeConfig("model.layers.1.output", pool="none", Cs=())], progress=False,
                             backend=backend)
        runner.fit_probes(train, test, num_epochs=2, batch_size=16, eval_every=4, patience=3)
        rows_[backend] = runner.metrics.iloc[0]
    assert rows_["sklearn"]["head"] == rows_["torch"]["head"] == "softmax"
    assert rows_["sklearn"]["accuracy"] > 0.5
    assert abs(rows_["sklearn"]["accuracy"] - rows_["torch"]["accuracy"]) <= 0.02


def test_a_saved_softmax_probe_loads_as_one(gpt2, tmp_path):
    texts, _ = toy_texts(90, seed=7)
    labels = [len(t.split()) % 3 for t in texts]  # 3 classes
    data = ProbeDataset.from_texts(texts, labels, tiny_tokenizer())
    train, test = data.tt_split(0.25, seed=0)
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.1.output", name="p", Cs=(0.05, 1.0))], progress=False)
    runner.fit_probes(train, test, num_epochs=2, batch_size=16, eval_every=2, patience=2)
    runner.save(tmp_path / "run")
    back = ProbeRunner.load(tmp_path / "run")
    assert runner["p"].head_ == back["p"].head_ == "softmax" and back.metrics["head"].iloc[0] == "softmax"
    X = np.random.default_rng(0).normal(size=(5, runner["p"].coef_.shape[1]))
    np.testing.assert_array_equal(back["p"].predict_proba(X), runner["p"].predict_proba(X))


def test_both_backends_step_the_softmax_head_four_rows_at_a_time():
    """16-row batches: the softmax head (scikit-learn backend) and the bank both step each
    batch in 4-row chunks, so their iterates agree to float32 precision, batch after batch
    (their averages differ: the bank averages after each chunk, the probe after each batch)."""
    X, y = rows(n=320, n_classes=4)
    ref, banked = train_both(ProbeConfig("s", classes=range(4), average=False), X, y, batch=16)
    assert ref.estimator_.rows_per_step == 4 and ref.head_ == "softmax"
    scale = np.abs(ref.coef_).max()
    np.testing.assert_allclose(banked.coef_, ref.coef_, atol=2e-5 * scale)
    np.testing.assert_allclose(banked.predict_proba(X), ref.predict_proba(X), atol=1e-5)
    ref, banked = train_both(ProbeConfig("s", classes=range(4)), X, y, batch=16)  # averaged: close
    assert ref.estimator_.eta0 == banked.estimator_.eta0 == 0.01  # the softmax head's own default step
    assert np.abs(banked.predict_proba(X) - ref.predict_proba(X)).max() < 0.02  # 0.011 here; grows with eta0
