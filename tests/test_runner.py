"""The runner: one trace per batch, early exits, early stopping, metrics, bad input."""

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, log_loss

from lm_probe import Consumer, ProbeConfig, ProbeDataset, ProbeRunner, SiteError, StopReason
from lm_probe.testing import tiny_tokenizer, toy_texts

from conftest import count_calls

FIT = dict(batch_size=16, eval_every=2, patience=3)


def n_batches(n, size):
    return -(-n // size)


def test_one_forward_per_batch_whatever_the_number_of_probes(llama, toy):
    train, test = toy
    configs = [ProbeConfig(f"model.layers.{i}.output", pool=p, name=f"{i}{p}")
               for i in range(4) for p in ("mean", "last", "max")]
    runner = ProbeRunner(llama, configs, progress=False)
    calls, handle = count_calls(llama._module)
    head, head_handle = count_calls(llama._module.lm_head)
    try:
        runner.fit_probes(train, test, num_epochs=1, val_size=0.1, **FIT)
    finally:
        handle.remove(), head_handle.remove()
    n_val = int(np.ceil(len(train) * 0.1))
    steps = max(p.n_steps_ for p in runner.probes.values())
    expected = n_batches(n_val, 16) + steps + n_batches(len(test), 16)
    assert calls["n"] == expected
    assert head["n"] == 0, "no logits unless a site asks for them"


def test_forward_stops_after_the_deepest_site(gpt2, toy):
    train, _ = toy
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.1.output")], progress=False)
    deeper, handle = count_calls(gpt2._module.transformer.h[2])
    used, handle2 = count_calls(gpt2._module.transformer.h[1])
    try:
        runner.fit_probes(train, val_size=0.1, **FIT)
    finally:
        handle.remove(), handle2.remove()
    assert used["n"] > 0 and deeper["n"] == 0


class StopsAfter(Consumer):
    """A consumer that reads one site and stops wanting batches after ``k`` updates."""

    def __init__(self, site, k):
        self.requests, self.k, self.seen = ((site, "mean"),), k, []

    @property
    def active(self):
        return len(self.seen) < self.k

    def update(self, batch):
        self.seen.append(batch.acts[self.requests[0]].copy())


def test_site_of_a_stopped_consumer_is_no_longer_read(llama, toy):
    train, _ = toy
    deep = StopsAfter("model.layers.3.output", k=2)
    runner = ProbeRunner(llama, [ProbeConfig("model.layers.0.output")], consumers=[deep], progress=False)
    calls, handle = count_calls(llama._module.model.layers[3])
    try:
        runner.fit_probes(train, val_size=0.1, **FIT)
    finally:
        handle.remove()
    assert len(deep.seen) == 2 and calls["n"] == 2
    assert runner["model.layers.0.output"].n_steps_ > 2


def test_consumer_sees_the_same_activations_as_the_features_api(gpt2, toy):
    train, _ = toy
    spy = StopsAfter("transformer.h.2.output", k=1000)
    runner = ProbeRunner(gpt2, consumers=[spy], progress=False).collect(train, batch_size=16)
    batch = next(train.batches(16))
    direct = ProbeRunner(gpt2, [ProbeConfig("transformer.h.2.output")], progress=False).get_probe_features(
        batch.input_ids, batch.attention_mask)
    np.testing.assert_array_equal(spy.seen[0], direct["transformer.h.2.output"])
    assert sum(len(s) for s in spy.seen) == len(train)


def test_out_of_order_and_shared_sites(llama, toy):
    train, test = toy
    configs = [
        ProbeConfig("model.layers.3.output", name="deep"),
        ProbeConfig("model.layers.0.output", name="shallow"),
        ProbeConfig("model.layers[-1].output", name="deep-last", pool="last"),
        ProbeConfig("model.layers.3.output", name="deep-strong", alpha=0.1),
        ProbeConfig("model.layers.1.input", name="one-in"),
    ]
    runner = ProbeRunner(llama, configs, progress=False).fit_probes(train, test, **FIT)
    assert list(runner.metrics.index) == ["deep", "shallow", "deep-last", "deep-strong", "one-in"]
    assert runner.metrics.loc["deep-last", "site"] == "model.layers.3.output"
    assert runner.metrics["layer"].tolist() == [3, 0, 3, 3, 1]
    batch = next(test.batches(8))
    feats = runner.get_probe_features(batch.input_ids, batch.attention_mask)
    np.testing.assert_array_equal(feats["deep"], feats["deep-strong"])
    # the input of block 1 is the output of block 0
    np.testing.assert_allclose(feats["one-in"], feats["shallow"], atol=1e-6)
    assert not np.allclose(feats["deep"], feats["deep-last"])


def test_metrics_agree_with_an_independent_reference(gpt2, toy):
    """Accuracy/loss recomputed from HF output_hidden_states + the probe's own predictions."""
    train, test = toy
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.1.output", classes={0, 1})], progress=False)
    runner.fit_probes(train, test, **FIT)
    feats = []
    for ids in test.ids:
        with torch.no_grad():
            h = gpt2._module(input_ids=torch.from_numpy(ids)[None], output_hidden_states=True).hidden_states[2]
        feats.append(h[0].double().mean(0).numpy())
    probe = runner["transformer.h.1.output"]
    proba = probe.predict_proba(np.stack(feats))
    row = runner.metrics.loc["transformer.h.1.output"]
    assert row["accuracy"] == pytest.approx(accuracy_score(test.labels, probe.classes_[proba.argmax(1)]), abs=1e-12)
    assert row["loss"] == pytest.approx(log_loss(test.labels, proba), rel=1e-4)
    assert row["accuracy"] > 0.7
    assert set(runner.metrics.columns) >= {"loss", "accuracy", "precision", "recall", "f1", "matthews", "site",
                                          "pool", "layer", "n_steps", "stopped_early", "stop_reason"}


def test_early_stopping_keeps_best_validation_weights(gpt2, toy):
    train, _ = toy
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.0.output", eta0=0.5, learning_rate="constant")],
                         seed=1, progress=False)
    runner.fit_probes(train, num_epochs=20, val_size=0.2, batch_size=8, eval_every=1, patience=2, min_delta=0.0)
    probe = runner["transformer.h.0.output"]
    assert probe.stopped_reason_ is StopReason.PATIENCE
    _, val = train.tt_split(0.2, seed=1)
    X = runner.pooled(val)[("transformer.h.0.output", "mean")]
    losses = [loss for _, loss in probe.history_]
    assert probe.best_loss_ == min(losses)
    assert log_loss(val.labels, probe.predict_proba(X)) == pytest.approx(probe.best_loss_, rel=1e-6)  # val re-pooled in other batches
    assert losses[-1] > probe.best_loss_


def test_max_steps_and_epochs(gpt2, toy):
    train, test = toy
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.0.output", name="a")], progress=False)
    runner.fit_probes(train, test, max_steps=5, batch_size=16, eval_every=2, patience=100)
    assert runner["a"].n_steps_ == 5 and runner.metrics.loc["a", "stop_reason"] == "max_steps"
    runner.fit_probes(train, test, num_epochs=2, batch_size=32, eval_every=2, patience=100, val_size=0.1)
    fit_n = len(train) - int(np.ceil(0.1 * len(train)))
    assert runner["a"].n_steps_ == 2 * n_batches(fit_n, 32)
    assert runner.metrics.loc["a", "stop_reason"] == "end_of_data"
    assert not runner.metrics.loc["a", "stopped_early"]


def test_multiclass_with_arbitrary_labels(llama):
    tok = tiny_tokenizer()
    texts, labels = toy_texts(300, n_classes=3, seed=2)
    mapped = np.array([-5, 2, 40])[labels]
    train, test = ProbeDataset.from_texts(texts, mapped, tokenizer=tok).tt_split(0.3, seed=0)
    runner = ProbeRunner(llama, [ProbeConfig("model.layers.1.output")], progress=False)
    runner.fit_probes(train, test, **FIT)
    assert runner["model.layers.1.output"].classes_.tolist() == [-5, 2, 40]
    assert runner.metrics["accuracy"].iloc[0] > 1 / 3 + 0.1


def test_same_seed_same_metrics(gpt2, toy):
    train, test = toy
    configs = lambda: [ProbeConfig("transformer.h.0.output"), ProbeConfig("transformer.h.2.output", pool="last")]
    run = lambda seed: ProbeRunner(gpt2, configs(), seed=seed, progress=False).fit_probes(train, test, **FIT).metrics
    first, second = run(0), run(0)
    pd.testing.assert_frame_equal(first, second)
    assert not first.equals(run(1))


def test_a_site_that_is_all_non_finite_leaves_the_other_probes_alone(gpt2, toy):
    train, test = toy
    bias = gpt2._module.transformer.h[1].mlp.c_proj.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias[0] = float("nan")  # block 1 (and everything after it) turns NaN
    try:
        runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.0.output", name="fine"),
                                    ProbeConfig("transformer.h.1.output", name="nan")], progress=False)
        runner.fit_probes(train, test, val_size=0, **FIT)
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    m = runner.metrics
    # every row of the NaN site is left out and counted: in training (once, not once per epoch) and in test
    assert m.loc["nan", "n_nonfinite_fit"] == len(train) and m.loc["nan", "n_nonfinite"] == len(test)
    assert m.loc["nan", "n_steps"] == 0 and np.isnan(m.loc["nan", "accuracy"])
    assert m.loc["fine", "n_nonfinite"] == 0 and m.loc["fine", "n_nonfinite_fit"] == 0
    alone = ProbeRunner(gpt2, [ProbeConfig("transformer.h.0.output", name="fine")], progress=False)
    alone.fit_probes(train, test, val_size=0, **FIT)
    cols = ["accuracy", "loss", "f1", "n_steps"]
    pd.testing.assert_series_equal(m.loc["fine", cols], alone.metrics.loc["fine", cols], check_dtype=False)


# ---------------------------------------------------------------- bad input, before any forward
@pytest.fixture
def no_forward(gpt2):
    calls, handle = count_calls(gpt2._module)
    yield calls
    handle.remove()
    assert calls["n"] == 0, "bad input must be caught before any forward pass"


def test_unknown_site_errors_before_forward(gpt2, no_forward):
    with pytest.raises(SiteError, match="'transformer.h.1.mlpp.output'"):
        ProbeRunner(gpt2, [ProbeConfig("transformer.h.1.mlpp.output")])


def test_colliding_default_names(gpt2, no_forward):
    with pytest.raises(ValueError, match="unique name="):
        ProbeRunner(gpt2, [ProbeConfig("transformer.h.1.output"), ProbeConfig("transformer.h.1.output", pool="last")])


def test_labels_outside_classes(gpt2, toy, no_forward):
    train, test = toy
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.1.output", classes={0, 5})])
    with pytest.raises(ValueError, match=r"labels \[1\] outside the classes \[0, 5\]"):
        runner.fit_probes(train, test)


def test_class_names_are_named_in_label_messages(gpt2, no_forward):
    tok = tiny_tokenizer()
    names = ["neg", "pos", "neutral"]
    train = ProbeDataset.from_texts(["good", "bad", "fun"] * 4, ["pos", "neg", "neutral"] * 4, tok, label_names=names)
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.1.output", classes={"pos", "neg"}, label_names=names)])
    with pytest.raises(ValueError, match=r"labels \[2 \(neutral\)\] outside the classes \[0 \(neg\), 1 \(pos\)\]"):
        runner.fit_probes(train)
    single = ProbeDataset.from_texts(["good"] * 4, ["pos"] * 4, tok, label_names=names)
    with pytest.raises(ValueError, match=r"single class \(\[1 \(pos\)\]\)"):
        runner.fit_probes(single)
    swapped = ProbeConfig("transformer.h.1.output", classes={"pos", "neg"}, label_names=["pos", "neg"])
    other = ProbeRunner(gpt2, [swapped])
    with pytest.raises(ValueError, match=r"names its labels \['pos', 'neg'\] but the training set names them "
                                         r"\['neg', 'pos', 'neutral'\]"):
        other.fit_probes(train)


def test_probe_on_named_classes_trains(gpt2):
    texts, labels = toy_texts(80, seed=3)
    names = np.array(["neg", "pos"])[labels]
    data = ProbeDataset.from_texts(texts, names.tolist(), tiny_tokenizer(), label_names=["neg", "pos"])
    train, test = data.tt_split(0.25, seed=0)
    config = ProbeConfig("transformer.h.1.output", classes={"neg", "pos"}, label_names=train.label_names)
    runner = ProbeRunner(gpt2, [config], progress=False).fit_probes(train, test, **FIT)
    assert runner["transformer.h.1.output"].classes_.tolist() == [0, 1]
    assert np.isfinite(runner.metrics.loc["transformer.h.1.output", "accuracy"])


def test_test_labels_unseen_in_training(gpt2, no_forward):
    tok = tiny_tokenizer()
    train = ProbeDataset.from_texts(["good", "bad"] * 5, [0, 1] * 5, tokenizer=tok)
    test = ProbeDataset.from_texts(["fun"], [2], tokenizer=tok)
    with pytest.raises(ValueError, match=r"test set has labels \[2\]"):
        ProbeRunner(gpt2, [ProbeConfig("transformer.h.1.output")]).fit_probes(train, test)


def test_single_class_training_set(gpt2, no_forward):
    train = ProbeDataset.from_texts(["good movie"] * 4, [1] * 4, tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="single class"):
        ProbeRunner(gpt2, [ProbeConfig("transformer.h.1.output")]).fit_probes(train)


def test_not_an_nnsight_model(gpt2):
    with pytest.raises(TypeError, match="load_model"):
        ProbeRunner(gpt2._module, [ProbeConfig("transformer.h.1.output")])


@pytest.mark.parametrize("size", [0, -1, 2.0, True])
@pytest.mark.parametrize("call", ["fit_probes", "evaluate", "pooled", "collect", "get_probe_features", "gauge",
                                  "batches"])
def test_batch_size_below_one_is_refused_everywhere(gpt2, toy, no_forward, call, size):
    """Every public function taking a batch size refuses 0, negatives and non-integers with one
    ValueError that names the argument (not a ZeroDivisionError from inside a pass)."""
    from lm_probe import DiffusionGauge, Geometry

    train, test = toy
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.1.output")], progress=False)
    batch = next(test.batches(4))
    calls = {
        "fit_probes": lambda: runner.fit_probes(train, test, batch_size=size),
        "evaluate": lambda: runner.evaluate(test, batch_size=size),
        "pooled": lambda: runner.pooled(test, batch_size=size),
        "collect": lambda: runner.collect(test, [Geometry(["transformer.h.1.output"])], batch_size=size),
        "get_probe_features": lambda: runner.get_probe_features(batch.input_ids, batch.attention_mask,
                                                                batch_size=size),
        "gauge": lambda: DiffusionGauge(["transformer.h.1.output"], n_samples=8, knn=3, batch_size=size),
        "batches": lambda: next(test.batches(size)),
    }
    with pytest.raises(ValueError, match=r"batch_size must be a whole number of examples per batch, at least 1; "
                                         rf"got {size!r}"):
        calls[call]()
