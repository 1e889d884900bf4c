"""The original lm_probe's API (t-shoemaker/lm_probe): its README runs unchanged on ours.

Each piece of that README has its own test here, and one test runs the README's code end
to end on a tiny random GPT-2 (``load_model(...)`` in place of ``LanguageModel("gpt2")``),
checked against Hugging Face's own hidden states pooled by hand.
"""

import warnings

import numpy as np
import pytest
import torch

from lm_probe import ProbeConfig, ProbeDataset, ProbeRunner, StopReason, load_model
from lm_probe.probes import original as probe_module
from lm_probe.testing import tiny_model, tiny_tokenizer, toy_texts

WIDTH = 16  # GPT-2 pads to 1024 tokens with padding="max_length"; the tiny tokenizer to this


def _tokenizer(side="right"):
    tok = tiny_tokenizer()
    tok.pad_token, tok.padding_side, tok.model_max_length = "<eos>", side, WIDTH
    return tok


# ---------------------------------------------------------------- ProbeDataset
@pytest.mark.parametrize("side", ["right", "left"])
def test_three_positional_arguments_are_from_tensors(side):
    tok = _tokenizer(side)
    texts, labels = toy_texts(30, seed=1)
    inputs = tok(texts, padding="max_length", truncation=True, return_tensors="pt")
    ds = ProbeDataset(inputs["input_ids"], inputs["attention_mask"], labels.tolist())
    ref = ProbeDataset.from_tensors(inputs["input_ids"], inputs["attention_mask"], labels)
    assert [r.tolist() for r in ds.ids] == [r.tolist() for r in ref.ids] == tok(texts)["input_ids"]
    np.testing.assert_array_equal(ds.labels, labels)
    # the padding is read off the tensors: the tokenizer's pad id and side
    assert (ds.pad_token_id, ds.padding_side) == (ref.pad_token_id, ref.padding_side) == (tok.pad_token_id, side)


def test_our_own_constructor_is_unchanged():
    ds = ProbeDataset([np.array([5, 6]), np.array([7])], [0, 1])
    assert [r.tolist() for r in ds.ids] == [[5, 6], [7]]
    assert (ds.pad_token_id, ds.padding_side) == (0, "right")


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.ones(3, 4, dtype=torch.long), torch.ones(3, 5, dtype=torch.long), [0, 1, 0]),
         r"shape \(3, 4\) but attention_mask has \(3, 5\)"),
        ((torch.ones(3, 4, dtype=torch.long), torch.full((3, 4), 2), [0, 1, 0]), "0 \\(padding\\) and 1"),
        ((torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)), "labels third"),
    ],
)
def test_the_original_form_with_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        ProbeDataset(*args)


def test_tt_split_takes_the_original_test_size_keyword():
    ds = ProbeDataset([np.array([i + 1]) for i in range(20)], [0, 1] * 10)
    train, test = ds.tt_split(test_size=0.1)
    assert (len(train), len(test)) == (18, 2)
    assert sorted(train.example_ids.tolist() + test.example_ids.tolist()) == list(range(20))


def test_slicing_gives_the_original_dict_of_padded_tensors():
    tok = _tokenizer()
    texts, labels = toy_texts(40, seed=2)
    inputs = tok(texts, padding="max_length", truncation=True, return_tensors="pt")
    _, test_set = ProbeDataset(inputs["input_ids"], inputs["attention_mask"], labels).tt_split(test_size=0.25)
    docs = test_set[0:5]
    rows = test_set.example_ids[:5]
    expected = tok([texts[i] for i in rows], padding="max_length", truncation=True, return_tensors="pt")
    assert set(docs) == {"input_ids", "attention_mask", "labels"}
    for key in ("input_ids", "attention_mask"):
        assert docs[key].dtype == torch.int64 and docs[key].shape == (5, WIDTH)
        assert torch.equal(docs[key], expected[key])
    assert docs["labels"].tolist() == labels[rows].tolist()
    one = test_set[1]  # a position: one row, as the original's __getitem__
    assert torch.equal(one["input_ids"], expected["input_ids"][1]) and one["labels"].ndim == 0
    assert torch.equal(test_set[[3, 0]]["input_ids"], expected["input_ids"][[3, 0]])
    with pytest.raises(IndexError):
        test_set[len(test_set)]


def test_slicing_a_dataset_of_texts_pads_to_the_longest_picked():
    tok = _tokenizer()
    ds = ProbeDataset.from_texts(["good movie", "a very dull film", "fun"], [1, 0, 1], tokenizer=tok)
    docs = ds[0:2]
    assert torch.equal(docs["input_ids"], tok(["good movie", "a very dull film"], padding=True,
                                              return_tensors="pt")["input_ids"])


# ---------------------------------------------------------------- ProbeConfig
@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which original arguments were warned about (they warn once per process)."""
    monkeypatch.setattr(probe_module, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def test_the_original_per_probe_settings_are_accepted(fresh_warnings):
    config = ProbeConfig("transformer.h.1.output", {0, 1}, test_size=0.5, patience=10, warmup_steps=25)
    assert (config.patience, config.warmup_steps, config.max_steps) == (10, 25, None)
    assert config.training(patience=5, min_delta=1e-4, warmup_steps=0, max_steps=7) == dict(
        patience=10, min_delta=1e-4, warmup_steps=25, max_steps=7)
    assert "test_size" not in config.probe_kwargs and "patience=10" in repr(config)
    (warning,) = fresh_warnings
    assert warning.category is FutureWarning and "fit_probes(val_size=...)" in str(warning.message)
    assert warning.filename == __file__  # points at the user's line


def test_each_original_argument_warns_once_per_process(fresh_warnings):
    for _ in range(3):
        ProbeConfig("transformer.h.1.output", {0, 1}, test_size=0.5, threshold=1e-5, null_label=None)
    messages = [str(w.message) for w in fresh_warnings]
    assert len(messages) == 3 and all("of the original lm_probe" in m for m in messages)
    assert any("fit_probes(min_delta=...)" in m for m in messages)
    assert any("pool='none'" in m for m in messages)


def test_model_kwargs_are_passed_on_and_checked(fresh_warnings):
    config = ProbeConfig("transformer.h.1.output", {0, 1}, model_kwargs={"alpha": 0.1, "penalty": "l1"})
    assert (config.probe_kwargs["alpha"], config.probe_kwargs["penalty"]) == (0.1, "l1")
    assert "alpha=..." in str(fresh_warnings[0].message)
    with pytest.raises(TypeError, match=r"unknown SGDClassifier arguments \['bogus'\]"):
        ProbeConfig("transformer.h.1.output", {0, 1}, model_kwargs={"bogus": 1})


def test_arguments_of_neither_api_are_still_refused():
    with pytest.raises(TypeError, match=r"unknown SGDClassifier arguments \['test_sise'\]; valid ones are"):
        ProbeConfig("transformer.h.1.output", {0, 1}, test_sise=0.5)
    with pytest.raises(ValueError, match="patience must be an integer of at least 1"):
        ProbeConfig("transformer.h.1.output", {0, 1}, patience=0)


def test_per_probe_settings_take_the_place_of_fit_probes_ones(gpt2, toy, tmp_path):
    train, test = toy
    site = "transformer.h.1.output"
    configs = [
        ProbeConfig(site, name="fit's"),
        ProbeConfig(site, name="impatient", patience=1),
        ProbeConfig(site, name="impatient after warmup", patience=1, warmup_steps=5),
        ProbeConfig(site, name="capped", max_steps=3),
    ]
    runner = ProbeRunner(gpt2, configs, progress=False)
    # no evaluation improves by min_delta after the first: only patience decides
    runner.fit_probes(train, test, batch_size=16, num_epochs=1, eval_every=1, patience=1000, min_delta=0.5)
    n_batches = -(-(len(train) - int(np.ceil(len(train) * 0.1))) // 16)
    steps = {name: (p.n_steps_, p.stopped_reason_) for name, p in runner.probes.items()}
    assert steps == {"fit's": (n_batches, StopReason.END_OF_DATA), "impatient": (2, StopReason.PATIENCE),
                     "impatient after warmup": (5, StopReason.PATIENCE), "capped": (3, StopReason.MAX_STEPS)}
    loaded = ProbeRunner.load(runner.save(tmp_path / "probes"))
    assert [p.config for p in loaded.probes.values()] == configs


# ---------------------------------------------------------------- ProbeRunner
def test_get_probe_features_takes_the_original_subset(gpt2, toy):
    train, _ = toy
    configs = [ProbeConfig("transformer.h.1.output"), ProbeConfig("transformer.h.3.output")]
    runner = ProbeRunner(gpt2, configs, progress=False)
    batch = next(train.batches(4))
    every = runner.get_probe_features(batch.input_ids, batch.attention_mask)
    some = runner.get_probe_features(batch.input_ids, batch.attention_mask, ["transformer.h.3.output"])
    assert list(every) == ["transformer.h.1.output", "transformer.h.3.output"]
    assert list(some) == ["transformer.h.3.output"]
    np.testing.assert_array_equal(some["transformer.h.3.output"], every["transformer.h.3.output"])
    assert list(runner.get_probe_features(batch.input_ids, batch.attention_mask, [])) == list(every)
    with pytest.raises(KeyError, match="no probe named 'transformer.h.2.output'"):
        runner.get_probe_features(batch.input_ids, batch.attention_mask, ["transformer.h.2.output"])


# ---------------------------------------------------------------- the README, end to end
def _pooled_by_hand(hf_model, tokenizer, texts, site):
    """Mean-pooled activations of each text alone (no padding), read from the Hugging Face
    module with a plain forward hook (no nnsight): ``transformer.h.2.mlp.output`` is the
    output of ``hf_model.transformer.h[2].mlp`` (the first element of a block's or an
    attention's tuple). Not ``output_hidden_states``: GPT-2's last one is after ``ln_f``."""
    module = hf_model
    for part in site.removesuffix(".output").split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    captured = []
    hook = module.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple)
                                                                             else out))
    try:
        for text in texts:
            with torch.no_grad():
                hf_model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
    finally:
        hook.remove()
    return np.stack([hidden[0].double().mean(0).numpy() for hidden in captured])


def test_pooling_by_hand_reads_the_hidden_states(gpt2):
    """The reference agrees with output_hidden_states where those are block outputs."""
    texts, _ = toy_texts(3, seed=4)
    with torch.no_grad():
        states = [gpt2._module(input_ids=torch.tensor([gpt2.tokenizer(t)["input_ids"]]),
                               output_hidden_states=True).hidden_states for t in texts]
    np.testing.assert_allclose(_pooled_by_hand(gpt2._module, gpt2.tokenizer, texts, "transformer.h.1.output"),
                               [s[2][0].double().mean(0).numpy() for s in states], atol=1e-6)


def test_the_original_readme_runs_unchanged(fresh_warnings):
    import pandas as pd
    from sklearn.metrics import accuracy_score

    # gpt2 = LanguageModel("gpt2", device_map="auto"), here a tiny random GPT-2
    gpt2 = load_model(tiny_model("gpt2", layers=4, hidden=32, seed=0), tokenizer=tiny_tokenizer())
    gpt2.tokenizer.model_max_length = WIDTH
    texts, sentiment = toy_texts(200, seed=3)
    df = pd.DataFrame({"review": texts, "sentiment": np.where(sentiment == 1, "positive", "negative")})

    # ---- the README's code (GPT-2's 12 layers are 4 here) ----
    df["label"] = df["sentiment"].map({"positive": 1, "negative": 0})
    df = df.sample(200, random_state=0)

    reviews, labels = df["review"].tolist(), df["label"].tolist()
    inputs = gpt2.tokenizer(
        reviews, padding="max_length", truncation=True, return_tensors="pt"
    )

    ds = ProbeDataset(
        inputs["input_ids"], inputs["attention_mask"], labels
    )
    train_set, test_set = ds.tt_split(test_size=0.1)

    classes = set(labels)
    submodule = "transformer.h.2.mlp.output"
    config = ProbeConfig(submodule, classes)

    runner = ProbeRunner(gpt2, [config])
    runner.fit_probes(train_set, test_set, batch_size=8)
    print(runner.metrics.to_string())

    docs = test_set[0:5]
    features = runner.get_probe_features(docs["input_ids"], docs["attention_mask"])
    assert features[submodule].shape == (5, 32)

    probe = runner[submodule]
    predictions = probe.predict(features[submodule])

    configs = [
        ProbeConfig("transformer.h.3.output", classes, test_size=0.5, patience=10, warmup_steps=25),
        ProbeConfig("transformer.h.1.mlp.output", classes, test_size=0.5, patience=10, warmup_steps=25),
        ProbeConfig("transformer.h.2.attn.output", classes, test_size=0.5, patience=10, warmup_steps=25),
    ]
    first_metrics = runner.metrics
    runner = ProbeRunner(gpt2, configs)
    runner.fit_probes(train_set, test_set, batch_size=8)
    print(runner.metrics.sort_values(["loss", "matthews"], ascending=[True, False]).to_string())
    # ---- end of the README's code ----

    test_texts = [reviews[i] for i in test_set.example_ids]
    test_labels = [labels[i] for i in test_set.example_ids]
    assert len(test_texts) == 20
    expected = gpt2.tokenizer(test_texts[:5], padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(docs["input_ids"], expected["input_ids"])
    assert torch.equal(docs["attention_mask"], expected["attention_mask"])
    assert docs["labels"].tolist() == test_labels[:5]

    by_hand = _pooled_by_hand(gpt2._module, gpt2.tokenizer, test_texts, submodule)
    np.testing.assert_allclose(features[submodule], by_hand[:5], atol=1e-5)
    np.testing.assert_array_equal(predictions, probe.predict(by_hand[:5]))
    assert set(predictions.tolist()) <= classes

    original_columns = ["loss", "accuracy", "precision", "recall", "f1", "matthews"]
    for metrics, probes in ((first_metrics, [probe]), (runner.metrics, [runner[c.site] for c in configs])):
        assert list(metrics.index) == [p.config.site for p in probes]
        assert set(original_columns) <= set(metrics.columns)
        for p in probes:
            site = p.config.site
            truth = accuracy_score(test_labels, p.predict(_pooled_by_hand(gpt2._module, gpt2.tokenizer,
                                                                          test_texts, site)))
            assert 0 <= metrics.loc[site, "accuracy"] <= 1
            assert metrics.loc[site, "accuracy"] == pytest.approx(truth)
    assert first_metrics.loc[submodule, "accuracy"] > 0.7  # the probe learned the toy sentiment
    assert all(runner[c.site].config.patience == 10 for c in configs)
    assert any("test_size" in str(w.message) for w in fresh_warnings)
