"""Probes that reach the offline ceiling (issue 14): the exact solver, the step-size decay,
and the solver columns of the metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from lm_probe import Cache, ProbeConfig, ProbeDataset, ProbeRunner
from lm_probe.core.sites import Site
from lm_probe.core.sources import ArraySource
from lm_probe.probes.config import DEFAULT_CS
from lm_probe.probes.early_stopping import DecayOnPlateau

from conftest import count_calls

SITE = "x.output"


def synthetic(n=600, d=20, noise=1.0, seed=0, n_classes=2):
    """Rows whose label is a noisy linear function of them, served by an ArraySource."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) * rng.uniform(0.5, 3.0, d) + rng.standard_normal(d)  # scales and offsets
    W = rng.standard_normal((d, n_classes))
    y = np.argmax(X @ W / np.sqrt(d) + noise * rng.gumbel(size=(n, n_classes)), axis=1)
    data = ProbeDataset([np.array([1, 2])] * n, y)
    source = ArraySource({(SITE, "mean"): X.astype(np.float32)}, data.example_ids,
                         {SITE: Site(0, "x", "output", SITE, None)})
    return data, source


def held_out(Zf, yf, Zv, yv, grid):
    """Independent: a fresh LogisticRegression per C, its held-out accuracy and log-loss."""
    fits = [LogisticRegression(C=C, max_iter=1000).fit(Zf, yf) for C in grid]
    return (np.array([np.mean(f.predict(Zv) == yv) for f in fits]),
            np.array([log_loss(yv, f.predict_proba(Zv), labels=np.unique(yf)) for f in fits]))


def chosen(accuracy, loss):
    """The best accuracy, ties (within 1e-9) to the lower log-loss."""
    ties = np.flatnonzero(accuracy >= accuracy.max() - 1e-9)
    return int(ties[np.argmin(loss[ties])])


def test_lbfgs_is_sklearns_logistic_regression_with_the_C_a_validation_search_chooses():
    data, source = synthetic()
    train, test = data.tt_split(0.25, seed=0)
    runner = ProbeRunner.from_source(source, [ProbeConfig(SITE, solver="lbfgs", cv="validation")],
                                     progress=False)
    runner.fit_probes(train, test, val_size=0.2)
    probe = runner[SITE]
    # independent: the same split, numpy standardization on the fit rows, a search over the grid
    fit, val = train.tt_split(0.2, seed=0)
    X = source.rows[(SITE, "mean")].astype(np.float64)
    Xf, Xv = X[fit.example_ids], X[val.example_ids]
    mean, std = Xf.mean(0), Xf.std(0)
    Zf, Zv = (Xf - mean) / std, (Xv - mean) / std
    accuracy, losses = held_out(Zf, fit.labels, Zv, val.labels, DEFAULT_CS)
    best = chosen(accuracy, losses)
    assert probe.C_ == DEFAULT_CS[best]
    assert probe.best_loss_ == pytest.approx(losses[best], rel=1e-4)
    ref = LogisticRegression(C=probe.C_, max_iter=1000).fit(np.vstack([Zf, Zv]), np.concatenate([fit.labels,
                                                                                                  val.labels]))
    np.testing.assert_allclose(probe.coef_, ref.coef_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probe.intercept_, ref.intercept_, rtol=1e-4, atol=1e-6)
    row = runner.metrics.loc[SITE]
    assert row["solver"] == "lbfgs" and row["C"] == probe.C_ and bool(row["converged"]) and row["n_epochs"] == 1
    Zt = (X[test.example_ids] - mean) / std
    assert row["accuracy"] == pytest.approx(np.mean(ref.predict(Zt) == test.labels))


def test_lbfgs_by_default_takes_the_C_of_a_5_fold_cross_validation_over_fit_and_validation_rows():
    from sklearn.model_selection import StratifiedKFold

    data, source = synthetic(n=500, n_classes=3, seed=3)
    train, test = data.tt_split(0.25, seed=0)
    grid = np.logspace(-3, 2, 6)
    runner = ProbeRunner.from_source(source, [ProbeConfig(SITE, solver="lbfgs", Cs=grid)], progress=False)
    runner.fit_probes(train, test, val_size=0.2, batch_size=7)
    probe = runner[SITE]
    fit, val = train.tt_split(0.2, seed=0)
    X = source.rows[(SITE, "mean")].astype(np.float64)
    Xf = X[np.sort(fit.example_ids)]  # the fit rows in example-id order, then the validation rows
    mean, std = Xf.mean(0), Xf.std(0)
    Z = (np.vstack([Xf, X[val.example_ids]]) - mean) / std
    y = np.concatenate([data.labels[np.sort(fit.example_ids)], val.labels])
    accuracy, losses = np.mean([held_out(Z[f], y[f], Z[v], y[v], grid) for f, v in StratifiedKFold(5).split(Z, y)],
                               axis=0)
    best = chosen(accuracy, losses)
    assert probe.C_ == grid[best]
    assert probe.best_loss_ == pytest.approx(losses[best], rel=1e-4)
    ref = LogisticRegression(C=probe.C_, max_iter=1000).fit(Z, y)
    np.testing.assert_allclose(probe.coef_, ref.coef_, rtol=1e-4, atol=1e-6)
    Zt = (X[test.example_ids] - mean) / std
    assert runner.metrics.loc[SITE, "accuracy"] == pytest.approx(np.mean(ref.predict(Zt) == test.labels))
    # the batch order does not choose the folds: another batch size, the same probe
    again = ProbeRunner.from_source(source, [ProbeConfig(SITE, solver="lbfgs", Cs=grid)], progress=False)
    again.fit_probes(train, val_size=0.2, batch_size=32)
    np.testing.assert_allclose(again[SITE].coef_, probe.coef_, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scoring, sklearn_scoring", [("log_loss", "neg_log_loss"), (None, "accuracy")])
def test_lbfgs_without_validation_takes_the_cross_validated_C(scoring, sklearn_scoring):
    """The C of scikit-learn's LogisticRegressionCV on the same rows, scored the same way
    (accuracy by default; on this grid the best is not tied)."""
    from sklearn.linear_model import LogisticRegressionCV

    data, source = synthetic(n=300, n_classes=3)
    config = ProbeConfig(SITE, solver="lbfgs", Cs=[0.005, 0.05, 0.5], scoring=scoring)
    runner = ProbeRunner.from_source(source, [config], progress=False).fit_probes(data, val_size=0)
    X = source.rows[(SITE, "mean")].astype(np.float64)
    Z = (X - X.mean(0)) / X.std(0)
    cv = LogisticRegressionCV(Cs=[0.005, 0.05, 0.5], cv=5, scoring=sklearn_scoring, max_iter=1000,
                              random_state=runner[SITE].random_state).fit(Z, data.labels)
    scores = next(iter(cv.scores_.values())).mean(axis=0)
    assert np.sum(scores >= scores.max() - 1e-9) == 1, "a tie would make the two choices differ by rule"
    assert runner[SITE].C_ == pytest.approx(float(cv.C_[0]))
    assert runner[SITE].coef_.shape == (3, 20)


def test_sgd_with_the_decay_converges_where_three_epochs_do_not():
    """On a separable-with-noise task lm_probe's defaults (an online probe trained to
    convergence: up to 100 replayed epochs, a step that decays on validation plateaus, early
    stopping deciding the end) reach the exact solver's validation loss; the defaults until
    December 2026 (3 epochs, constant step) stop far from it."""
    data, source = synthetic(n=2000, d=40, noise=0.3, seed=1)
    fits = {}
    for name, config, settings in [
        ("exact", ProbeConfig(SITE, solver="lbfgs", cv="validation"), dict()),
        ("default", ProbeConfig(SITE), dict()),  # lm_probe's defaults: they train to convergence
        ("three", ProbeConfig(SITE, eta0=0.003, alpha=1e-4), dict(num_epochs=3, patience=5, lr_decay=None)),
    ]:
        fits[name] = ProbeRunner.from_source(source, [config], progress=False).fit_probes(data, **settings)[SITE]
    exact, default, three = (fits[k].best_loss_ for k in ("exact", "default", "three"))
    assert default <= exact + 0.02, (default, exact)
    assert three > exact + 0.05, (three, exact)
    assert fits["default"].stopped_reason_.value == "patience", "early stopping ended it, not the epoch bound"


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_auto_alpha_is_set_from_the_fit_rows_and_survives_saving(backend, tmp_path):
    """alpha="auto" = 1 / (0.005 * training rows): 600 examples, 60 held out -> 540 rows;
    the torch bank steps with the same alpha, and a saved probe reports it."""
    data, source = synthetic(n=600)
    runner = ProbeRunner.from_source(source, [ProbeConfig(SITE, alpha="auto")], progress=False, backend=backend)
    runner.fit_probes(data, data, num_epochs=1)
    assert runner[SITE].estimator_.alpha == pytest.approx(1 / (0.005 * 540))
    assert runner.metrics.loc[SITE, "alpha"] == pytest.approx(1 / (0.005 * 540))
    if backend == "torch":
        assert float(runner.bank.groups[0].alpha[0]) == pytest.approx(1 / (0.005 * 540), rel=1e-6)
    runner.save(tmp_path / "p")
    loaded = ProbeRunner.load(tmp_path / "p")
    assert loaded[SITE].estimator_.alpha == pytest.approx(1 / (0.005 * 540))
    assert loaded[SITE].compute()["alpha"] == pytest.approx(1 / (0.005 * 540))


def test_decay_on_plateau_halves_after_patience_evaluations():
    decay = DecayOnPlateau(factor=0.5, patience=2)
    scales = [decay.check(improved) for improved in [True, False, False, False, True, False, False]]
    assert scales == [1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25] and decay.n_decays_ == 2
    floor = DecayOnPlateau(factor=0.1, patience=1, min_scale=0.05)
    assert [floor.check(False) for _ in range(3)] == [0.1, 0.05, 0.05]
    with pytest.raises(ValueError, match="factor"):
        DecayOnPlateau(factor=1.5)


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_the_decay_shrinks_the_step_the_estimator_takes(backend, monkeypatch):
    from lm_probe.probes.probe import Probe

    steps = []
    original = Probe.partial_fit

    def spy(self, X, y, **kwargs):  # the step size each scikit-learn step is taken with
        steps.append(self.estimator_.eta0)
        return original(self, X, y, **kwargs)

    monkeypatch.setattr(Probe, "partial_fit", spy)
    data, source = synthetic(n=800, d=10, noise=0.5)
    config = ProbeConfig(SITE, eta0=0.003, alpha=1e-4)  # a regime where the scale stays above its 1e-3 floor
    runner = ProbeRunner.from_source(source, [config], progress=False, backend=backend)
    runner.fit_probes(data, num_epochs=30, eval_every=5, patience=50, lr_decay=0.5, decay_patience=1)
    probe = runner[SITE]
    assert probe.lr_scale_ < 1.0 and probe.lr_scale_ == pytest.approx(0.5 ** probe._decay.n_decays_)
    if backend == "sklearn":
        ratios = np.log2(0.003 / np.array(steps))
        assert ratios[0] == 0 and np.all(np.diff(ratios) >= 0) and np.allclose(ratios, np.round(ratios))
        assert ratios[-1] >= 1 and 2 ** ratios[-1] <= 1 / probe.lr_scale_ + 1e-9
    else:
        group = runner.bank.groups[0]
        masks = np.ones((1, 4), bool)
        np.testing.assert_allclose(group.eta(np.array([0]), masks), 0.003 * probe.lr_scale_)


def test_solver_columns_for_each_head(llama, toy):
    train, test = toy
    configs = [ProbeConfig("model.layers.1.output", name="sgd", alpha=1e-3),
               ProbeConfig("model.layers.1.output", name="lbfgs", solver="lbfgs", Cs=[0.1, 1.0]),
               ProbeConfig("model.layers.1.output", name="mlp", head="mlp", hidden_size=8)]
    m = ProbeRunner(llama, configs, progress=False).fit_probes(train, test, num_epochs=2).metrics
    assert m.loc["sgd", "solver"] == "sgd" and m.loc["sgd", "alpha"] == 1e-3 and np.isnan(m.loc["sgd", "C"])
    assert m.loc["lbfgs", "C"] in (0.1, 1.0) and np.isnan(m.loc["lbfgs", "alpha"])
    assert m.loc["mlp", "alpha"] == 1e-4
    assert set(m["n_epochs"]) <= {1, 2} and m.loc["lbfgs", "n_epochs"] == 1
    assert m["converged"].map(type).eq(bool).all()


def test_lbfgs_refuses_before_any_forward_when_its_rows_exceed_the_budget(llama, toy):
    train, _ = toy
    runner = ProbeRunner(llama, [ProbeConfig("model.layers.1.output", solver="lbfgs")], progress=False)
    calls, handle = count_calls(llama._module)
    try:
        with pytest.raises(MemoryError, match="solver='lbfgs' needs its .* fit rows x 32 in memory .* raise it"):
            runner.fit_probes(train, cache=Cache(memory_budget=1024))
    finally:
        handle.remove()
    assert calls["n"] == 0


def test_lbfgs_probes_save_and_load(llama, toy, tmp_path):
    train, test = toy
    runner = ProbeRunner(llama, [ProbeConfig("model.layers.2.output", solver="lbfgs", control=True)], progress=False)
    runner.fit_probes(train, test)
    runner.save(tmp_path / "p")
    loaded = ProbeRunner.load(tmp_path / "p")
    X = runner.pooled(test)[("model.layers.2.output", "mean")]
    for name, probe in runner.probes.items():
        np.testing.assert_array_equal(loaded[name].predict_proba(X), probe.predict_proba(X))
        assert loaded[name].C_ == probe.C_ and loaded[name].config.solver == "lbfgs"
    pd.testing.assert_frame_equal(loaded.metrics, runner.metrics, check_dtype=False)


def test_bad_solver_settings_are_refused():
    with pytest.raises(ValueError, match="solver must be one of"):
        ProbeConfig(SITE, solver="newton")
    with pytest.raises(ValueError, match="solver='lbfgs' fits linear classifiers"):
        ProbeConfig(SITE, solver="lbfgs", head="mlp")
    with pytest.raises(ValueError, match="chooses C from Cs"):
        ProbeConfig(SITE, solver="lbfgs", C=1.0)
    with pytest.raises(ValueError, match="Cs is the C grid"):
        ProbeConfig(SITE, Cs=[1.0], head="mlp")  # the SGD linear and softmax heads take Cs (twins)
    with pytest.raises(ValueError, match="cv is how solver='lbfgs' chooses C"):
        ProbeConfig(SITE, cv=5)
    for bad in (1, "folds", 2.5):
        with pytest.raises(ValueError, match="number of cross-validation folds"):
            ProbeConfig(SITE, solver="lbfgs", cv=bad)
    for bad in (dict(scoring="accuracy"), dict(solver="lbfgs", scoring="f1")):
        with pytest.raises(ValueError, match="scoring is what solver='lbfgs' chooses C by"):
            ProbeConfig(SITE, **bad)
    with pytest.raises(TypeError, match="unknown LogisticRegression arguments"):
        ProbeConfig(SITE, solver="lbfgs", eta0=0.1)
