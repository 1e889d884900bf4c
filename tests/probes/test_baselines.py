"""Text baselines (issue 17): majority class, mean, bag of words and token identity, each
against an independent reference (numpy, a plain scikit-learn pipeline, a Python loop)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline

from lm_probe import IGNORE, ProbeConfig, ProbeDataset, ProbeRunner, load_model
from lm_probe.probes.baselines import BOW_MAX_ITER, baselines_table
from lm_probe.probes.probe import Probe
from lm_probe.testing import NEGATIVE, POSITIVE, tiny_bpe_tokenizer, tiny_tokenizer, toy_texts

from conftest import tiny_experiment_folder

SITE = "model.layers[1].output"


def probe(classes=(0, 1), **kwargs) -> Probe:
    """A probe as a fit leaves it (its classes set), without a model: baselines never read one."""
    return Probe(ProbeConfig(SITE, **kwargs), classes=classes)


def row(table: pd.DataFrame, baseline: str, **where) -> pd.Series:
    picked = table[table["baseline"] == baseline]
    for key, value in where.items():
        picked = picked[picked[key] == value]
    assert len(picked) == 1, picked
    return picked.iloc[0]


def log_loss(y, proba, classes):
    """Mean negative log-probability of the true class, float64, clipped as scikit-learn clips."""
    p = np.clip(np.asarray(proba, np.float64), np.finfo(np.float64).eps, 1)
    p = p / p.sum(1, keepdims=True)
    return float(-np.mean(np.log(p[np.arange(len(y)), np.searchsorted(classes, y)])))


@pytest.fixture(scope="module")
def fitted(llama, toy):
    """A runner fit on the toy sentiment data (a probe and its control twin), with its split."""
    train, test = toy
    runner = ProbeRunner(llama, [ProbeConfig(SITE, control=True)], progress=False)
    runner.fit_probes(train, test, batch_size=32, num_epochs=1, eval_every=5, val_size=0.1)
    fit, _ = train.tt_split(0.1, seed=runner.seed)  # the rows the probes trained on
    return runner, fit, test


# ---------------------------------------------------------------- through fit_probes
def test_majority_is_the_majority_share_of_the_test_set(fitted):
    runner, fit, test = fitted
    table = runner.baselines
    assert len(table) == 2, "one task (the control twin shares its probe's), two baselines"
    counts = np.bincount(fit.labels, minlength=2)
    majority = int(np.argmax(counts))
    got = row(table, "majority")
    assert got["accuracy"] == pytest.approx(np.mean(test.labels == majority), abs=1e-12)
    prior = counts / counts.sum()
    assert got["loss"] == pytest.approx(-np.mean(np.log(prior[test.labels])), rel=1e-9)
    assert (got["n_train"], got["n_scored"]) == (len(fit), len(test))
    assert got["probes"] == SITE and got["task"] == "classification" and got["input"] == "labels"


def test_baselines_carry_the_probes_bootstrap_intervals(fitted):
    """The majority baseline's accuracy interval equals percentiles of a slow loop over
    resamples drawn as the bootstrap documents (row indices floor(u * n), seeded by the
    runner's seed), on the same test rows."""
    runner, fit, test = fitted
    got = row(runner.baselines, "majority")
    correct = (test.labels == np.argmax(np.bincount(fit.labels, minlength=2))).astype(float)
    rng, n = np.random.default_rng(runner.seed), len(correct)
    values = [correct[np.minimum(np.floor(rng.random(n) * n).astype(int), n - 1)].mean() for _ in range(1000)]
    lo, hi = np.percentile(values, [2.5, 97.5])
    assert (got["accuracy_lo"], got["accuracy_hi"]) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    for name in ("majority", "bag_of_words"):
        scored = row(runner.baselines, name)
        for metric in ("accuracy", "f1", "loss", "auroc"):
            assert scored[f"{metric}_lo"] <= scored[metric] + 1e-12 <= scored[f"{metric}_hi"] + 2e-12, (name, metric)


def test_bag_of_words_equals_an_independent_pipeline(fitted):
    runner, fit, test = fitted
    pipe = make_pipeline(CountVectorizer(), LogisticRegression(C=1.0, max_iter=BOW_MAX_ITER))
    pipe.fit(fit.texts, fit.labels)
    proba = pipe.predict_proba(test.texts)
    got = row(runner.baselines, "bag_of_words")
    assert got["input"] == "text"
    assert got["accuracy"] == pytest.approx(np.mean(pipe.predict(test.texts) == test.labels), abs=1e-12)
    assert got["loss"] == pytest.approx(log_loss(test.labels, proba, [0, 1]), rel=1e-9)
    assert got["accuracy"] > row(runner.baselines, "majority")["accuracy"], "the words carry the label"
    shared = {"loss", "accuracy", "precision", "recall", "f1", "matthews", "support", "n_scored"}
    assert shared <= set(runner.metrics.columns) & set(runner.baselines.columns), "the columns line up"


def test_baselines_survive_save_and_load(fitted, tmp_path):
    runner, _, _ = fitted
    loaded = ProbeRunner.load(runner.save(tmp_path / "probes"))
    pd.testing.assert_frame_equal(loaded.baselines, runner.baselines, check_dtype=False)
    assert ProbeRunner(runner.model, runner.configs, progress=False).baselines is None
    document = json.loads((tmp_path / "probes" / "probes.json").read_text())
    del document["baselines"]  # a folder saved before baselines existed
    (tmp_path / "probes" / "probes.json").write_text(json.dumps(document))
    assert ProbeRunner.load(tmp_path / "probes").baselines is None


# ---------------------------------------------------------------- the table alone
def test_token_ids_when_there_are_no_texts():
    texts, labels = toy_texts(160, seed=3)
    data = ProbeDataset.from_texts(texts, labels, tokenizer=tiny_tokenizer(), max_length=32)
    data = ProbeDataset(data.ids, data.labels)  # the same examples, texts dropped
    fit, test = data.tt_split(0.25, seed=0)
    table = baselines_table({"p": probe()}, fit, test)
    docs = lambda d: [" ".join(str(i) for i in ids) for ids in d.ids]
    pipe = make_pipeline(CountVectorizer(token_pattern=r"\S+", lowercase=False),
                         LogisticRegression(C=1.0, max_iter=BOW_MAX_ITER)).fit(docs(fit), fit.labels)
    got = row(table, "bag_of_words")
    assert got["input"] == "token_ids"
    assert got["accuracy"] == pytest.approx(np.mean(pipe.predict(docs(test)) == test.labels), abs=1e-12)
    assert got["loss"] == pytest.approx(log_loss(test.labels, pipe.predict_proba(docs(test)), [0, 1]), rel=1e-9)


def test_regression_mean_and_ridge():
    rng = np.random.default_rng(0)
    texts, _ = toy_texts(120, seed=4)
    y = np.array([sum(w in POSITIVE for w in t.split()) - sum(w in NEGATIVE for w in t.split()) for t in texts],
                 np.float64) + rng.normal(0, 0.1, len(texts))
    data = ProbeDataset.from_texts(texts, y, tokenizer=tiny_tokenizer(), max_length=32)
    fit, test = data.tt_split(0.25, seed=0)
    table = baselines_table({"p": probe(None, task="regression")}, fit, test)
    mean = row(table, "mean")
    resid = test.labels - fit.labels.mean()
    assert mean["mse"] == pytest.approx(np.mean(resid ** 2), rel=1e-12)
    assert mean["r2"] == pytest.approx(1 - np.sum(resid ** 2) / np.sum((test.labels - test.labels.mean()) ** 2),
                                       rel=1e-12)
    vec = CountVectorizer().fit(fit.texts)
    pred = Ridge(alpha=1.0).fit(vec.transform(fit.texts).toarray(), fit.labels).predict(
        vec.transform(test.texts).toarray())  # dense: another solver than the sparse fit's
    bow = row(table, "bag_of_words")
    assert bow["mse"] == pytest.approx(np.mean((pred - test.labels) ** 2), rel=1e-6)
    assert bow["r2"] > 0.5 > mean["r2"]


def test_token_identity_equals_a_python_loop():
    words, tags = [], []
    for text in toy_texts(120, seed=5)[0]:
        words.append(text.split())
        tags.append(["POS" if w in POSITIVE else "NEG" if w in NEGATIVE else "O" for w in words[-1]])
    data = ProbeDataset.from_tagged(words, tags, tiny_bpe_tokenizer())
    fit, test = data.tt_split(0.3, seed=0)
    table = baselines_table({"tok": probe((0, 1, 2), pool="none")}, fit, test)
    assert set(table["baseline"]) == {"majority", "token_identity"}
    pairs = lambda d: [(int(i), int(y)) for ids, ys in zip(d.ids, d.token_labels) for i, y in zip(ids, ys)
                       if y != IGNORE]
    by_token: dict[int, Counter] = {}
    overall = Counter()
    for token, label in pairs(fit):
        by_token.setdefault(token, Counter())[label] += 1
        overall[label] += 1
    n = sum(overall.values())
    correct, nll, test_pairs = 0, 0.0, pairs(test)
    for token, label in test_pairs:
        counts = by_token.get(token, Counter())
        m = sum(counts.values())
        p = {c: (counts[c] + overall[c] / n) / (m + 1) for c in (0, 1, 2)}
        guess = max((0, 1, 2), key=lambda c: (counts[c], overall[c], -c))  # most frequent, ties by the prior
        correct += guess == label
        nll -= np.log(max(p[label], np.finfo(np.float64).eps))
    got = row(table, "token_identity")
    assert got["accuracy"] == pytest.approx(correct / len(test_pairs), abs=1e-12)
    assert got["loss"] == pytest.approx(nll / len(test_pairs), rel=1e-9)
    majority = max((0, 1, 2), key=lambda c: (overall[c], -c))
    share = np.mean([y == majority for _, y in test_pairs])
    assert row(table, "majority")["accuracy"] == pytest.approx(share, abs=1e-12)
    assert got["n_scored"] == len(test_pairs) and got["accuracy"] > share + 0.1, "first subwords carry the tag"


def test_a_failing_baseline_is_an_error_row(logs):
    texts = ["a b", "c d e", "f", "g h"] * 10  # one-letter words: CountVectorizer finds no vocabulary
    data = ProbeDataset.from_texts(texts, [0, 1, 0, 1] * 10, tokenizer=tiny_tokenizer(), max_length=8)
    fit, test = data.tt_split(0.25, seed=0)
    table = baselines_table({"p": probe()}, fit, test)
    bow = row(table, "bag_of_words")
    assert np.isnan(bow["accuracy"]) and "empty vocabulary" in bow["score_error"]
    assert row(table, "majority")["accuracy"] == pytest.approx(0.5)
    assert any("baseline 'bag_of_words' could not be fit" in m for m in logs)


def test_one_task_per_target_and_classes():
    texts, labels = toy_texts(90, n_classes=3, seed=6)
    data = ProbeDataset.from_texts(texts, labels, tokenizer=tiny_tokenizer(), max_length=32)
    fit, test = data.tt_split(0.3, seed=0)
    table = baselines_table({"all": probe((0, 1, 2)), "also": probe((0, 1, 2)), "ends": probe((0, 2))}, fit, test)
    assert row(table, "majority", probes="all,also")["n_scored"] == len(test)
    ends = row(table, "majority", probes="ends")
    assert ends["n_scored"] == np.isin(test.labels, [0, 2]).sum()
    assert ends["n_train"] == np.isin(fit.labels, [0, 2]).sum()


# ---------------------------------------------------------------- lm-probe run
def test_run_writes_baselines_per_seed_and_combined(tmp_path):
    from lm_probe.app.experiment import load_experiment
    from lm_probe.app.outputs import run_plan
    from lm_probe.app.plan import plan_experiment

    tiny_experiment_folder(tmp_path, layers=2, n=80)
    (tmp_path / "exp.toml").write_text(
        'seeds = [0, 1]\nout = "out"\n[model]\nname = "tiny"\n[data]\npath = "toy.csv"\nmax_length = 32\n'
        'test_size = 0.25\nbatch_size = 32\n[sites]\npaths = ["model.layers.1.output"]\n'
        "[probes]\nnum_epochs = 1\neval_every = 2\n")
    model = load_model(str(tmp_path / "tiny"))
    plan = plan_experiment(load_experiment(tmp_path / "exp.toml"), model=model, progress=False)
    run_plan(plan)
    out = tmp_path / "out"
    combined = pd.read_csv(out / "baselines.csv")
    for run in plan.runs:
        own = pd.read_csv(run.out / "baselines.csv")
        expected = run.runner.baselines.drop(columns=["support"])
        pd.testing.assert_frame_equal(own, expected, check_dtype=False)
        pd.testing.assert_frame_equal(combined[combined["seed"] == run.seed].drop(columns=["seed"])
                                      .reset_index(drop=True), own, check_dtype=False)
        assert "text baselines" in (run.out / "report.html").read_text()
    assert list(combined["baseline"]) == ["majority", "bag_of_words"] * 2
