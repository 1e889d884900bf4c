"""Pooling functions against numpy, and padded batches against unpadded runs."""

import numpy as np
import pytest
import torch

from lm_probe import ProbeConfig, ProbeDataset, ProbeRunner
from lm_probe.core.pooling import pool

POOLS = ["mean", "last", "first", "max"]


def numpy_pool(h: np.ndarray, m: np.ndarray, how: str) -> np.ndarray:
    out = []
    for row, keep in zip(h.astype(np.float64), m.astype(bool)):
        real = row[keep]
        out.append({"mean": real.mean(0), "last": real[-1], "first": real[0], "max": real.max(0)}[how])
    return np.stack(out)


@pytest.mark.parametrize("how", POOLS)
def test_pool_matches_numpy_with_nan_in_padding(how):
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 6, 5)).astype(np.float32)
    m = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    h[m == 0] = np.nan  # some kernels leave NaN in padding rows: it must not leak
    got = pool(torch.from_numpy(h), torch.from_numpy(m), how).numpy()
    np.testing.assert_allclose(got, numpy_pool(h, m, how), rtol=1e-6)


def test_pool_none_keeps_real_tokens_in_order():
    h = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)
    m = torch.tensor([[0, 1, 1], [1, 0, 0]])
    assert pool(h, m, "none")[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_pool_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown pool 'avg'"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "avg")
    with pytest.raises(ValueError, match=r"\(batch, tokens, hidden\)"):
        pool(torch.zeros(2, 3), torch.ones(2, 3), "mean")


SITES = ["model.layers.0.output", "model.layers.2.output", "model.layers.1.mlp.output"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_example_alone(any_model, side):
    """Pooled activations of a padded batch equal each example run alone, unpadded."""
    blocks = "transformer.h" if any_model._module.config.model_type == "gpt2" else "model.layers"
    sites = [s.replace("model.layers", blocks) for s in SITES]
    configs = [ProbeConfig(s, pool=p, name=f"{s}/{p}") for s in sites for p in POOLS]
    runner = ProbeRunner(any_model, configs, progress=False)
    rng = np.random.default_rng(0)
    lengths = [3, 9, 5, 1, 7]
    rows = [rng.integers(3, 50, size=n) for n in lengths]
    data = ProbeDataset(rows, [0, 1, 0, 1, 0], pad_token_id=2, padding_side=side)
    batch = next(data.batches(len(rows)))
    assert batch.attention_mask.sum(1).tolist() == lengths
    padded = runner.get_probe_features(batch.input_ids, batch.attention_mask)
    for k, row in enumerate(rows):
        alone = runner.get_probe_features(torch.from_numpy(row)[None], torch.ones(1, len(row), dtype=torch.long))
        for name in padded:
            np.testing.assert_allclose(padded[name][k], alone[name][0], atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("side", ["left", "right"])
def test_block_outputs_match_hf_hidden_states(any_model, side):
    """Block outputs, pooled by us from a padded batch, equal HF ``output_hidden_states`` of each example alone."""
    hf = any_model._module
    blocks = "transformer.h" if hf.config.model_type == "gpt2" else "model.layers"
    n_layers = hf.config.num_hidden_layers
    # the last entry of hidden_states has the final norm applied, so compare blocks 0 .. L-2
    configs = [ProbeConfig(f"{blocks}.{i}.output", pool=p, name=f"{i}/{p}") for i in range(n_layers - 1) for p in POOLS]
    runner = ProbeRunner(any_model, configs, progress=False)
    rng = np.random.default_rng(1)
    rows = [rng.integers(3, 50, size=n) for n in (6, 2, 8)]
    batch = next(ProbeDataset(rows, [0, 1, 0], pad_token_id=2, padding_side=side).batches(3))
    ours = runner.get_probe_features(batch.input_ids, batch.attention_mask)
    for k, row in enumerate(rows):
        with torch.no_grad():
            states = hf(input_ids=torch.from_numpy(row)[None], output_hidden_states=True).hidden_states
        for i in range(n_layers - 1):
            h = states[i + 1].numpy()
            for p in POOLS:
                ref = numpy_pool(h, np.ones((1, len(row))), p)[0]
                np.testing.assert_allclose(ours[f"{i}/{p}"][k], ref, atol=1e-4, rtol=1e-4)
