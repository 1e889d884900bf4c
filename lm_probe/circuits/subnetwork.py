"""Subnetwork probing (Cao, Sanh and Rush 2021): how few of the model's weights a probe needs.

A linear or MLP probe reads a site while a binary mask over the weights of chosen modules
is learned with it, the base weights frozen; the loss is the probe's cross-entropy plus
``l0_lambda`` times the expected fraction of masked weights kept. The answer is a pair:
the accuracy reached, and the fraction of the weights it was reached with. Sweeping
``l0_lambda`` traces the accuracy-against-weights-kept curve. With no masked modules the
same machinery is plain probing (a head trained with Adam on the standardized site rows).

The found subnetwork (``mask_``) can be removed from the model with
:func:`~lm_probe.circuits.ablate` to see what the model, or the probe, does without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .targets import Masked
from .training import MaskedProbe

__all__ = ["SubnetworkProbe", "HEADS"]

HEADS = ("linear", "mlp")


class SubnetworkProbe(MaskedProbe):
    """A probe at ``site`` trained jointly with a weight mask over ``masked``.

    Args:
        model: An nnsight model (:func:`lm_probe.load_model`) or a Hugging Face module.
        site: Where the probe reads, a site string as for every probe
            (``"model.layers.6.output"``, ``sites(model, "resid_post", 6)[0]``).
        masked: What may be pruned: module paths and ``(role, layers)`` pairs, roles
            ``"mlp"``, ``"attn"``, ``"block"`` (``[("mlp", range(6))]``); ``None`` or
            ``[]`` for plain probing. See :mod:`lm_probe.circuits.targets`.
        method: ``"hard_concrete"`` or ``"continuous_sparsification"`` (:mod:`~lm_probe.circuits.masks`).
        l0_lambda: Weight of the penalty, the expected fraction of masked weights kept
            (``1.0``: keeping every weight costs one nat of loss).
        head: ``"linear"`` or ``"mlp"`` (one ReLU hidden layer of ``hidden_size``).
        hidden_size: Width of the MLP head.
        pool: How token rows become one row per example (``"mean"`` by default);
            token-level labels need ``"none"`` (the default for them).
        epochs, batch_size: Passes over the training set, examples per step.
        lr, mask_lr: Adam's learning rates of the head and of the mask logits.
        patience: Epochs without a better validation objective before stopping.
        temperature_final: Continuous sparsification's last temperature.
        standardize: Standardize the site's rows with the unmasked model's training moments.
        warm_start: Fit the head on the unmasked site's rows first (the model runs once for
            them), then train it jointly with the masks, so pruning starts from plain
            probing's accuracy.
        mask_init: Initial mask logit of every weight (``None``: the method's default,
            :data:`~lm_probe.circuits.masks.HARD_CONCRETE_INIT` or ``SPARSIFICATION_INIT``).
        seed: Seed of the batch order, the head's initialization and the mask noise.

    Attributes:
        classes_: The classes, sorted.
        targets_: The masked modules' paths (those holding a weight matrix).
        mask_: ``{module path: boolean array of its weight's shape}``, True where kept.
        kept_: ``{module path: fraction of its weights kept}``; ``kept_fraction_`` over all.
        metrics_: :meth:`score` on the validation set.
        history_: Per epoch: ``train_loss``, ``val_loss``, ``kept_fraction``, ``val_objective``.
        best_epoch_, stopped_reason_: The epoch kept and why training stopped.
    """

    _PARAMS = (*MaskedProbe._PARAMS, "head", "hidden_size")

    def __init__(self, model: Any, site: str, *, masked: Masked | str | None = None, method: str = "hard_concrete",
                 l0_lambda: float = 1.0, head: str = "linear", hidden_size: int = 64, **kwargs: Any) -> None:
        if head not in HEADS:
            raise ValueError(f"head {head!r} is unknown; choose one of {HEADS}")
        self.head, self.hidden_size = head, hidden_size
        super().__init__(model, site, masked=masked, method=method, l0_lambda=l0_lambda, **kwargs)

    def _build(self, hidden: int, n_classes: int) -> list[torch.nn.Parameter]:
        device = self._device()
        if self.head == "linear":
            self._head = torch.nn.Linear(hidden, n_classes)
        else:
            self._head = torch.nn.Sequential(torch.nn.Linear(hidden, self.hidden_size), torch.nn.ReLU(),
                                             torch.nn.Linear(self.hidden_size, n_classes))
        self._head.to(device)
        return list(self._head.parameters())

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self._head(x), y)

    def _proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self._head(x), dim=1)

    def _head_arrays(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self._head.state_dict().items()}

    def _load_head(self, arrays: dict[str, np.ndarray], device: torch.device) -> None:
        first = arrays["weight"] if self.head == "linear" else arrays["0.weight"]
        self._build(first.shape[1], len(self.classes_))
        self._head.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()})
        self._head.to(device)
