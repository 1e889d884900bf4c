"""The README's "Using it" snippet runs as written (issue 15), on a tiny random model in place
of the embedded one, and its features are the model's hidden states pooled by hand."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

import lm_probe
from lm_probe.testing import tiny_model, tiny_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet() -> str:
    text = README.read_text()
    return re.search(r"## Using it\n\n```python\n(.+?)\n```", text, re.S).group(1)


def test_the_using_it_snippet_runs_as_written(monkeypatch):
    hf = tiny_model("llama", layers=16, hidden=32, seed=0)
    model = lm_probe.load_model(hf, tokenizer=tiny_tokenizer())
    asked = []
    monkeypatch.setattr(lm_probe, "load_model", lambda name, **kw: asked.append(name) or model)
    namespace: dict = {}
    exec(compile(snippet(), str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    assert asked == ["smollm2-135m"]
    runner, feats = namespace["runner"], namespace["feats"]
    assert list(runner.metrics.index) == ["model.layers.3.output", "model.layers.9.output", "model.layers.15.output",
                                          "model.layers[-1].mlp.output"]
    assert runner.metrics["accuracy"].between(0, 1).all() and len(namespace["test"]) == 80
    # features: the hidden states after block 9, mean over the real tokens, from a plain forward
    ids, mask = namespace["input_ids"], namespace["attention_mask"]
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[10].double()
    m = mask[..., None].double()
    expected = ((hidden * m).sum(1) / m.sum(1)).numpy()
    np.testing.assert_allclose(feats["model.layers.9.output"], expected, rtol=1e-4, atol=1e-5)
    assert feats["model.layers.9.output"].shape == (5, 32)
