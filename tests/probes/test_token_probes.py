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
    y_control = np.concatenate(runner.control.labels(test))
    keep = y_control != IGNORE
    assert row["control_accuracy"] == pytest.approx(np.mean(twin.predict(X[keep]) == y_control[keep]), abs=1e-9)
    # the control label is a function of the word type, drawn from the task's label distribution
    # one label per word type across fit, validation and test: a test word seen in training keeps its label
    fit, val = train.tt_split(0.1, seed=0)
    by_word, shared = {}, 0
    for split in (fit, val, test):
        for words, labels in zip(split.token_words, runner.control.labels(split)):
            for w, lab in zip(words, labels):
                if lab != IGNORE:
                    shared += w.lower() in by_word and split is test
                    assert by_word.setdefault(w.lower(), lab) == lab
    assert len(set(by_word.values())) > 1 and twin.n_steps_ > 0 and shared > 0


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


def test_sequence_control_labels_are_drawn_per_example_id(gpt2, toy):
    train, test = toy
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.1.output", control=True)], seed=3, progress=False)
    runner.fit_probes(train, test, **FIT)
    row = runner.metrics.iloc[0]
    assert row["control_accuracy"] < row["accuracy"] and row["selectivity"] == pytest.approx(
        row["accuracy"] - row["control_accuracy"])
    control = runner.control
    # keyed by example id: the same example has the same control label in any split or order
    labels = dict(zip(train.example_ids.tolist(), control.labels(train).tolist()))
    fit, val = train.tt_split(0.1, seed=3)
    for split in (fit, val, train.subset(np.arange(len(train))[::-1])):
        assert [labels[i] for i in split.example_ids.tolist()] == control.labels(split).tolist()
    assert not np.array_equal(control.labels(train), train.labels)
    # drawn from the fit split's label distribution (20,000 ids: each share within 4 standard errors)
    many = ProbeDataset([np.array([1])] * 20000, np.zeros(20000, int))
    drawn = control.labels(many)
    fit_share = np.mean(fit.labels == 1)
    assert abs(np.mean(drawn == 1) - fit_share) < 4 * np.sqrt(fit_share * (1 - fit_share) / 20000)
    other_seed = ProbeRunner(gpt2, [ProbeConfig("transformer.h.1.output", control=True)], seed=4, progress=False)
    other_seed.fit_probes(train, num_epochs=1, **FIT)
    assert not np.array_equal(other_seed.control.labels(train), control.labels(train))


def test_control_twin_is_validated_on_its_own_labels(gpt2, toy):
    """The twin's early stopping and best weights follow the control task: its best validation
    loss is its log-loss on the control labels of the validation split (features recomputed from
    Hugging Face hidden states), not on the real labels."""
    from sklearn.metrics import log_loss

    train, _ = toy
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.1.output", control=True)], progress=False)
    runner.fit_probes(train, num_epochs=2, val_size=0.2, batch_size=16, eval_every=3, patience=2)
    twin, real = runner["transformer.h.1.output [control]"], runner["transformer.h.1.output"]
    _, val = train.tt_split(0.2, seed=0)
    X = []
    for ids in val.ids:
        with torch.no_grad():
            h = gpt2._module(input_ids=torch.from_numpy(ids)[None], output_hidden_states=True).hidden_states[2]
        X.append(h[0].mean(0).numpy())
    X = np.stack(X)
    y_control = runner.control.labels(val)
    assert not np.array_equal(y_control, val.labels)
    p = twin.predict_proba(X)
    assert twin.best_loss_ == pytest.approx(log_loss(y_control, p, labels=twin.classes_), rel=1e-5)
    assert abs(twin.best_loss_ - log_loss(val.labels, p, labels=twin.classes_)) > 1e-3
    assert real.best_loss_ == pytest.approx(log_loss(val.labels, real.predict_proba(X), labels=real.classes_), rel=1e-5)


def test_datasets_built_and_freed_in_a_loop_never_share_control_labels(llama):
    """Control labels are a function of the seed and the word (or example id), never of a cache
    keyed by the id() of a dataset object that Python may reuse once it is freed."""
    from lm_probe.probes.control import ControlTask

    seen = []
    for k in range(4):
        words, tags = tagged(40 + 10 * (k % 2), seed=10 + k)  # two sizes, different sentences each time
        data = ProbeDataset.from_tagged(words, tags, tiny_tokenizer())
        runner = ProbeRunner(llama, [ProbeConfig("model.layers.0.output", pool="none", control=True)], progress=False)
        runner.fit_probes(data, data, num_epochs=1, val_size=0.2, batch_size=16)
        labels = runner.control.labels(data)
        fresh = ControlTask(True, runner.control.classes, runner.control.probs, seed=0).labels(data)
        assert [a.tolist() for a in labels] == [b.tolist() for b in fresh]
        assert [len(a) for a in labels] == [len(ids) for ids in data.ids]
        by_word = {}
        for ws, labs in zip(data.token_words, labels):
            for w, lab in zip(ws, labs):
                if lab != IGNORE:
                    assert by_word.setdefault(w.lower(), lab) == lab
        seen.append(id(data))
        del data, runner


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
