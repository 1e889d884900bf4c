"""The mask relaxations against their formulas, written out in numpy float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lm_probe.circuits.masks import (BETA, GAMMA, ZETA, FixedMask, HardConcrete, Sparsification,
                                     hard_concrete_gate, hard_concrete_l0, hard_concrete_sample)

LOG_ALPHA = np.linspace(-6, 6, 25)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_the_l0_penalty_is_the_probability_of_a_non_zero_gate():
    expected = sigmoid(LOG_ALPHA - BETA * np.log(-GAMMA / ZETA))
    got = hard_concrete_l0(torch.tensor(LOG_ALPHA)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    draws = hard_concrete_sample(torch.tensor(LOG_ALPHA).repeat(40000, 1), torch.Generator().manual_seed(0))
    np.testing.assert_allclose((draws > 0).double().mean(0).numpy(), expected, atol=0.01)  # Monte Carlo


def test_a_sample_is_the_stretched_and_clamped_concrete_of_its_noise():
    u = torch.rand(LOG_ALPHA.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).numpy()
    u = np.clip(u, 1e-6, 1 - 1e-6)
    expected = np.clip(sigmoid((np.log(u) - np.log(1 - u) + LOG_ALPHA) / BETA) * (ZETA - GAMMA) + GAMMA, 0, 1)
    got = hard_concrete_sample(torch.tensor(LOG_ALPHA), torch.Generator().manual_seed(3)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_the_deterministic_gate_and_a_fresh_mask_keep_everything():
    expected = np.clip(sigmoid(LOG_ALPHA) * (ZETA - GAMMA) + GAMMA, 0, 1)
    np.testing.assert_allclose(hard_concrete_gate(torch.tensor(LOG_ALPHA)).numpy(), expected, rtol=1e-12)
    weight = torch.randn(4, 3)
    for mask in (HardConcrete(weight.shape), Sparsification(weight.shape)):
        assert mask.keep().all()
        assert torch.equal(mask.eval()(weight), weight)


def test_hard_concrete_draws_in_training_and_is_binary_in_eval():
    mask, weight = HardConcrete(torch.Size([50, 50])), torch.ones(50, 50)
    with torch.no_grad():
        mask.logits.normal_(0, 3)
    keep = (np.clip(sigmoid(mask.logits.detach().numpy()) * 1.2 - 0.1, 0, 1) > 0.5)
    assert np.array_equal(mask.eval()(weight).detach().numpy(), keep.astype(np.float32))
    drawn = mask.train()(weight)
    assert ((drawn > 0) & (drawn < 1)).any() and not torch.equal(drawn, mask(weight))
    assert mask.penalty().item() == pytest.approx(hard_concrete_l0(mask.logits).sum().item())


def test_continuous_sparsification_follows_its_temperature():
    mask, weight = Sparsification(torch.Size([6, 5])), torch.randn(6, 5, dtype=torch.float64)
    with torch.no_grad():
        mask.logits.copy_(torch.linspace(-1, 1, 30).reshape(6, 5))
    s = mask.logits.detach().double().numpy()
    for temperature in (1.0, 10.0, 200.0):
        mask.temperature = temperature
        np.testing.assert_allclose(mask.train()(weight).detach().numpy(), weight.numpy() * sigmoid(temperature * s),
                                   rtol=1e-6, atol=1e-7)  # the mask is float32
        assert mask.penalty().item() == pytest.approx(sigmoid(temperature * s).sum(), rel=1e-6)
    np.testing.assert_array_equal(mask.eval()(weight).detach().numpy(), weight.numpy() * (s > 0))


def test_a_fixed_mask_zeroes_exactly_the_false_entries():
    weight = torch.randn(3, 4)
    keep = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    np.testing.assert_array_equal(FixedMask(keep)(weight).numpy(), np.where(keep.numpy(), weight.numpy(), 0))
