"""Deployed probes (lm_probe.probes.deploy): predict, predict_proba, score_tokens and the
live monitor, each against an independent reference (Hugging Face ``output_hidden_states``
of each text run alone, pooled by hand, then the probe's own estimator or its linear map in
float64 numpy; Hugging Face's greedy ``generate``)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import expit

from lm_probe import ProbeConfig, ProbeDataset, ProbeRunner, load_model
from lm_probe.probes.deploy import MonitorStep
from lm_probe.probes.probe import ProbeNotFittedError
from lm_probe.testing import POSITIVE, tiny_model, tiny_tokenizer, toy_texts

from conftest import count_calls

FIT = dict(batch_size=16, eval_every=5, patience=3, num_epochs=2)
NEW = ["good great fun movie", "a bad awful boring and dull ending", "the story", "charming actress and superb music"]
LAYER = {"gpt2": "transformer.h.{}.output", "llama": "model.layers.{}.output"}


def configs(family: str) -> list[ProbeConfig]:
    at = LAYER[family].format
    return [ProbeConfig(at(1), name="lin", label_names=["neg", "pos"], control=True),
            ProbeConfig(at(2), name="last", pool="last"),
            ProbeConfig(at(0), name="soft", pool="max", head="softmax"),
            ProbeConfig(at(2), name="mlp", head="mlp", hidden_size=8)]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def trained(request, toy):
    """A runner of each family with four probes (layers 0-2: below the final norm that
    Hugging Face folds into the last hidden state), trained on the toy set."""
    hf = tiny_model(request.param, layers=4, hidden=32, seed=0)
    model = load_model(hf, tokenizer=tiny_tokenizer())
    runner = ProbeRunner(model, configs(request.param), progress=False).fit_probes(toy[0], **FIT)
    return runner, hf, request.param


def hidden_states(hf, text: str, tokenizer) -> tuple[np.ndarray, list[np.ndarray]]:
    """One text alone (no padding): its ids and every layer's ``(tokens, hidden)`` float64 states."""
    ids = tokenizer(text)["input_ids"]
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return np.asarray(ids), [h[0].double().numpy() for h in out.hidden_states]


def pooled_by_hand(states: np.ndarray, pool: str) -> np.ndarray:
    return {"mean": states.mean(0), "last": states[-1], "max": states.max(0), "first": states[0]}[pool]


def layer_of(probe) -> int:
    return int(probe.config.site.split(".")[-2])


def linear_map(probe, X: np.ndarray) -> np.ndarray:
    """P(classes_[1]) of a binary linear probe, in float64 numpy."""
    z = (X - probe.mean_) / probe.scale_ @ probe.coef_[0].astype(np.float64) + probe.intercept_[0]
    return expit(z)


def test_predict_and_predict_proba_equal_the_hand_pooled_reference_in_one_forward(trained):
    runner, hf, _ = trained
    tok = runner.model.tokenizer
    calls, handle = count_calls(hf)
    try:
        proba = runner.predict_proba(NEW, batch_size=8)
        assert calls["n"] == 1, "one trace for the batch, for all four probes"
    finally:
        handle.remove()
    predicted = runner.predict(NEW)
    assert list(proba.columns.get_level_values("probe").unique()) == ["lin", "last", "soft", "mlp"]
    assert list(proba["lin"].columns) == ["neg", "pos"] and list(proba["mlp"].columns) == [0, 1]
    assert list(predicted.columns) == ["lin", "last", "soft", "mlp"] and predicted.index.name == "text"
    states = [hidden_states(hf, text, tok)[1] for text in NEW]
    for name in ("lin", "last", "soft", "mlp"):
        probe = runner[name]
        X = np.stack([pooled_by_hand(s[layer_of(probe) + 1], probe.config.pool) for s in states])
        expected = probe.estimator_.predict_proba((X - probe.mean_) / probe.scale_)
        np.testing.assert_allclose(proba[name].to_numpy(), expected, atol=1e-5)
        names = probe.config.label_names or [0, 1]
        assert predicted[name].tolist() == [names[k] for k in expected.argmax(1)]
    np.testing.assert_allclose(proba[("lin", "pos")], linear_map(runner["lin"], np.stack(
        [s[2].mean(0) for s in states])), atol=1e-5)


def test_control_twins_are_left_out_unless_asked(trained):
    runner, hf, _ = trained
    assert "lin [control]" not in runner.predict(NEW[:1]).columns
    both = runner.predict_proba(NEW[:2], include_control=True)
    assert "lin [control]" in both.columns.get_level_values("probe")
    only = runner.predict_proba(NEW[:2], ["lin [control]"])
    twin = runner["lin [control]"]
    X = np.stack([hidden_states(hf, t, runner.model.tokenizer)[1][2].mean(0) for t in NEW[:2]])  # layer 1, mean
    expected = twin.estimator_.predict_proba((X - twin.mean_) / twin.scale_)
    np.testing.assert_allclose(only.to_numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(both["lin [control]"].to_numpy(), expected, atol=1e-5)
    assert not np.allclose(expected, runner.predict_proba(NEW[:2], "lin").to_numpy(), atol=1e-3), "the twin's own"


@pytest.mark.parametrize("side", ["left", "right"])
def test_score_tokens_is_the_linear_map_on_every_real_token(trained, side, monkeypatch):
    runner, hf, _ = trained
    tok = runner.model.tokenizer
    monkeypatch.setattr(tok, "padding_side", side)
    texts = NEW + ["the", "a film that feels very moving and lovely but too long for its story"]
    frame = runner.score_tokens(texts, ["lin", "last"], batch_size=3)  # batches mix lengths: padding
    assert list(frame.columns) == ["text", "position", "token", "token_id", "lin", "last"]
    refs = [hidden_states(hf, text, tok) for text in texts]
    assert len(frame) == sum(len(ids) for ids, _ in refs), "padding is never scored"
    for k, (ids, states) in enumerate(refs):
        rows = frame[frame.text == k]
        assert rows.position.tolist() == list(range(len(ids))) and rows.token_id.tolist() == ids.tolist()
        assert "".join(rows.token) == tok.decode(ids.tolist()), "a text's token pieces join back to its text"
        for name in ("lin", "last"):
            probe = runner[name]
            np.testing.assert_allclose(rows[name], linear_map(probe, states[layer_of(probe) + 1]), atol=1e-5)


def test_score_tokens_of_an_mlp_head_runs_its_whole_network_per_token(trained):
    runner, hf, _ = trained
    frame = runner.score_tokens(NEW[:2], "mlp")
    probe = runner["mlp"]
    states = np.concatenate([hidden_states(hf, t, runner.model.tokenizer)[1][3] for t in NEW[:2]])
    np.testing.assert_allclose(frame["mlp"], probe.estimator_.predict_proba((states - probe.mean_) / probe.scale_)[:, 1],
                               atol=1e-5)


def test_monitor_yields_the_greedy_generation_with_each_tokens_scores(trained):
    runner, hf, _ = trained
    tok = runner.model.tokenizer
    prompt = "the movie was"
    ids = torch.tensor([tok(prompt)["input_ids"]])
    reference = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                            pad_token_id=tok.pad_token_id)[0].tolist()
    steps = list(runner.monitor(prompt, max_new_tokens=6))
    assert all(isinstance(s, MonitorStep) for s in steps)
    assert [s.token_id for s in steps] == reference[ids.shape[1]:]
    assert [s.position for s in steps] == list(range(ids.shape[1], len(reference)))
    assert [s.step for s in steps] == list(range(len(steps)))
    with torch.no_grad():
        full = [h[0].double().numpy() for h in hf(input_ids=torch.tensor([reference]),
                                                 output_hidden_states=True).hidden_states]
    for name in ("lin", "last"):
        probe = runner[name]
        expected = linear_map(probe, full[layer_of(probe) + 1])[ids.shape[1]:]
        np.testing.assert_allclose([s.scores[name] for s in steps], expected, atol=1e-5)
    assert set(steps[0].scores) == {"lin", "last", "soft", "mlp"}
    assert tok(tok.decode(reference))["input_ids"] == reference, "the text re-tokenizes to the same ids"
    tokens = runner.score_tokens(tok.decode(reference))
    for name in steps[0].scores:
        np.testing.assert_allclose([s.scores[name] for s in steps], tokens[name][ids.shape[1]:], atol=1e-5)


def test_monitor_stops_when_the_loop_does_and_at_the_end_of_sequence(trained, tmp_path):
    runner, hf, family = trained
    calls, handle = count_calls(hf)
    try:
        for step in runner.monitor("the movie was", max_new_tokens=50):
            if step.step == 1:
                break
        time.sleep(0.2)
    finally:
        handle.remove()
    assert calls["n"] == 3, "the prompt and the two tokens fed back: no forward after the loop left"
    if family != "llama":
        return
    runner.save(tmp_path / "run")  # the same probes on another llama, whose first new token is the EOS
    other = tiny_model("llama", layers=4, hidden=32, seed=2)
    back = ProbeRunner.load(tmp_path / "run", model=load_model(other, tokenizer=tiny_tokenizer()))
    prompt = "a story with brilliant music and"
    steps = list(back.monitor(prompt, max_new_tokens=8))
    assert [s.token_id for s in steps] == [2] and steps[0].token == " <eos>"
    full = back.score_tokens(prompt + " <eos>")
    assert full.token_id.iloc[-1] == 2
    assert steps[0].scores["lin"] == pytest.approx(full["lin"].iloc[-1], abs=1e-5)


def test_a_loaded_runner_predicts_the_same_without_any_data(trained, tmp_path):
    runner, hf, _ = trained
    runner.save(tmp_path / "run")
    fresh = ProbeRunner.load(tmp_path / "run", model=load_model(hf, tokenizer=tiny_tokenizer()))
    pd.testing.assert_frame_equal(fresh.predict_proba(NEW), runner.predict_proba(NEW))
    pd.testing.assert_frame_equal(fresh.predict(NEW), runner.predict(NEW))
    pd.testing.assert_frame_equal(fresh.score_tokens(NEW), runner.score_tokens(NEW))
    assert [s.scores for s in fresh.monitor("the", max_new_tokens=3)] == \
        [s.scores for s in runner.monitor("the", max_new_tokens=3)]


def test_multiclass_and_regression_probes(gpt2):
    texts, labels = toy_texts(150, n_classes=3, seed=3)
    share = np.array([sum(w in POSITIVE for w in t.split()) / len(t.split()) for t in texts])
    at = LAYER["gpt2"].format
    three = ProbeDataset.from_texts(texts, labels, tokenizer=gpt2.tokenizer)
    runner = ProbeRunner(gpt2, [ProbeConfig(at(1), name="three", label_names=["neg", "mixed", "pos"])],
                         progress=False).fit_probes(three, **FIT)
    reg = ProbeRunner(gpt2, [ProbeConfig(at(1), name="share", task="regression")], progress=False)
    reg.fit_probes(ProbeDataset.from_texts(texts, share, tokenizer=gpt2.tokenizer), **FIT)
    frame = runner.score_tokens(NEW[:2])
    assert list(frame.columns[4:]) == ["three[neg]", "three[mixed]", "three[pos]"]
    probe, names = runner["three"], ["neg", "mixed", "pos"]
    states = [hidden_states(gpt2._module, t, gpt2.tokenizer)[1][2] for t in NEW]  # layer 1's output
    per_token = probe.estimator_.predict_proba((np.concatenate(states[:2]) - probe.mean_) / probe.scale_)
    np.testing.assert_allclose(frame.iloc[:, 4:].to_numpy(), per_token, atol=1e-5)
    X = np.stack([s.mean(0) for s in states])
    expected = probe.estimator_.predict_proba((X - probe.mean_) / probe.scale_)
    np.testing.assert_allclose(runner.predict_proba(NEW)["three"][names].to_numpy(), expected, atol=1e-5)
    assert runner.predict(NEW).three.tolist() == [names[k] for k in expected.argmax(1)]
    np.testing.assert_allclose(reg.predict(NEW).share, reg["share"].estimator_.predict(
        (X - reg["share"].mean_) / reg["share"].scale_), atol=1e-5)
    with pytest.raises(ValueError, match="'share' is a regression probe: use predict"):
        reg.predict_proba(NEW, "share")
    with pytest.raises(ValueError, match="no probe of this runner gives predict_proba"):
        reg.predict_proba(NEW)


def test_refusals_come_before_any_forward(gpt2, trained, tmp_path):
    at = LAYER["gpt2"].format
    untrained = ProbeRunner(gpt2, [ProbeConfig(at(1), name="p"), ProbeConfig(at(1), name="tok", pool="none")],
                            progress=False)
    runner, hf, _ = trained
    calls, handle = count_calls(gpt2._module)
    trained_calls, trained_handle = count_calls(hf)
    try:
        with pytest.raises(ProbeNotFittedError, match="not fitted yet.*ProbeRunner.load"):
            untrained.predict(NEW)
        with pytest.raises(ProbeNotFittedError):
            next(iter(untrained.monitor("the", max_new_tokens=2)))
        with pytest.raises(ValueError, match="'tok' is token-level .*use score_tokens"):
            untrained.predict(NEW, ["tok"])
        with pytest.raises(ValueError, match="no texts given"):
            runner.predict([])
        with pytest.raises(KeyError, match="no probe named 'nope'; probes are"):
            runner.score_tokens(NEW, ["lin", "nope"])
        with pytest.raises(ValueError, match="max_new_tokens must be a positive"):
            runner.monitor("the", max_new_tokens=0)
        with pytest.raises(ValueError, match="prompt must be a non-empty string"):
            runner.monitor("", max_new_tokens=2)
        runner.save(tmp_path / "run")
        with pytest.raises(ValueError, match="no model .*ProbeRunner.load\\(path, model="):
            ProbeRunner.load(tmp_path / "run").predict(NEW)
    finally:
        handle.remove()
        trained_handle.remove()
    assert calls["n"] == trained_calls["n"] == 0


def test_max_length_defaults_to_the_models_positions_and_a_larger_one_is_refused(trained, logs):
    runner, hf, family = trained
    tok = runner.model.tokenizer
    long = " ".join(["good great fun movie"] * 40)  # 160 tokens, past the 128 positions
    calls, handle = count_calls(hf)
    try:
        with pytest.raises(ValueError, match="max_length=200 is more than the model's 128 positions"):
            runner.predict([long], max_length=200)
    finally:
        handle.remove()
    assert calls["n"] == 0
    proba = runner.predict_proba(pd.Series([long, "the story"], index=["a", "b"]), "lin")
    assert any("1 of 2 texts are longer than max_length=128" in m for m in logs)
    assert list(proba.index) == ["a", "b"], "a Series keeps its index"
    ids = tok(long)["input_ids"][:128]
    with torch.no_grad():
        states = hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0].double().numpy()
    np.testing.assert_allclose(proba.loc["a", ("lin", "pos")], linear_map(runner["lin"], states.mean(0)[None])[0],
                               atol=1e-5)
    assert len(runner.score_tokens(long, "lin")) == 128


def test_score_tokens_scores_each_batch_as_it_is_read(trained, monkeypatch):
    import lm_probe.probes.deploy as deploy

    runner, _, _ = trained
    sizes = []
    real = deploy.token_scores
    monkeypatch.setattr(deploy, "token_scores", lambda probe, X: sizes.append(len(X)) or real(probe, X))
    texts = NEW * 3
    frame = runner.score_tokens(texts, "lin", batch_size=2)
    assert len(sizes) == 6 and sum(sizes) == len(frame), "one scoring per batch of two texts"
    assert max(sizes) <= 2 * max(len(runner.model.tokenizer(t)["input_ids"]) for t in texts)


def test_probe_names_that_clash_with_columns_are_refused(gpt2, toy):
    at = LAYER["gpt2"].format
    for names, message in [(["token"], "'token' clashes with score_tokens' own columns"),
                           (["three", "three[b]"], "'three\\[b\\]' clashes with probe 'three'")]:
        configs = [ProbeConfig(at(1), name=n, **({"classes": [0, 1, 2], "label_names": ["a", "b", "c"]}
                                                  if n == "three" else {})) for n in names]
        runner = ProbeRunner(gpt2, configs, progress=False)
        for probe in runner.probes.values():  # "trained" as far as the column names go
            probe.classes_ = np.array([0, 1, 2] if probe.config.name == "three" else [0, 1])
            probe._check_fitted = lambda: None
        calls, handle = count_calls(gpt2._module)
        try:
            with pytest.raises(ValueError, match=message):
                runner.score_tokens(NEW)
        finally:
            handle.remove()
        assert calls["n"] == 0


def test_class_name_labels_come_back_as_names_and_are_saved(gpt2, tmp_path):
    texts, labels = toy_texts(120, seed=0)
    data = ProbeDataset.from_texts(texts, list(np.array(["neg", "pos"])[labels]), tokenizer=gpt2.tokenizer)
    runner = ProbeRunner(gpt2, [ProbeConfig(LAYER["gpt2"].format(1), name="p")], progress=False).fit_probes(data, **FIT)
    probe = runner["p"]
    X = runner.pooled(ProbeDataset.from_texts(NEW, [0] * 4, tokenizer=gpt2.tokenizer))[(probe.config.site, "mean")]
    expected = [["neg", "pos"][k] for k in probe.predict(X)]
    assert runner.predict(NEW).p.tolist() == expected
    assert list(runner.predict_proba(NEW)["p"].columns) == ["neg", "pos"]
    runner.save(tmp_path / "run")
    assert ProbeRunner.load(tmp_path / "run", model=gpt2).predict(NEW).p.tolist() == expected


def test_label_names_that_miss_a_class_are_refused_before_any_forward(gpt2):
    texts, labels = toy_texts(60, n_classes=3, seed=3)
    data = ProbeDataset.from_texts(texts, labels + 5, tokenizer=gpt2.tokenizer)  # labels 5, 6, 7
    runner = ProbeRunner(gpt2, [ProbeConfig(LAYER["gpt2"].format(1), name="p", label_names=["a", "b", "c"])],
                         progress=False)
    calls, handle = count_calls(gpt2._module)
    try:
        with pytest.raises(ValueError, match=r"label_names \['a', 'b', 'c'\] name labels 0..2 but its classes are "
                                             r"\[5, 6, 7\]"):
            runner.fit_probes(data, **FIT)
    finally:
        handle.remove()
    assert calls["n"] == 0
