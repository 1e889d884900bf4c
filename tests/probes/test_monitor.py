"""The live monitor (lm_probe.probes.monitor, lm_probe.core.generation): lazy decoding in the
caller's thread, against Hugging Face's own ``generate`` (greedy and sampled), hand-pooled
``output_hidden_states`` and the probes' estimators; other traces between its steps; its
refusals before any forward."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch

from lm_probe import ProbeConfig, ProbeDataset, ProbeRunner, load_model
from lm_probe.testing import tiny_model, tiny_tokenizer, toy_texts

from conftest import count_calls
from test_deploy import FIT, LAYER, NEW, linear_map, trained  # noqa: F401 (trained: the shared fixture)

PROMPT = "the movie was"


def greedy(hf, ids: list[int], n: int, **kwargs) -> list[int]:
    """Hugging Face's own generation: the new ids."""
    ids = torch.tensor([ids])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, pad_token_id=0,
                      **{"do_sample": False, **kwargs})
    return out[0, ids.shape[1]:].tolist()


def test_other_traces_run_between_steps_and_the_generation_goes_on(trained):
    runner, hf, _ = trained
    tok = runner.model.tokenizer
    before = runner.predict_proba(NEW)
    first, second = runner.monitor(PROMPT, max_new_tokens=8), runner.monitor("a bad", max_new_tokens=8)
    steps = [next(first)]
    np.testing.assert_array_equal(runner.predict_proba(NEW).to_numpy(), before.to_numpy())  # mid-generation
    pairs = list(zip(second, first))  # two monitors in step (zip stops at the shorter, taking nothing more)
    steps += [a for _, a in pairs] + list(first)
    assert [s.token_id for s in steps] == greedy(hf, tok(PROMPT)["input_ids"], 8)
    assert pairs and [b.token_id for b, _ in pairs] == greedy(hf, tok("a bad")["input_ids"], 8)[:len(pairs)]


def test_the_monitor_is_lazy_and_leaving_it_stops_the_forwards(trained):
    runner, hf, _ = trained
    calls, handle = count_calls(hf)
    try:
        steps = runner.monitor(PROMPT, max_new_tokens=50)
        assert calls["n"] == 0, "nothing runs before the first step"
        next(steps)
        time.sleep(0.3)  # a consumer that takes its time: no decoding runs ahead
        assert calls["n"] == 2, "the prompt, then the first new token fed back"
        for step in steps:
            if step.step == 2:
                break
        time.sleep(0.3)
        assert calls["n"] == 4, "one forward per step, none after the loop left"
    finally:
        handle.remove()


def test_no_warning_filter_is_left_behind(trained):
    runner, _, _ = trained
    before = list(warnings.filters)
    for _ in runner.monitor(PROMPT, max_new_tokens=12):
        with warnings.catch_warnings():  # the consumer's own code snapshots and restores the filters
            time.sleep(0.01)
    assert list(warnings.filters) == before


def test_sampling_equals_generate_with_the_same_seed_and_a_seed_repeats(trained):
    runner, hf, _ = trained
    ids = runner.model.tokenizer(PROMPT)["input_ids"]
    settings = dict(do_sample=True, temperature=1.7, top_k=20, top_p=0.95)
    torch.manual_seed(3)
    reference = greedy(hf, ids, 10, **settings)
    torch.manual_seed(3)
    assert [s.token_id for s in runner.monitor(PROMPT, max_new_tokens=10, **settings)] == reference
    seeded = [[s.token_id for s in runner.monitor(PROMPT, max_new_tokens=10, seed=5, **settings)] for _ in range(2)]
    assert seeded[0] == seeded[1] and seeded[0] != [s.token_id for s in runner.monitor(PROMPT, max_new_tokens=10)]


def test_refusals_come_before_any_forward(trained):
    runner, hf, _ = trained
    calls, handle = count_calls(hf)
    try:
        for kwargs, message in [(dict(num_beams=2), "num_beams is not supported"),
                                (dict(num_return_sequences=2), "num_return_sequences is not supported"),
                                (dict(assistant_model=hf), "assistant_model is not supported"),
                                (dict(bogus=1), r"does not take \['bogus'\]")]:
            with pytest.raises(ValueError, match=message):
                runner.monitor(PROMPT, max_new_tokens=3, **kwargs)
        with pytest.raises(ValueError, match="prompt's 3 tokens plus max_new_tokens=126 exceed the model's 128"):
            runner.monitor(PROMPT, max_new_tokens=126)
    finally:
        handle.remove()
    assert calls["n"] == 0
    assert len(list(runner.monitor(PROMPT, max_new_tokens=125))) == 125, "the last position is still usable"


def test_a_remote_runner_refuses_to_monitor(trained, tmp_path):
    from lm_probe.probes.persist import SavedProbes

    runner, hf, _ = trained
    runner.save(tmp_path / "run")
    saved = SavedProbes(tmp_path / "run", runner.model)
    remote = saved.restore(ProbeRunner(runner.model, saved.configs, progress=False, remote="local"))
    calls, handle = count_calls(hf)
    try:
        with pytest.raises(ValueError, match="does not run remotely"):
            remote.monitor(PROMPT, max_new_tokens=2)
    finally:
        handle.remove()
    assert calls["n"] == 0


def test_a_multiclass_probe_in_the_monitor_is_its_estimator_on_each_token(gpt2):
    texts, labels = toy_texts(150, n_classes=3, seed=3)
    at = LAYER["gpt2"].format
    data = ProbeDataset.from_texts(texts, labels, tokenizer=gpt2.tokenizer)
    runner = ProbeRunner(gpt2, [ProbeConfig(at(1), name="three", label_names=["neg", "mixed", "pos"])],
                         progress=False).fit_probes(data, **FIT)
    steps = list(runner.monitor(PROMPT, max_new_tokens=5))
    ids = gpt2.tokenizer(PROMPT)["input_ids"] + [s.token_id for s in steps]
    with torch.no_grad():
        states = gpt2._module(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0].double()
    probe = runner["three"]
    expected = probe.estimator_.predict_proba((states.numpy() - probe.mean_) / probe.scale_)[-len(steps):]
    got = np.array([[s.scores[f"three[{c}]"] for c in ("neg", "mixed", "pos")] for s in steps])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def bos_tokenizer():
    """The tiny tokenizer that starts every text with a BOS token (id 2), as Llama's does."""
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 2)])
    return tok


def test_a_bos_adding_tokenizer(llama, toy):
    hf = llama._module
    model = load_model(hf, tokenizer=bos_tokenizer())
    at = LAYER["llama"].format
    runner = ProbeRunner(model, [ProbeConfig(at(1), name="lin")], progress=False).fit_probes(toy[0], **FIT)
    ids = model.tokenizer(PROMPT)["input_ids"]
    assert ids[0] == 2 and len(ids) == 4
    steps = list(runner.monitor(PROMPT, max_new_tokens=6))
    assert [s.token_id for s in steps] == greedy(hf, ids, 6)
    assert [s.position for s in steps] == list(range(4, 4 + len(steps)))
    full = ids + [s.token_id for s in steps]
    with torch.no_grad():
        states = hf(input_ids=torch.tensor([full]), output_hidden_states=True).hidden_states[2][0].double().numpy()
    np.testing.assert_allclose([s.scores["lin"] for s in steps], linear_map(runner["lin"], states)[4:], atol=1e-5)
    prompt_pieces = runner.score_tokens(PROMPT).token.tolist()
    assert "".join(prompt_pieces + [s.token for s in steps]) == model.tokenizer.decode(full)
