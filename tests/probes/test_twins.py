"""SGD twins (issue 14): one online probe per C, the lowest validation log-loss kept."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss

from lm_probe import ProbeConfig, ProbeRunner
from lm_probe.probes.checks import split_validation
from lm_probe.probes.twins import TwinProbe

from test_solver import SITE, synthetic

GRID = (0.001, 0.05, 1e4)
FIT = dict(num_epochs=8, eval_every=5, patience=4, lr_decay=0.5, decay_patience=2)


@pytest.fixture(scope="module")
def twins():
    data, source = synthetic(n=500, d=30, noise=1.5, seed=3, n_classes=3)
    runner = ProbeRunner.from_source(source, [ProbeConfig(SITE, Cs=GRID, eta0=0.01, control=True)], progress=False)
    return data, source, runner.fit_probes(data, data, **FIT)


def test_the_twin_of_lowest_validation_loss_is_kept(twins):
    """Each C trained alone as an ordinary probe with alpha = 1 / (C * rows); the twins equal
    them, and the probe is the one whose validation log-loss (scikit-learn's, recomputed on
    the validation rows) is lowest."""
    data, source, runner = twins
    fit, val = split_validation(data, 0.1, runner.seed)
    rows = len(fit)
    X = source.rows[(SITE, "mean")]
    alone, losses = {}, {}
    for C in GRID:
        config = ProbeConfig(SITE, alpha=1 / (C * rows), eta0=0.01)  # the same name: the same seed
        single = ProbeRunner.from_source(source, [config], progress=False).fit_probes(data, **FIT)[SITE]
        alone[C] = single
        losses[C] = log_loss(val.labels, single.predict_proba(X[val.example_ids]), labels=[0, 1, 2])
    probe = runner[SITE]
    assert isinstance(probe, TwinProbe)
    best = min(GRID, key=losses.get)
    assert len({round(v, 3) for v in losses.values()}) == len(GRID), "the grid must give distinct losses"
    assert probe.C_ == best and runner.metrics.loc[SITE, "C"] == best
    assert runner.metrics.loc[SITE, "alpha"] == pytest.approx(1 / (best * rows))
    np.testing.assert_allclose(probe.coef_, alone[best].coef_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(probe.predict_proba(X), alone[best].predict_proba(X), atol=1e-12)
    assert probe.n_epochs_ == alone[best].n_epochs_ and probe.stopped_reason_ == alone[best].stopped_reason_
    for C in GRID:
        assert probe.twin_losses_[C] == pytest.approx(losses[C], abs=1e-9)


def test_the_control_twin_chooses_its_own_C_on_control_labels(twins):
    """The control probe's twins are validated on the control labels of the validation rows
    (scikit-learn's log-loss recomputed here), and it keeps its own best."""
    data, source, runner = twins
    _, val = split_validation(data, 0.1, runner.seed)
    control = runner[SITE + " [control]"]
    assert isinstance(control, TwinProbe)
    Xv, yv = source.rows[(SITE, "mean")][val.example_ids], runner.control.labels(val)
    losses = [log_loss(yv, twin.predict_proba(Xv), labels=[0, 1, 2]) for twin in control.twins]
    assert list(control.twin_losses_.values()) == pytest.approx(losses, abs=1e-9)
    assert control.C_ == GRID[int(np.argmin(losses))]
    assert list(control.twin_losses_.values()) != pytest.approx(list(runner[SITE].twin_losses_.values()), abs=0.01)


def test_saved_twins_predict_the_same(twins, tmp_path):
    data, source, runner = twins
    runner.save(tmp_path / "p")
    loaded = ProbeRunner.load(tmp_path / "p")
    X = source.rows[(SITE, "mean")]
    np.testing.assert_array_equal(loaded[SITE].predict_proba(X), runner[SITE].predict_proba(X))
    assert loaded[SITE].C_ == runner[SITE].C_
    assert loaded[SITE].compute()["alpha"] == pytest.approx(runner.metrics.loc[SITE, "alpha"])


def test_the_torch_backend_bank_steps_the_twins(twins):
    """With backend="torch" the bank trains the twins of a linear probe (each one a banked
    probe); the probe keeps the twin of lowest validation loss, close to scikit-learn's."""
    data, source, runner = twins
    config = ProbeConfig(SITE, Cs=GRID, eta0=0.01)
    th = ProbeRunner.from_source(source, [config], progress=False, backend="torch").fit_probes(data, data, **FIT)
    probe = th[SITE]
    assert probe.banked and {p.name for p in th.bank.probes} == {t.name for t in probe.twins}
    assert all(t.n_steps_ > 0 for t in probe.twins)
    assert probe.C_ == min(probe.twin_losses_, key=probe.twin_losses_.get)
    chosen = probe.twins[GRID.index(probe.C_)]
    np.testing.assert_array_equal(probe.coef_, chosen.coef_)
    for C in GRID:  # each twin close to the scikit-learn backend's twin of the same C
        assert probe.twin_losses_[C] == pytest.approx(runner[SITE].twin_losses_[C], abs=0.03)


@pytest.mark.parametrize("kwargs, match", [
    (dict(Cs=[0.1], alpha=1e-3), "remove alpha"),
    (dict(Cs=[0.1], head="mlp"), "takes alpha"),
    (dict(Cs=[0.1], task="regression"), "takes alpha"),
    (dict(Cs=[-1.0]), "positive"),
])
def test_bad_grids_are_refused_when_the_config_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProbeConfig(SITE, **kwargs)


def test_without_validation_only_the_default_strength_trains():
    """val_size=0 leaves nothing to choose C on: the twin nearest alpha="auto"'s C (0.005)
    trains alone, and equals the one probe of alpha="auto"."""
    data, source = synthetic(n=200)
    grid = (0.001, 0.004, 0.5)
    runner = ProbeRunner.from_source(source, [ProbeConfig(SITE, Cs=grid)], progress=False)
    runner.fit_probes(data, val_size=0, num_epochs=3)
    probe = runner[SITE]
    assert probe.C_ == 0.004 and [t.n_steps_ for t in probe.twins] == [0, 3 * 13, 0]
    alone = ProbeRunner.from_source(source, [ProbeConfig(SITE, alpha=1 / (0.004 * 200))], progress=False)
    alone.fit_probes(data, val_size=0, num_epochs=3)
    np.testing.assert_allclose(probe.coef_, alone[SITE].coef_, rtol=1e-10)
