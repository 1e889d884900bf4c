"""Token-level labels, control tasks, probe heads and sweeps (issue 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lm_probe import IGNORE, ProbeConfig, ProbeDataset, ProbeRunner, load_model
from lm_probe.testing import NEGATIVE, POSITIVE, tiny_bpe_tokenizer, tiny_model, tiny_tokenizer, toy_texts

from conftest import count_calls

FIT = dict(batch_size=16, eval_every=5, patience=4)


def tagged(n, seed=0):
    """Sentences of toy words tagged POS (positive word) / NEG / O."""
    texts, _ = toy_texts(n, seed=seed)
    words = [t.split() for t in texts]
    tags = [["POS" if w in POSITIVE else "NEG" if w in NEGATIVE else "O" for w in ws] for ws in words]
    return words, tags


# ------------------------------------------------------------------ alignment
def test_from_tagged_aligns_first_subwords_through_offsets():
    tok = tiny_bpe_tokenizer()
    words, tags = tagged(30, seed=1)
    data = ProbeDataset.from_tagged(words, tags, tok)
    assert data.label_names == ["NEG", "O", "POS"]
    for ids, labels, ws, ts in zip(data.ids, data.token_labels, words, tags):
        labeled = np.flatnonzero(labels != IGNORE)
        assert len(labeled) == len(ws), "one labeled token per word"
        for pos, word, tag in zip(labeled, ws, ts):
            piece = tok.decode([int(ids[pos])])
            assert word.startswith(piece.strip()) and piece.strip(), (piece, word)  # the Ġ marker stays on it
            assert data.label_names[labels[pos]] == tag
    assert any(len(ids) > len(ws) for ids, ws in zip(data.ids, words)), "words really split into subwords"


def test_all_subwords_labeled_when_asked():
    tok = tiny_bpe_tokenizer()
    words, tags = tagged(10, seed=2)
    first = ProbeDataset.from_tagged(words, tags, tok)
    every = ProbeDataset.from_tagged(words, tags, tok, label_first_subword_only=False)
    for a, b, ws in zip(first.token_labels, every.token_labels, words):
        assert (b != IGNORE).sum() >= (a != IGNORE).sum() >= len(ws)
        assert np.all(b[a != IGNORE] == a[a != IGNORE])


def test_integer_tags_kept_and_cut_labels_counted(logs):
    words = [["good", "movie", "bad", "plot", "fun"], ["the", "film"]]
    tags = [[1, 0, 2, 0, 1], [0, 0]]
    data = ProbeDataset.from_tagged(words, tags, tiny_tokenizer(), max_length=3)
    assert data.label_names is None and data.token_labels[0].tolist() == [1, 0, 2]
    assert any("2 word labels in 1 sentences fell beyond max_length=3" in m for m in logs)


def test_tags_and_words_of_different_lengths():
    with pytest.raises(ValueError, match="sentence 1 has 2 words but 3 tags"):
        ProbeDataset.from_tagged([["a"], ["good", "movie"]], [["O"], ["O", "O", "O"]], tiny_tokenizer())


def test_token_splits_are_by_sentence():
    words, tags = tagged(50)
    data = ProbeDataset.from_tagged(words, tags, tiny_tokenizer())
    train, test = data.tt_split(0.3, seed=0)
    assert len(train) + len(test) == 50
    key = lambda d: {tuple(r.tolist()) + (i,) for i, r in enumerate(d.ids)}
    assert sum(len(t) for t in train.token_labels) + sum(len(t) for t in test.token_labels) == sum(
        len(t) for t in data.token_labels)


# ------------------------------------------------------------------ token probes + control
@pytest.fixture(scope="module")
def token_run(llama):
    words, tags = tagged(240, seed=3)
    data = ProbeDataset.from_tagged(words, tags, tiny_tokenizer())
    train, test = data.tt_split(0.25, seed=0)
    runner = ProbeRunner(llama, [ProbeConfig("model.layers.0.output", pool="none", control=True)], progress=False)
    runner.fit_probes(train, test, num_epochs=3, **FIT)
    return runner, train, test


def test_token_probe_metrics_over_labeled_tokens(token_run, llama):
    runner, _, test = token_run
    row = runner.metrics.loc["model.layers.0.output"]
    labels = test.flat_token_labels()
    assert row["n_scored"] == int((labels != IGNORE).sum())
    assert sum(row["support"].values()) == row["n_scored"]
    assert row["support"] == {k: int((labels == k).sum()) for k in (0, 1, 2)}
    # independent: HF hidden states of each labeled token, predicted by the probe
    X, y = [], []
    for ids, lab in zip(test.ids, test.token_labels):
        with torch.no_grad():
            h = llama._module(input_ids=torch.from_numpy(ids)[None], output_hidden_states=True).hidden_states[1][0]
        X.append(h.numpy()[lab != IGNORE])
        y.append(lab[lab != IGNORE])
    pred = runner["model.layers.0.output"].predict(np.concatenate(X))
    assert row["accuracy"] == pytest.approx(np.mean(pred == np.concatenate(y)), abs=1e-9)
    majority = max(row["support"].values()) / row["n_scored"]
    assert majority < 0.7 and row["accuracy"] > 0.8  # well above the majority-class share


def test_control_task_and_selectivity(token_run):
    runner, train, _ = token_run
    row = runner.metrics.loc["model.layers.0.output"]
    assert row["selectivity"] == pytest.approx(row["accuracy"] - row["control_accuracy"])
    assert row["selectivity"] > 0.05
    twin = runner["model.layers.0.output [control]"]
    # control accuracy recomputed: the twin's predictions against control labels drawn per word type
    _, _, test = token_run
    X = runner.pooled(test, [("model.layers.0.output", "none")])[("model.layers.0.output", "none")]
    y_control = np.concatenate(runner._control[1](test))
    keep = y_control != IGNORE
    assert row["control_accuracy"] == pytest.approx(np.mean(twin.predict(X[keep]) == y_control[keep]), abs=1e-9)
    # the control label is a function of the word type, drawn from the task's label distribution
    fit, _ = train.tt_split(0.1, seed=0)
    control = runner._control[1](fit)
    by_word = {}
    for words, labels in zip(fit.token_words, control):
        for w, lab in zip(words, labels):
            if lab != IGNORE:
                assert by_word.setdefault(w.lower(), lab) == lab
    assert len(set(by_word.values())) > 1 and twin.n_steps_ > 0


def test_sweep_of_twenty_configs_on_two_sites_is_one_forward_per_batch(llama, toy):
    train, test = toy
    configs = []
    for site in ("model.layers.1.output", "model.layers.3.output"):
        for alpha in (1e-5, 1e-4, 1e-3):
            for pool in ("mean", "last"):
                configs.append(ProbeConfig(site, pool=pool, alpha=alpha, name=f"{site}/{pool}/{alpha}"))
        configs += [ProbeConfig(site, head="mlp", hidden_size=8, name=f"{site}/mlp"),
                    ProbeConfig(site, pool="max", control=True, name=f"{site}/max")]
    assert len(configs) == 16 and sum(c.control for c in configs) == 2
    configs += [ProbeConfig("model.layers.1.output", pool="first", name=f"first{i}", alpha=10.0 ** -i) for i in range(4)]
    runner = ProbeRunner(llama, configs, progress=False)
    assert len(runner.probes) == 22
    calls, handle = count_calls(llama._module)
    try:
        runner.fit_probes(train, test, num_epochs=1, val_size=0.1, batch_size=16, eval_every=100, patience=100)
    finally:
        handle.remove()
    n_val = int(np.ceil(0.1 * len(train)))
    steps = max(p.n_steps_ for p in runner.probes.values())
    assert calls["n"] == -(-n_val // 16) + steps + -(-len(test) // 16)
    assert len(runner.metrics) == 20 and runner.metrics["control_accuracy"].notna().sum() == 2


def test_sequence_control_is_a_seeded_permutation(gpt2, toy):
    train, test = toy
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.1.output", control=True)], seed=3, progress=False)
    runner.fit_probes(train, test, **FIT)
    row = runner.metrics.iloc[0]
    assert row["control_accuracy"] < row["accuracy"] and row["selectivity"] == pytest.approx(
        row["accuracy"] - row["control_accuracy"])
    perm = runner._control[1](test)
    assert sorted(perm.tolist()) == sorted(test.labels.tolist()) and not np.array_equal(perm, test.labels)


def test_unseen_test_tag_is_reported_not_crashed(llama, logs):
    words, tags = tagged(120, seed=5)
    train = ProbeDataset.from_tagged(words, [["O" if t == "POS" else t for t in ts] for ts in tags], tiny_tokenizer())
    test = ProbeDataset.from_tagged(words[:30], tags[:30], tiny_tokenizer())
    # tags map to codes per dataset: build test with the training codes instead
    code = {"NEG": 0, "O": 1, "POS": 2}
    test.token_labels = [np.where(l == IGNORE, IGNORE, [code[n] for n in np.array(test.label_names)[np.maximum(l, 0)]])
                         for l in test.token_labels]
    runner = ProbeRunner(llama, [ProbeConfig("model.layers.0.output", pool="none")], progress=False)
    runner.fit_probes(train, test, num_epochs=1, **FIT)
    row = runner.metrics.iloc[0]
    n_pos = sum(int((l == 2).sum()) for l in test.token_labels)
    assert row["n_unseen_label"] == n_pos > 0
    assert any("never seen in training" in m for m in logs)


# ------------------------------------------------------------------ heads
def test_mlp_head_learns_and_early_stops(gpt2, toy):
    train, test = toy
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.1.output", head="mlp", hidden_size=16,
                                            learning_rate_init=0.01)], progress=False)
    runner.fit_probes(train, test, num_epochs=5, batch_size=16, eval_every=2, patience=2)
    row = runner.metrics.iloc[0]
    probe = runner["transformer.h.1.output"]
    assert row["head"] == "mlp" and row["accuracy"] > 0.7
    assert row["stop_reason"] in ("patience", "end_of_data") and probe.best_loss_ == min(l for _, l in probe.history_)


def test_regression_probe(gpt2):
    texts, _ = toy_texts(400, seed=6)
    share = np.array([sum(w in POSITIVE for w in t.split()) / len(t.split()) for t in texts])
    data = ProbeDataset.from_texts(texts, share, tokenizer=tiny_tokenizer())
    train, test = data.tt_split(0.25, seed=0)
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.0.output", task="regression")], progress=False)
    runner.fit_probes(train, test, num_epochs=3, **FIT)
    row = runner.metrics.iloc[0]
    pred = runner["transformer.h.0.output"].predict(runner.pooled(test)[("transformer.h.0.output", "mean")])
    assert row["mse"] == pytest.approx(np.mean((pred - test.labels) ** 2), rel=1e-9) and row["loss"] == row["mse"]
    assert row["pearson"] == pytest.approx(np.corrcoef(pred, test.labels)[0, 1], rel=1e-9)
    assert row["r2"] > 0.3 and row["pearson"] > 0.6


def test_regression_targets_with_nan():
    with pytest.raises(ValueError, match="2 regression targets are NaN or infinite .first at index 1"):
        ProbeDataset.from_texts(["good", "bad", "fun"], [0.5, np.nan, np.inf], tokenizer=tiny_tokenizer())


def test_mismatched_probe_and_labels_fail_before_forward(gpt2, toy):
    train, _ = toy
    words, tags = tagged(20)
    token_data = ProbeDataset.from_tagged(words, tags, tiny_tokenizer())
    calls, handle = count_calls(gpt2._module)
    try:
        with pytest.raises(ValueError, match="pool='none' .token-level. but the training set has one label per"):
            ProbeRunner(gpt2, [ProbeConfig("transformer.h.0.output", pool="none")]).fit_probes(train)
        with pytest.raises(ValueError, match="use pool='none' for token-level probes"):
            ProbeRunner(gpt2, [ProbeConfig("transformer.h.0.output")]).fit_probes(token_data)
        floats = ProbeDataset(train.ids, np.linspace(0, 1, len(train)))
        with pytest.raises(ValueError, match="task='regression'"):
            ProbeRunner(gpt2, [ProbeConfig("transformer.h.0.output")]).fit_probes(floats)
    finally:
        handle.remove()
    assert calls["n"] == 0
