"""Weight masks: the relaxations that make "keep this weight or not" trainable.

A binary mask over a weight matrix cannot be learned by gradient descent as it is, so both
methods learn one real number per weight and turn it into a mask that is differentiable
during training and binary at the end:

* **Hard concrete** (Louizos, Welling and Kingma 2018, used by Cao, Sanh and Rush 2021):
  a logit ``log_alpha`` per weight. Training draws ``u ~ U(0, 1)``, ``s = sigmoid((log u -
  log(1 - u) + log_alpha) / beta)``, stretches it to ``(gamma, zeta)`` and clamps it to
  ``[0, 1]``, so the mask is exactly 0 or 1 with positive probability. The expected number
  of non-zero gates, the L0 penalty, is ``sigmoid(log_alpha - beta log(-gamma / zeta))`` per
  weight. The deterministic mask keeps a weight where ``clamp(sigmoid(log_alpha) (zeta -
  gamma) + gamma, 0, 1) > 0.5``. ``beta = 2/3``, ``gamma = -0.1``, ``zeta = 1.1``.
* **Continuous sparsification** (Savarese, Silva and Maire 2020): a score ``s`` per weight
  and the mask ``sigmoid(temperature * s)``; the temperature is raised during training
  (the fitting loop sets it), so the mask hardens towards the step function, and the final
  mask keeps a weight where ``s > 0``. The penalty is the mask's sum (its L1 norm, which
  equals its L0 norm once it is binary).

The math is pure functions of tensors; :class:`HardConcrete`, :class:`Sparsification`
and :class:`FixedMask` are ``torch.nn.utils.parametrize`` parametrizations (``weight ->
weight * mask``) holding the learned numbers, so the base weight is never written to.
Masks start with every weight kept.
"""

from __future__ import annotations

import math

import torch

__all__ = ["BETA", "GAMMA", "ZETA", "hard_concrete_sample", "hard_concrete_gate", "hard_concrete_l0",
           "HardConcrete", "Sparsification", "FixedMask", "METHODS"]

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
#: Initial logit of a hard-concrete gate: kept (deterministic gate 0.96), a stochastic gate of
#: exactly 1 with probability 0.6 and non-zero with probability 0.97, so training starts near the
#: intact model (at 1, gates were exactly 1 a third of the time, which put SmolLM2's block 6 at
#: chance), and close enough to 0 that an unneeded weight is dropped within tens of steps.
HARD_CONCRETE_INIT = 2.0
#: Initial score of a continuous-sparsification mask: kept (score > 0); sigmoid(1) = 0.73 at
#: temperature 1, towards 1 as the temperature rises. A larger score starts nearer 1, but the
#: rising temperature flattens the sigmoid's gradient before the penalty can bring it to 0.
SPARSIFICATION_INIT = 1.0

Tensor = torch.Tensor


def hard_concrete_sample(log_alpha: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A stochastic hard-concrete gate per logit, in ``[0, 1]`` (training).

    Args:
        log_alpha: Gate logits, any shape.
        generator: Random generator for the uniform noise.

    Returns:
        Gates of ``log_alpha``'s shape, differentiable with respect to it.
    """
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=log_alpha.dtype)
    u = u.clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def hard_concrete_gate(log_alpha: Tensor) -> Tensor:
    """The deterministic hard-concrete gate, ``clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def hard_concrete_l0(log_alpha: Tensor) -> Tensor:
    """Probability that each gate is non-zero: ``sigmoid(log_alpha - beta log(-gamma / zeta))``."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


class HardConcrete(torch.nn.Module):
    """``weight -> weight * gate``, one hard-concrete gate per weight.

    In training mode each call draws fresh gates; in eval mode the gate is the binary
    deterministic mask (:meth:`keep`).

    Args:
        shape: The weight's shape.
        device: Where the logits live.
        init: The initial logit of every gate (:data:`HARD_CONCRETE_INIT` if ``None``).
    """

    def __init__(self, shape: torch.Size, device: torch.device | None = None, init: float | None = None) -> None:
        super().__init__()
        init = HARD_CONCRETE_INIT if init is None else init
        self.logits = torch.nn.Parameter(torch.full(shape, float(init), device=device))

    def forward(self, weight: Tensor) -> Tensor:
        gate = hard_concrete_sample(self.logits) if self.training else self.keep().to(weight.dtype)
        return weight * gate.to(weight.dtype)

    def keep(self) -> Tensor:
        """The binary mask: True where the deterministic gate is above 0.5."""
        return hard_concrete_gate(self.logits) > 0.5

    def penalty(self) -> Tensor:
        """Expected number of kept weights (a differentiable scalar)."""
        return hard_concrete_l0(self.logits).sum()


class Sparsification(torch.nn.Module):
    """``weight -> weight * sigmoid(temperature * score)`` (continuous sparsification).

    In eval mode the mask is the binary ``score > 0`` (:meth:`keep`). The fitting loop
    raises :attr:`temperature` from 1 as training goes on. ``init`` is the initial score
    (:data:`SPARSIFICATION_INIT` if ``None``).
    """

    def __init__(self, shape: torch.Size, device: torch.device | None = None, init: float | None = None) -> None:
        super().__init__()
        init = SPARSIFICATION_INIT if init is None else init
        self.logits = torch.nn.Parameter(torch.full(shape, float(init), device=device))
        self.temperature = 1.0

    def forward(self, weight: Tensor) -> Tensor:
        mask = torch.sigmoid(self.temperature * self.logits) if self.training else self.keep()
        return weight * mask.to(weight.dtype)

    def keep(self) -> Tensor:
        """The binary mask: True where the score is positive."""
        return self.logits > 0

    def penalty(self) -> Tensor:
        """The mask's sum at the current temperature (a differentiable scalar)."""
        return torch.sigmoid(self.temperature * self.logits).sum()


class FixedMask(torch.nn.Module):
    """``weight -> weight * mask`` for a fixed boolean mask (ablation)."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.bool())

    def forward(self, weight: Tensor) -> Tensor:
        return torch.where(self.mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


#: The relaxation of each ``method`` name.
METHODS: dict[str, type[torch.nn.Module]] = {"hard_concrete": HardConcrete,
                                             "continuous_sparsification": Sparsification}
