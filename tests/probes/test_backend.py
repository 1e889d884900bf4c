"""The torch probe backend: one batched step for all linear probes (issue 8)."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pandas as pd
import pytest
import torch

import lm_probe.probes.backend as backend_module
from lm_probe import ProbeConfig, ProbeDataset, ProbeRunner
from lm_probe.core.consumer import HostArrays, PooledBatch, RunContext
from lm_probe.functional.sgd import logistic_sgd_step
from lm_probe.probes.backend import ProbeBank
from lm_probe.probes.probe import Probe
from lm_probe.probes.training import Training
from lm_probe.testing import tiny_tokenizer

from conftest import count_calls
from test_token_probes import tagged

FIT = dict(batch_size=16, eval_every=2, patience=3)
SETTINGS = [
    dict(),  # lm_probe's defaults: constant step, averaged, standardized
    dict(standardize=False, average=False),
    dict(standardize=False, alpha=0.05, average=False),
    dict(standardize=False, learning_rate="invscaling", eta0=0.1, average=False),
    dict(standardize=False, class_weight={0: 2.0, 1: 0.5}, average=False),
    dict(standardize=False, average=10),
    dict(standardize=False, fit_intercept=False),
    dict(penalty=None),
]


def rows(n=160, d=6, n_classes=2, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    X = (rng.normal(size=(n, d)) + 3.0 + 0.8 * y[:, None] * (np.arange(d) < 2)).astype(np.float32)
    return X, y


def train_both(config, X, y, batch):
    """The same probe trained by scikit-learn (``Probe.partial_fit``) and by a bank."""
    classes = sorted(set(y.tolist()))
    ref, banked = Probe(config, random_state=0), Probe(config, random_state=0)
    context = RunContext(training={config.name: Training(classes=tuple(classes))})
    bank = ProbeBank([banked])
    ref.start(context), bank.start(context)  # the bank starts its probes with the same context
    for i in range(0, len(y), batch):
        ref.partial_fit(X[i:i + batch], y[i:i + batch])
        bank.update(PooledBatch({("s", "mean"): X[i:i + batch]}, y[i:i + batch], index=np.arange(i, i + batch)))
    bank.finish()
    return ref, banked


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_one_row_per_batch_is_sklearns_update(settings, n_classes):
    """Each row of a batch steps with its own gradient; with one row per batch the bank is
    scikit-learn's per-example SGD, so the two agree to float32 precision."""
    X, y = rows(n_classes=n_classes)
    settings = dict(settings)
    if n_classes == 3 and "class_weight" in settings:
        settings["class_weight"] = {0: 2.0, 1: 0.5, 2: 1.5}
    config = ProbeConfig("s", classes=range(n_classes), head="linear", **settings)  # one-vs-rest, as SGDClassifier
    ref, banked = train_both(config, X, y, batch=1)
    scale = np.abs(ref.coef_).max()
    np.testing.assert_allclose(banked.coef_, ref.coef_, atol=2e-5 * scale)
    np.testing.assert_allclose(banked.intercept_, ref.intercept_, atol=2e-5 * max(scale, 1))
    np.testing.assert_allclose(banked.mean_, ref.mean_, rtol=1e-12)
    np.testing.assert_allclose(banked.predict_proba(X), ref.predict_proba(X), atol=1e-5)


def test_batched_step_against_a_float64_reference():
    rng = np.random.default_rng(1)
    P, R, K, D = 3, 5, 2, 4
    W, b = rng.normal(size=(P, K, D)), rng.normal(size=(P, K))
    X, T = rng.normal(size=(P, R, D)), (rng.random((P, R, K)) < 0.5).astype(float)
    weight = rng.random((P, R, K)) * (rng.random((P, R, 1)) < 0.8)
    eta, alpha, fit = rng.random((P, R)) * 0.1 * (weight[..., 0] > 0), np.array([0.0, 0.1, 0.5]), np.array([1.0, 0.0, 1.0])
    W_ref, b_ref = W.copy(), b.copy()
    for p in range(P):  # every row against the batch's starting weights, decay once per row
        grad_W, grad_b = np.zeros((K, D)), np.zeros(K)
        for r in range(R):
            g = (1 / (1 + np.exp(-(W[p] @ X[p, r] + b[p]))) - T[p, r]) * weight[p, r] * eta[p, r]
            grad_W += np.outer(g, X[p, r])
            grad_b += g
        W_ref[p] = W[p] * np.prod(1 - eta[p] * alpha[p]) - grad_W
        b_ref[p] = b[p] - fit[p] * grad_b
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    W_new, b_new = logistic_sgd_step(t(W), t(b), t(X), t(T), t(weight), t(eta), t(alpha), t(fit))
    np.testing.assert_allclose(W_new.numpy(), W_ref, rtol=1e-12)
    np.testing.assert_allclose(b_new.numpy(), b_ref, rtol=1e-12)


def test_larger_batches_stay_close_to_sklearn():
    X, y = rows(n=480, n_classes=3)
    ref, banked = train_both(ProbeConfig("s", classes=range(3), head="linear"), X, y, batch=16)
    assert np.abs(banked.predict_proba(X) - ref.predict_proba(X)).max() < 0.01
    assert (banked.predict(X) == ref.predict(X)).mean() > 0.98


# ------------------------------------------------------------------ through the runner
def configs():
    return [ProbeConfig(f"transformer.h.{i}.output", pool=p, name=f"{i}{p}", **kw)
            for i in range(4) for p in ("mean", "last") for kw in [{}]] + [
        ProbeConfig("transformer.h.2.output", name="2mean-a1e-2", alpha=1e-2),
        ProbeConfig("transformer.h.2.output", name="2mean-mlp", head="mlp", hidden_size=8, max_iter=1)]


@pytest.fixture(scope="module")
def both(gpt2, toy):
    train, test = toy
    run = lambda backend: ProbeRunner(gpt2, configs(), seed=0, progress=False, backend=backend).fit_probes(
        train, test, **FIT)
    return run("sklearn"), run("torch")


def test_torch_backend_matches_sklearn_backend(both, toy):
    from lm_probe.probes.checks import split_validation

    sk, th = both
    linear = [n for n in sk.metrics.index if n != "2mean-mlp"]
    diff = (sk.metrics.loc[linear, "accuracy"] - th.metrics.loc[linear, "accuracy"]).abs()
    assert diff.max() <= 0.04 and diff.mean() <= 0.015, diff
    assert (sk.metrics.loc[linear, "loss"] - th.metrics.loc[linear, "loss"]).abs().max() < 0.03
    # early stopping is unchanged: the same evaluations at the same steps
    for name in linear:
        assert [s for s, _ in th[name].history_][:3] == [s for s, _ in sk[name].history_][:3]
    assert th.metrics.loc["0mean", "accuracy"] > 0.8
    # the epochs each probe ran, counted from its steps as the scikit-learn backend counts them (the bank
    # once left 0); float32 and float64 training may stop a probe a few epochs apart
    per_epoch = -(-len(split_validation(toy[0], 0.1, 0)[0]) // 16)
    for runner in (sk, th):
        m = runner.metrics.loc[linear]
        assert (m["n_epochs"] == -(-m["n_steps"] // per_epoch)).all(), m[["n_steps", "n_epochs"]]
    assert (th.metrics.loc[linear, "n_epochs"] - sk.metrics.loc[linear, "n_epochs"]).abs().median() <= 3


def test_only_linear_classifiers_are_banked(both):
    _, th = both
    twins = {name: [t.name for t in probe.twins] for name, probe in th.probes.items() if hasattr(probe, "twins")}
    assert set(twins) == set(th.probes) - {"2mean-mlp", "2mean-a1e-2"}  # an explicit alpha: one probe, no twins
    assert {p.name for p in th.bank.probes} == {"2mean-a1e-2", *(t for names in twins.values() for t in names)}
    assert all(th[name].banked for name in twins)
    pd.testing.assert_series_equal(both[0].metrics.loc["2mean-mlp"], th.metrics.loc["2mean-mlp"])


def test_torch_backend_same_seed_same_numbers(gpt2, toy, both):
    train, test = toy
    again = ProbeRunner(gpt2, configs(), seed=0, progress=False, backend="torch").fit_probes(train, test, **FIT)
    pd.testing.assert_frame_equal(again.metrics, both[1].metrics)


def test_one_forward_per_batch_with_the_torch_backend(gpt2, toy):
    train, _ = toy
    runner = ProbeRunner(gpt2, configs()[:8], progress=False, backend="torch")
    calls, handle = count_calls(gpt2._module)
    try:
        runner.fit_probes(train, num_epochs=1, val_size=0, **FIT)
    finally:
        handle.remove()
    assert calls["n"] == -(-len(train) // 16) == runner.bank.n_steps_


def test_saved_torch_probes_predict_the_same(both, tmp_path):
    th = both[1]
    th.save(tmp_path / "probes")
    loaded = ProbeRunner.load(tmp_path / "probes")
    X = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    np.testing.assert_array_equal(loaded["1last"].predict_proba(X), th["1last"].predict_proba(X))


def test_token_probes_and_controls_on_the_torch_backend(llama):
    words, tags = tagged(240, seed=3)
    train, test = ProbeDataset.from_tagged(words, tags, tiny_tokenizer()).tt_split(0.25, seed=0)
    run = lambda backend: ProbeRunner(
        llama, [ProbeConfig("model.layers.0.output", pool="none", control=True, name="tags")],
        progress=False, backend=backend).fit_probes(train, test, **FIT).metrics
    sk, th = run("sklearn"), run("torch")
    for column in ("accuracy", "control_accuracy", "selectivity"):
        assert abs(sk.loc["tags", column] - th.loc["tags", column]) < 0.03, column
    assert th.loc["tags", "accuracy"] > 0.8 and th.loc["tags", "selectivity"] > 0.05


def test_non_finite_rows_are_left_out_and_counted(gpt2, toy):
    train, test = toy
    bias = gpt2._module.transformer.h[1].mlp.c_proj.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias[0] = float("nan")
    try:
        runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.0.output", name="fine"),
                                    ProbeConfig("transformer.h.1.output", name="nan")], progress=False, backend="torch")
        runner.fit_probes(train, test, val_size=0, **FIT)
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    m = runner.metrics
    assert m.loc["nan", "n_steps"] == 0 and m.loc["nan", "n_nonfinite_fit"] == len(train)
    assert m.loc["nan", "n_nonfinite"] == len(test) and m.loc["fine", "accuracy"] > 0.8


def test_from_store_on_the_torch_backend(gpt2, tmp_path):
    from lm_probe import ActivationStore
    from lm_probe.testing import toy_texts

    texts, labels = toy_texts(200, seed=4)
    data = ProbeDataset.from_texts(texts, labels, gpt2.tokenizer, max_length=32)
    train, test = data.tt_split(0.25, seed=0)
    sites = ["transformer.h.1.output", "transformer.h.3.output"]
    store = ActivationStore(tmp_path / "acts", sites=sites, pool="mean", run="toy")
    ProbeRunner(gpt2, progress=False).collect(data, [store])
    run = ActivationStore.open(tmp_path / "acts").run("toy")
    cfgs = [ProbeConfig(s, name=s) for s in sites]
    live = ProbeRunner(gpt2, cfgs, progress=False, backend="torch").fit_probes(train, test, **FIT).metrics
    stored = ProbeRunner.from_store(run, cfgs, progress=False, backend="torch").fit_probes(train, test, **FIT).metrics
    np.testing.assert_allclose(stored["accuracy"], live["accuracy"], atol=1e-9)
    np.testing.assert_allclose(stored["loss"], live["loss"], rtol=1e-4)
    assert stored["accuracy"].min() > 0.7


# ------------------------------------------------------------------ refusals, before any forward
@pytest.mark.parametrize("settings, match", [
    (dict(learning_rate="optimal"), "learning_rate='optimal'"),
    (dict(penalty="l1"), "penalty='l1'"),
    (dict(loss="log_loss", epsilon=0.5, early_stopping=True), None),  # no effect on partial_fit: accepted
])
def test_settings_the_bank_cannot_do_are_refused_up_front(gpt2, settings, match):
    calls, handle = count_calls(gpt2._module)
    try:
        if match is None:
            ProbeRunner(gpt2, [ProbeConfig("transformer.h.0.output", **settings)], backend="torch")
        else:
            with pytest.raises(ValueError, match=match + r".*backend='sklearn'"):
                ProbeRunner(gpt2, [ProbeConfig("transformer.h.0.output", **settings)], backend="torch")
    finally:
        handle.remove()
    assert calls["n"] == 0


def test_unknown_backend(gpt2):
    with pytest.raises(ValueError, match=r"backend must be one of \('sklearn', 'torch'\), got 'jax'"):
        ProbeRunner(gpt2, [ProbeConfig("transformer.h.0.output")], backend="jax")


def test_host_arrays_convert_only_what_is_read():
    tensors = {("a", "mean"): torch.ones(2, 3), ("b", "mean"): torch.zeros(2, 3)}
    acts = HostArrays(tensors)
    batch = PooledBatch(acts)
    assert batch.tensor(("a", "mean")) is tensors[("a", "mean")]
    assert acts._arrays == {}
    np.testing.assert_array_equal(acts[("b", "mean")], np.zeros((2, 3), np.float32))
    assert list(acts._arrays) == [("b", "mean")] and list(acts) == list(tensors)


def test_the_bank_uses_public_probe_methods_only():
    """The bank meets its probes through their public methods (note_step, after_step,
    load_weights, load_moments), never their private state."""
    source = inspect.getsource(backend_module)
    assert not re.findall(r"\b(?:probe|p|probes\[\w+\])\._\w+", source)


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_the_average_restarts_at_each_step_decay(backend):
    """With ``lr_decay`` the running average of the iterates restarts at each step decay: it
    then equals the mean of the iterates since the last decay, recomputed here by a plain
    per-row logistic SGD loop (scikit-learn's update) on the step sizes the probe took."""
    from lm_probe.probes.early_stopping import DecayOnPlateau, EarlyStopping

    X, y = rows(n=300)
    Xv, yv = rows(n=80, seed=1)
    config = ProbeConfig("s", classes=(0, 1), standardize=False, eta0=0.05)
    training = Training(classes=(0, 1), validation=(Xv, yv), early_stopping=EarlyStopping(patience=10**6),
                        eval_every=10, decay=DecayOnPlateau(0.5, 1))
    probe = Probe(config, random_state=0)
    trainer = probe if backend == "sklearn" else ProbeBank([probe])
    trainer.start(RunContext(training={"s": training}))
    etas, decays = [], []
    for epoch in range(3):
        for i in range(len(y)):
            etas.append(0.05 * probe.lr_scale_)
            trainer.update(PooledBatch({("s", "mean"): X[i:i + 1]}, y[i:i + 1], index=np.array([i]), epoch=epoch))
            decays.append(probe.n_decays_)
    assert decays[-1] >= 2, "the test needs decays to mean anything"
    w, b, iterates = np.zeros(X.shape[1]), 0.0, []
    for eta, x, target in zip(etas, np.tile(X.astype(np.float64), (3, 1)), np.tile(y, 3)):
        g = 1 / (1 + np.exp(-(w @ x + b))) - target
        w, b = w * (1 - eta * 1e-4) - eta * g * x, b - eta * g
        iterates.append(np.append(w, b))
    restart = int(np.flatnonzero(np.diff(decays))[-1]) + 1  # the first step after the last decay
    expected, everything = np.mean(iterates[restart:], axis=0), np.mean(iterates, axis=0)
    if backend == "sklearn":
        got = np.append(probe.estimator_.coef_[0], probe.estimator_.intercept_)
    else:
        group = trainer.groups[0]
        got = np.append(group.W_avg[0, 0].numpy(), group.b_avg[0].numpy())
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
    assert np.abs(expected - everything).max() > 100 * 1e-4 * np.abs(expected).max()
