"""Bootstrap intervals and calibration columns in ``runner.metrics`` on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from lm_probe import IGNORE, ProbeConfig, ProbeDataset, ProbeRunner
from lm_probe.functional.metrics import METRIC_COLUMNS
from lm_probe.probes.control import CONTROL_SUFFIX
from lm_probe.testing import tiny_tokenizer

from conftest import count_calls
from test_token_probes import tagged

FIT = dict(batch_size=16, eval_every=2, patience=3, num_epochs=2)
SITES = ("model.layers.1.output", "model.layers.3.output")


def _runner(llama, seed=0):
    return ProbeRunner(llama, [ProbeConfig(s, pool="mean", control=True) for s in SITES], seed=seed, progress=False)


@pytest.fixture(scope="module")
def fitted(llama, toy):
    train, test = toy
    return _runner(llama).fit_probes(train, test, n_boot=300, **FIT)


def _percentiles(values, ci=0.95):
    return tuple(np.percentile(values, [50 * (1 - ci), 50 * (1 + ci)]))


def test_every_metric_has_an_interval_around_it(fitted):
    m = fitted.metrics
    for name in (*METRIC_COLUMNS, "control_accuracy", "selectivity"):
        for site in SITES:
            lo, point, hi = m.loc[site, [f"{name}_lo", name, f"{name}_hi"]]
            assert lo <= point <= hi, (site, name)
    assert (m["accuracy_hi"] - m["accuracy_lo"] > 0).all()


def test_intervals_and_new_metrics_equal_a_reference_on_the_scored_rows(fitted, toy):
    _, test = toy
    site = SITES[1]
    probe, twin = fitted[site], fitted[site + CONTROL_SUFFIX]
    X = fitted.pooled(test, [(site, "mean")])[(site, "mean")]
    y, y_control = np.asarray(test.labels), fitted.control.flat_labels(test)
    proba = probe.predict_proba(X)
    row = fitted.metrics.loc[site]
    assert row["auroc"] == pytest.approx(skm.roc_auc_score(y == probe.classes_[1], proba[:, 1]), abs=1e-12)
    right, twin_right = probe.predict(X) == y, twin.predict(X) == y_control
    rng, acc, sel = np.random.default_rng(fitted.seed), [], []
    for _ in range(300):  # the resamples documented in lm_probe.functional.bootstrap
        idx = np.minimum(np.floor(rng.random(len(y)) * len(y)).astype(int), len(y) - 1)
        acc.append(right[idx].mean())
        sel.append(right[idx].mean() - twin_right[idx].mean())
    assert (row["accuracy_lo"], row["accuracy_hi"]) == pytest.approx(_percentiles(acc), abs=1e-12)
    assert (row["selectivity_lo"], row["selectivity_hi"]) == pytest.approx(_percentiles(sel), abs=1e-12)


def test_same_seed_same_intervals_and_n_boot_0_omits_them(fitted, llama, toy):
    _, test = toy
    again = fitted.evaluate(test, n_boot=300)
    bounds = [c for c in fitted.metrics.columns if c.endswith(("_lo", "_hi"))]
    assert len(bounds) == 2 * (len(METRIC_COLUMNS) + 2)
    np.testing.assert_array_equal(again[bounds].to_numpy(float), fitted.metrics[bounds].to_numpy(float))
    narrower = fitted.evaluate(test, ci=0.5, n_boot=300)
    assert (narrower["accuracy_hi"] - narrower["accuracy_lo"] <= again["accuracy_hi"] - again["accuracy_lo"]).all()
    bare = fitted.evaluate(test, n_boot=0)
    assert not [c for c in bare.columns if c.endswith(("_lo", "_hi"))]
    np.testing.assert_array_equal(bare["accuracy"], fitted.metrics["accuracy"])


@pytest.mark.parametrize("bad", [dict(ci=0), dict(ci=1.0), dict(ci="0.95"), dict(n_boot=-1), dict(n_boot=10.5),
                                 dict(n_boot=True)])
def test_bad_ci_or_n_boot_fail_before_any_forward(llama, toy, bad):
    train, test = toy
    runner = _runner(llama)
    calls, handle = count_calls(llama._module)
    try:
        with pytest.raises(ValueError, match="ci must be|n_boot must be"):
            runner.fit_probes(train, test, **bad, **FIT)
        with pytest.raises(ValueError, match="ci must be|n_boot must be"):
            runner.evaluate(test, **bad)
    finally:
        handle.remove()
    assert calls["n"] == 0


def test_selectivity_interval_is_nan_when_the_twin_scores_other_rows(llama):
    """A test tag never seen in training leaves its tokens out of the probe's rows but not
    its twin's (the control labels cover every labeled token): no paired interval."""
    words, tags = tagged(120, seed=5)
    train = ProbeDataset.from_tagged(words, [["O" if t == "POS" else t for t in ts] for ts in tags], tiny_tokenizer())
    test = ProbeDataset.from_tagged(words[:30], tags[:30], tiny_tokenizer())
    code = {"NEG": 0, "O": 1, "POS": 2}  # the training codes (POS unseen)
    names = np.array(test.label_names)
    test.token_labels = [np.where(t == IGNORE, IGNORE, [code[n] for n in names[np.maximum(t, 0)]])
                         for t in test.token_labels]
    runner = ProbeRunner(llama, [ProbeConfig("model.layers.0.output", pool="none", control=True)], progress=False)
    row = runner.fit_probes(train, test, num_epochs=1, n_boot=100, batch_size=16, eval_every=5).metrics.iloc[0]
    assert row["n_unseen_label"] > 0
    assert np.isnan(row["selectivity_lo"]) and np.isnan(row["selectivity_hi"])
    assert row["accuracy_lo"] <= row["accuracy"] <= row["accuracy_hi"]
    assert row["control_accuracy_lo"] <= row["control_accuracy"] <= row["control_accuracy_hi"]
