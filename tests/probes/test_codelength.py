"""Online (prequential) codelength of the probes' training labels (issue 17, item 1).

The references are independent: scikit-learn's own ``SGDClassifier`` stepped batch by
batch in a plain loop, its iterates averaged by hand and its features standardized with
numpy's mean and standard deviation of every row seen so far, the batch's labels coded
with ``log_loss(..., normalize=False) / ln 2`` before each ``partial_fit`` (the uniform
code for the first batch).
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import log_loss

from lm_probe import ProbeConfig, ProbeRunner
from lm_probe.core.consumer import PooledBatch, RunContext
from lm_probe.functional.codelength import label_bits, ovr_proba, uniform_bits
from lm_probe.probes.backend import ProbeBank
from lm_probe.probes.codelength import Codelength
from lm_probe.probes.probe import Probe
from lm_probe.probes.training import Training

SITE = ("s", "mean")


def rows(n=160, d=6, n_classes=2, seed=0, signal=0.8):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    X = rng.normal(size=(n, d)) + 3.0 + signal * y[:, None] * (np.arange(d) < 2)
    return X.astype(np.float32), y


def reference_bits(X, y, batch, classes, *, alpha=1e-4, eta0=0.003, shuffle=True, standardize=True):
    """The online codelength recomputed with scikit-learn (see the module docstring): the
    test's probe is ``SGDClassifier(loss="log_loss", learning_rate="constant", eta0=0.003,
    alpha=1e-4)`` stepped from its plain iterates, predicting with their row-weighted mean,
    on features standardized with the moments of all rows so far, the batch included."""
    sgd = SGDClassifier(loss="log_loss", learning_rate="constant", eta0=eta0, alpha=alpha, random_state=0,
                        shuffle=shuffle)
    bits, iterates = 0.0, []
    for i in range(0, len(y), batch):
        Xb, yb = X[i:i + batch].astype(np.float64), y[i:i + batch]
        seen = X[:i + len(yb)].astype(np.float64)
        mu, sd = seen.mean(0), seen.std(0)
        Z = (Xb - mu) / np.where(sd > 0, sd, 1.0) if standardize else Xb
        if not iterates:
            bits += len(yb) * np.log2(len(classes))
        else:
            n = np.array([m for m, _, _ in iterates], np.float64)
            scorer = copy.deepcopy(sgd)
            scorer.coef_ = sum(m * c for m, c, _ in iterates) / n.sum()
            scorer.intercept_ = sum(m * b for m, _, b in iterates) / n.sum()
            bits += log_loss(yb, scorer.predict_proba(Z), labels=classes, normalize=False) / np.log(2)
        sgd.partial_fit(Z, yb, classes=classes)
        iterates.append((len(yb), sgd.coef_.copy(), sgd.intercept_.copy()))
    return bits


def feed(consumer, X, y, batch, epochs=1):
    """Start ``consumer`` (a probe or a bank) and feed it ``X, y`` in order, ``epochs`` times."""
    consumer.start(RunContext(training={"p": Training(classes=tuple(sorted(set(y.tolist()))))}))
    for epoch in range(epochs):
        for step, i in enumerate(range(0, len(y), batch)):
            consumer.update(PooledBatch({SITE: X[i:i + batch]}, y[i:i + batch], step=step, epoch=epoch,
                                        index=np.arange(i, min(i + batch, len(y)))))
    consumer.finish()
    return consumer


def probe(n_classes=2, **kwargs):
    kwargs = {"head": "linear", **kwargs}  # one-vs-rest, as the scikit-learn recomputation
    sgd = kwargs["head"] == "linear" and kwargs.get("solver", "sgd") == "sgd"
    settings = {**(dict(eta0=0.003, alpha=1e-4) if sgd else {}), **kwargs}  # the reference's step and L2 strength
    return Probe(ProbeConfig("s", classes=range(n_classes), name="p", **settings), random_state=0)


def test_functions_against_numpy():
    proba = np.array([[0.2, 0.8], [0.5, 0.5], [1.0, 0.0]])
    assert label_bits(proba, np.array([1, 0, 1])) == pytest.approx(
        -np.log2(0.8) + 1.0 - np.log2(np.finfo(np.float64).eps), rel=1e-12)  # clipped as log_loss clips
    assert uniform_bits(10, 3) == pytest.approx(10 * np.log(3) / np.log(2), rel=1e-15) and uniform_bits(0, 2) == 0
    scores = np.array([[0.3, -1.0, 2.0], [-800.0, -800.0, -800.0]])
    scorer = SGDClassifier(loss="log_loss").fit(np.eye(3), [0, 1, 2])
    scorer.coef_, scorer.intercept_ = np.eye(3), np.zeros(3)
    np.testing.assert_allclose(ovr_proba(scores), scorer.predict_proba(scores), rtol=1e-12)
    with pytest.raises(ValueError, match="y_index"):
        label_bits(proba, np.array([0, 2, 1]))


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("standardize", [True, False])
def test_codelength_equals_a_sklearn_recomputation(n_classes, standardize):
    X, y = rows(n_classes=n_classes)
    p = feed(probe(n_classes, standardize=standardize), X, y, batch=16)
    expected = reference_bits(X, y, 16, list(range(n_classes)), standardize=standardize)
    assert p.codelength_.bits == pytest.approx(expected, rel=1e-9, abs=0)
    assert p.codelength_.n_coded == len(y)


def test_uniform_bits_and_compression():
    X, y = rows(n_classes=3)
    state = feed(probe(3), X, y, batch=16).codelength_.compute()
    assert state["uniform_bits"] == len(y) * np.log2(3)
    assert state["compression"] == pytest.approx(state["uniform_bits"] / state["codelength_bits"], rel=1e-15)
    assert state["n_coded"] == len(y)


def test_replayed_epochs_do_not_change_it():
    X, y = rows()
    once = feed(probe(), X, y, batch=16).codelength_
    thrice = feed(probe(), X, y, batch=16, epochs=3)
    assert thrice.n_steps_ == 3 * once.n_coded // 16 and thrice.codelength_ == once


@pytest.mark.parametrize("n_classes", [2, 3])
def test_bank_codes_each_probe_with_its_own_weights(n_classes):
    """One row per batch and per step: the bank is scikit-learn's per-example SGD (to
    float32), and each probe, of a different step, is coded with its own."""
    X, y = rows(n=96, n_classes=n_classes)
    classes = list(range(n_classes))
    configs = [ProbeConfig("s", classes=classes, name="p", head="linear", eta0=0.003, alpha=1e-4),
               ProbeConfig("s", classes=classes, name="q", head="linear", eta0=0.05, alpha=1e-4)]
    probes = [Probe(c, random_state=0) for c in configs]
    bank = ProbeBank(probes, rows_per_step=1)
    bank.start(RunContext(training={c.name: Training(classes=tuple(classes)) for c in configs}))
    for i in range(len(y)):
        bank.update(PooledBatch({SITE: X[i:i + 1]}, y[i:i + 1], step=i, index=np.arange(i, i + 1)))
    bank.finish()
    for p, eta0 in zip(probes, (0.003, 0.05)):
        expected = reference_bits(X, y, 1, classes, eta0=eta0, shuffle=False)
        assert p.codelength_.n_coded == len(y)
        assert p.codelength_.bits == pytest.approx(expected, rel=2e-6)
    assert probes[0].codelength_.bits != pytest.approx(probes[1].codelength_.bits, rel=1e-3)


def test_bank_with_batches_is_close_to_the_sklearn_backend():
    """With many rows per batch the bank averages its per-row iterates where the probe
    averages per batch, and scikit-learn shuffles a batch's rows: the same rows are coded,
    to bits within 2%."""
    X, y = rows()
    p = feed(probe(), X, y, batch=16)
    banked = probe()
    bank = ProbeBank([banked], rows_per_step=1)
    feed(bank, X, y, batch=16)
    assert banked.codelength_.n_coded == p.codelength_.n_coded == len(y)
    assert banked.codelength_.bits == pytest.approx(p.codelength_.bits, rel=0.02)


@pytest.mark.parametrize("head", ["softmax", "mlp"])
def test_other_heads_code_with_their_own_probabilities(head):
    """Each batch after the first is coded with the head's ``predict_proba`` at that moment
    (a copy of the probe stepped on the batches before it)."""
    X, y = rows(n=64)
    p = feed(probe(head=head), X, y, batch=16)
    replay = probe(head=head)
    replay.start(RunContext(training={"p": Training(classes=(0, 1))}))
    expected = 16.0  # the first batch: uniform, 1 bit per label
    for i in range(0, 64, 16):
        if i:
            at = copy.deepcopy(replay).partial_fit(X[i:i + 16], y[i:i + 16])  # moments with the batch
            at.estimator_ = replay.estimator_  # ... and the weights before its step
            expected += log_loss(y[i:i + 16], at.predict_proba(X[i:i + 16]), labels=[0, 1], normalize=False) / np.log(2)
        replay.partial_fit(X[i:i + 16], y[i:i + 16])
    assert p.codelength_.bits == pytest.approx(expected, rel=1e-9) and p.codelength_.n_coded == 64


def test_fit_probes_codelength_does_not_depend_on_num_epochs(gpt2, toy):
    train, test = toy
    configs = [ProbeConfig("transformer.h.2.output", name="lin")]
    fit = dict(batch_size=16, eval_every=5, patience=50)
    one = ProbeRunner(gpt2, configs, progress=False).fit_probes(train, num_epochs=1, **fit)["lin"]
    three = ProbeRunner(gpt2, configs, progress=False).fit_probes(train, num_epochs=3, **fit)["lin"]
    assert three.n_epochs_ == 3 and one.n_epochs_ == 1
    assert three.codelength_ == one.codelength_ and one.codelength_.n_coded > 0


def test_no_codelength_for_regression_and_lbfgs():
    X, y = rows()
    reg = Probe(ProbeConfig("s", task="regression", name="p"), random_state=0)
    feed(reg, X, y.astype(np.float64), batch=16)
    full = feed(probe(solver="lbfgs"), X, y, batch=16)
    for p in (reg, full):
        state = p.codelength_.compute()
        assert np.isnan(state["codelength_bits"]) and np.isnan(state["compression"]) and state["n_coded"] == 0
        assert p.codelength_.reason
    assert "lbfgs" in full.codelength_.reason


def test_random_labels_do_not_compress_a_planted_signal_does():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(600, 8)).astype(np.float32)
    planted = (X[:, 0] + 0.3 * rng.normal(size=600) > 0).astype(np.int64)
    noise = rng.integers(0, 2, 600)
    signal = feed(probe(eta0=0.02), X, planted, batch=16).codelength_.compute()["compression"]
    chance = feed(probe(eta0=0.02), X, noise, batch=16).codelength_.compute()["compression"]
    assert signal > 1.3 and chance <= 1.01, (signal, chance)  # measured 1.44 and 1.002


def test_codelength_state_round_trips():
    state = Codelength(3, 12.5, 40)
    assert Codelength.from_dict(state.to_dict()) == state
    none = Codelength(0, reason="a regression probe")
    assert Codelength.from_dict(none.to_dict()) == none
    with pytest.raises(ValueError, match=r"labels \[5\] are not in classes \[0, 1, 2\]: they cannot be coded"):
        state.code(None, np.array([0, 5]), np.array([0, 1, 2]))
    assert state == Codelength(3, 12.5, 40)  # nothing added


def test_metrics_save_and_load(gpt2, toy, tmp_path):
    train, test = toy
    configs = [ProbeConfig("transformer.h.1.output", name="lin", control=True),
               ProbeConfig("transformer.h.1.output", name="reg", task="regression")]
    runner = ProbeRunner(gpt2, configs, progress=False).fit_probes(train, test, batch_size=16, num_epochs=2,
                                                                   eval_every=5, patience=3)
    row = runner.metrics.loc["lin"]
    lin = runner["lin"].codelength_
    assert row["codelength_bits"] == lin.bits and row["n_coded"] == lin.n_coded > 0
    assert row["uniform_bits"] == lin.n_coded * np.log2(2)
    assert row["compression"] == pytest.approx(row["uniform_bits"] / row["codelength_bits"], rel=1e-12)
    assert row["control_compression"] == runner["lin [control]"].codelength_.compute()["compression"]
    assert np.isnan(runner.metrics.loc["reg", "compression"])
    runner.save(tmp_path / "run")
    back = ProbeRunner.load(tmp_path / "run")
    for name in runner.probes:
        assert back[name].codelength_ == runner[name].codelength_
    columns = ["codelength_bits", "uniform_bits", "compression", "n_coded", "control_compression"]
    pd.testing.assert_frame_equal(back.metrics[columns], runner.metrics[columns], check_dtype=False)
