"""CircuitProbe: the soft nearest neighbour loss against a slow float64 loop, and the planted
neuron found and ablated by the contrastive objective alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lm_probe.circuits import CircuitProbe, ablate, soft_nearest_neighbour_loss

from planted import MLP, NEURON, SITE, planted_data, planted_model, planted_tokens
from test_targets import identical, snapshot


def slow_snn(x: np.ndarray, y: np.ndarray, t: float) -> float:
    terms = []
    for i in range(len(x)):
        num = sum(math.exp(-np.sum((x[i] - x[j]) ** 2) / t) for j in range(len(x)) if j != i and y[j] == y[i])
        den = sum(math.exp(-np.sum((x[i] - x[k]) ** 2) / t) for k in range(len(x)) if k != i)
        if any(y[j] == y[i] for j in range(len(x)) if j != i):
            terms.append(-math.log(num / den))
    return float(np.mean(terms)) if terms else 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_the_soft_nearest_neighbour_loss_matches_a_slow_loop(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(9, 4)), np.array([0, 0, 1, 1, 1, 2, 0, 1, 3])  # class 3 has no partner
    got = soft_nearest_neighbour_loss(torch.tensor(x), torch.tensor(y), 2.5).item()
    assert got == pytest.approx(slow_snn(x, y, 2.5), rel=1e-10)
    assert soft_nearest_neighbour_loss(torch.tensor(x[:3]), torch.tensor([0, 1, 2]), 1.0).item() == 0.0


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    train, val = planted_data(240).tt_split(0.3, seed=0)
    before = snapshot(model)
    probe = CircuitProbe(model, SITE, masked=[MLP], l0_lambda=1.0, epochs=10).fit(train, val)
    return model, train, val, probe, before


def test_the_circuit_is_the_planted_neuron(planted):
    model, _, val, probe, before = planted
    assert probe.mask_[f"{MLP}.c_fc"][0, NEURON] and probe.mask_[f"{MLP}.c_proj"][NEURON].any()
    assert probe.kept_fraction_ < 0.02
    assert probe.metrics_["accuracy"] >= 0.95
    assert probe.centroids_.shape == (2, 32)
    assert identical(model, before)


def test_ablating_the_circuit_drops_the_readout_to_chance(planted):
    model, _, val, probe, _ = planted
    chance = max(np.mean(val.labels), 1 - np.mean(val.labels))
    with ablate(model, probe.mask_):
        assert probe.score(val, use_mask=False)["accuracy"] <= chance + 0.05
    with ablate(model, probe.mask_, complement=True):
        assert probe.score(val, use_mask=False)["accuracy"] >= 0.95


def test_a_saved_circuit_probe_loads_with_its_centroids(planted, tmp_path):
    model, _, val, probe, _ = planted
    loaded = CircuitProbe.load(probe.save(tmp_path / "c"), model)
    np.testing.assert_array_equal(loaded.centroids_.numpy(), probe.centroids_.numpy())
    np.testing.assert_array_equal(loaded.predict_proba(val)[0], probe.predict_proba(val)[0])


def test_a_circuit_probe_needs_something_to_mask(planted):
    with pytest.raises(ValueError, match="give masked modules"):
        CircuitProbe(planted[0], SITE, masked=[])


def test_token_level_labels_find_the_same_circuit():
    """Token labels (pool="none"): every labeled token's row clusters by its label."""
    model = planted_model()
    train, val = planted_tokens(160).tt_split(0.3, seed=0)
    probe = CircuitProbe(model, SITE, masked=[MLP], epochs=10, mask_init=1.0).fit(train, val)
    assert probe.mask_[f"{MLP}.c_fc"][0, NEURON] and probe.mask_[f"{MLP}.c_proj"][NEURON].any()
    assert probe.kept_fraction_ < 0.05 and probe.metrics_["accuracy"] >= 0.95
    assert sum(probe.metrics_["support"].values()) == sum((t != -100).sum() for t in val.token_labels)
