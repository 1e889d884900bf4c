"""load_model: every way in gives an nnsight model in eval mode with a pad token."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from nnsight import TransformersModel

from lm_probe import ProbeConfig, ProbeRunner, load_model
from lm_probe.core.model import model_metadata
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


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map_is_passed_to_the_loader(tmp_path, monkeypatch, device_map):
    """``load_model(folder, device_map=...)`` hands ``device_map`` to transformers' ``from_pretrained``
    (accelerate's placement: here every weight on the CPU, the only device), and the features equal
    transformers' own hidden states."""
    from transformers import PreTrainedModel

    hf, tok = tiny_model("llama", seed=4), tiny_tokenizer()
    hf.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    seen, original = [], PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    model = load_model(str(tmp_path / "m"), device_map=device_map)
    assert seen and set(seen) == {device_map}
    assert {p.device.type for p in model._module.parameters()} == {"cpu"}
    ids = torch.tensor([[5, 6, 7, 8, 9]])
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


def test_model_metadata_reads_the_config(tmp_path):
    """What saved results record about a model: its config's fields, the folder it came from."""
    tiny_model("llama", layers=3, hidden=16).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    assert model_metadata(load_model(str(tmp_path / "m"))) == {
        "name": str(tmp_path / "m"), "model_type": "llama", "num_hidden_layers": 3, "hidden_size": 16}
    built = model_metadata(load_model(tiny_model("gpt2", layers=2, hidden=8), tokenizer=tiny_tokenizer()))
    assert built == {"name": None, "model_type": "gpt2", "num_hidden_layers": 2, "hidden_size": 8}
    assert model_metadata(None) is None and model_metadata(torch.nn.Linear(2, 2)) is None


def test_unsupported_input():
    with pytest.raises(TypeError, match="hub id, a folder"):
        load_model(42)


# ---------------------------------------------------------------- a model built on the meta device
def _saved(folder, seed=3):
    hf, tok = tiny_model("llama", seed=seed), tiny_tokenizer()
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return hf, tok


def _reference(hf, ids):
    with torch.no_grad():
        return hf(input_ids=ids, output_hidden_states=True).hidden_states[2][0].mean(0).numpy()


@pytest.mark.filterwarnings("ignore:LanguageModel is deprecated")
@pytest.mark.parametrize("build", ["TransformersModel", "LanguageModel"])
def test_model_built_on_meta_is_dispatched_before_the_first_batch(tmp_path, logs, build):
    """``TransformersModel(folder)`` / ``LanguageModel(folder, tokenizer=tok)`` load no weights; the
    runner used to read the meta device from it and fail at the first trace ("Cannot copy out of
    meta tensor"). Now its weights are dispatched up front, and the fact is logged."""
    import nnsight

    hf, tok = _saved(tmp_path / "m")
    task = {"task": "text-generation"} if build == "TransformersModel" else {}
    lazy = getattr(nnsight, build)(str(tmp_path / "m"), tokenizer=tok, **task)
    assert not lazy.dispatched
    runner = ProbeRunner(lazy, [ProbeConfig("model.layers.1.output")], progress=False)
    assert lazy.dispatched and any("model.dispatch()" in m for m in logs)
    ids = torch.tensor([[5, 6, 7, 8]])
    feats = runner.get_probe_features(ids, torch.ones_like(ids))
    np.testing.assert_allclose(feats["model.layers.1.output"][0], _reference(hf, ids), atol=1e-5)


def test_load_model_dispatches_a_meta_model_unless_remote(tmp_path):
    _, tok = _saved(tmp_path / "m")
    lazy = TransformersModel(str(tmp_path / "m"), tokenizer=tok, task="text-generation")
    assert not load_model(lazy, remote=True).dispatched, "remote execution keeps the weights on the server"
    model = load_model(lazy)
    assert model.dispatched and not model._module.training
    assert next(model._module.parameters()).device.type != "meta"


def test_weights_left_on_meta_are_refused_with_the_fix():
    """A module built on meta and wrapped as it is has nothing to dispatch: refused before any batch."""
    from nnsight import NNsight

    with torch.device("meta"):
        hf = tiny_model("llama", layers=2)
    model = NNsight(hf)
    with pytest.raises(ValueError, match=r"weights are on the meta device .* dispatch=True"):
        ProbeRunner(model, [ProbeConfig("model.layers.1.output")], progress=False)
    with pytest.raises(ValueError, match="meta device"):
        load_model(model)


# ---------------------------------------------------------------- names that load nothing, offline
@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, as huggingface_hub sees it (it reads the variable once, at import)."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _fails_fast(name, match):
    from lm_probe.core.model import ModelNotFoundError

    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match=match) as err:
        load_model(name)
    assert time.perf_counter() - start < 3, "no hub retries"
    return str(err.value)


def test_a_typo_of_an_embedded_name_suggests_it_at_once(offline):
    message = _fails_fast("smollm2-135", r"did you mean the embedded model 'smollm2-135m'\?")
    assert "local folder" in message
    _fails_fast("SmolLM2-135M", "'smollm2-135m'")


def test_an_unknown_hub_id_offline_names_what_works(offline, tmp_path):
    message = _fails_fast("some-org/no-such-model", r"hub is off \(HF_HUB_OFFLINE=1\)")
    assert "'smollm2-135m'" in message and "local folder" in message
    _fails_fast(str(tmp_path / "no_such_folder"), "there is no folder")
    _saved(tmp_path / "m")
    assert load_model(str(tmp_path / "m")).tokenizer is not None, "a folder loads offline"


def test_an_unreachable_hub_fails_fast(monkeypatch):
    """Without HF_HUB_OFFLINE, one quick request decides (a closed local port: refused at once)."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    message = _fails_fast("some-org/no-such-model", r"hub \(http://127.0.0.1:9\) cannot be reached")
    assert "'smollm2-135m'" in message


def test_a_hub_id_offline_loads_its_cached_copy(offline, monkeypatch, tmp_path):
    """Real users keep the hub path: offline, a hub id in the local cache loads from it."""
    import huggingface_hub

    cache = tmp_path / "hub"
    repo = cache / "models--some-org--tiny"
    _saved(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    start = time.perf_counter()
    model = load_model("some-org/tiny")
    assert model._module.config.num_hidden_layers == 4 and time.perf_counter() - start < 10
