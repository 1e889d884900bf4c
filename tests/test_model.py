"""load_model: every way in gives an nnsight model in eval mode with a pad token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnsight import TransformersModel

from lm_probe import ProbeConfig, ProbeRunner, load_model
from lm_probe.testing import tiny_model, tiny_tokenizer


def test_local_folder_like_a_hub_id(tmp_path):
    """The hub-id code path (a string) tested offline with a saved folder."""
    hf, tok = tiny_model("llama", seed=3), tiny_tokenizer()
    hf.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"))
    assert isinstance(model, TransformersModel) and not model._module.training
    assert model.tokenizer.pad_token is not None
    ids = torch.tensor([[5, 6, 7, 8]])
    feats = ProbeRunner(model, [ProbeConfig("model.layers.1.output")], progress=False).get_probe_features(
        ids, torch.ones_like(ids))
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True).hidden_states[2][0].mean(0).numpy()
    np.testing.assert_allclose(feats["model.layers.1.output"][0], ref, atol=1e-5)


def test_hf_model_with_tokenizer_and_nnsight_model_pass_through():
    hf = tiny_model("gpt2").train()
    model = load_model(hf, tokenizer=tiny_tokenizer())
    assert not hf.training and model.tokenizer.pad_token == "<eos>"
    assert load_model(model) is model


def test_unsupported_input():
    with pytest.raises(TypeError, match="hub id, a folder"):
        load_model(42)
