"""Circuit probing (Lepori, Serre and Pavlick 2024): a subnetwork whose output clusters by label.

Where a subnetwork probe trains a classifier on the site, a circuit probe trains only the
mask: the masked model's representation at the site should put examples of one label near
each other and far from the others. The loss is the soft nearest neighbour loss (Frosst,
Papernot and Hinton 2019) over a batch of rows ``x_i`` with labels ``y_i``::

    -1/b sum_i log( sum_{j != i, y_j = y_i} exp(-|x_i - x_j|^2 / T) / sum_{k != i} exp(-|x_i - x_k|^2 / T) )

with ``T`` = ``snn_temperature`` times the row width (rows are standardized), plus
``l0_lambda`` times the expected fraction of weights kept. Rows with no same-label partner
in the batch are left out. The found circuit is read by a nearest-centroid classifier: the
class means of the training rows under the binary mask, probabilities ``softmax(-|x -
c_k|^2 / T)``. Its causal test is :func:`~lm_probe.circuits.ablate`: remove the circuit
and measure the model's behaviour (task accuracy, the logit lens, a probe).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..core.architectures import _torch_module
from ..core.dataset import ProbeDataset
from .masks import FixedMask
from .targets import Masked, parametrized
from .training import MaskedProbe

__all__ = ["CircuitProbe", "soft_nearest_neighbour_loss"]


def soft_nearest_neighbour_loss(x: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """The soft nearest neighbour loss of rows ``x`` ``(b, d)`` with labels ``y`` ``(b,)``.

    Squared Euclidean distances divided by ``temperature``; rows without another row of
    their label are left out (the loss is 0 when no row has one).
    """
    d = torch.cdist(x, x).pow(2) / temperature
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    logits = (-d).masked_fill(eye, float("-inf"))
    same = (y[:, None] == y[None, :]) & ~eye
    has = same.any(1)
    if not has.any():
        return x.sum() * 0.0
    num = torch.logsumexp(logits.masked_fill(~same, float("-inf")), dim=1)
    den = torch.logsumexp(logits, dim=1)
    return -(num - den)[has].mean()


class CircuitProbe(MaskedProbe):
    """A mask over ``masked`` trained so that the site's rows cluster by label.

    Args:
        model, site, masked, method, l0_lambda, pool, epochs, batch_size, mask_lr,
        patience, temperature_final, standardize, mask_init, seed: As for
            :class:`~lm_probe.circuits.SubnetworkProbe`. ``masked`` must not be empty:
            with nothing to mask there is nothing to learn.
        snn_temperature: The loss's temperature per row dimension.

    Attributes:
        centroids_: ``(n_classes, d)`` class means of the training rows under the found mask.
        mask_, kept_, kept_fraction_, classes_, targets_, metrics_, history_,
        best_epoch_, stopped_reason_: As for :class:`~lm_probe.circuits.SubnetworkProbe`.
    """

    _PARAMS = (*MaskedProbe._PARAMS, "snn_temperature")

    def __init__(self, model: Any, site: str, *, masked: Masked | str, method: str = "hard_concrete",
                 l0_lambda: float = 1.0, snn_temperature: float = 1.0, **kwargs: Any) -> None:
        self.snn_temperature = snn_temperature
        super().__init__(model, site, masked=masked, method=method, l0_lambda=l0_lambda, **kwargs)
        if not self.targets_:
            raise ValueError("a circuit probe learns only a mask: give masked modules (e.g. masked=[('mlp', [0])])")

    def _code_reason(self, warm: bool) -> str | None:
        return "a circuit probe reads by the class centroids of all training rows: no online sequence of models"

    def _build(self, hidden: int, n_classes: int) -> list[torch.nn.Parameter]:
        self._width = hidden
        self.__dict__.pop("centroids_", None)  # a refit validates with the loss, not old centroids
        return []

    def _scale(self) -> float:
        return self.snn_temperature * self._width

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "centroids_") and not torch.is_grad_enabled():
            return torch.nn.functional.nll_loss(torch.log(self._proba(x).clamp_min(1e-12)), y)
        return soft_nearest_neighbour_loss(x, y, self._scale())

    def _proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(-torch.cdist(x, self.centroids_).pow(2) / self._scale(), dim=1)

    def _finish(self, train: ProbeDataset) -> None:
        """The class means of the training rows under the binary mask."""
        module = _torch_module(self.model)
        masks = {p: FixedMask(torch.as_tensor(k, device=self._device())) for p, k in self.mask_.items()}
        with parametrized(module, masks):
            x, y = self._collect(module, train, self._pool_for(train))
        index = self._targets(y, x.device)
        self.centroids_ = torch.stack([x[index == k].mean(0) for k in range(len(self.classes_))])

    def _head_arrays(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids_.cpu().numpy()}

    def _load_head(self, arrays: dict[str, np.ndarray], device: torch.device) -> None:
        self.centroids_ = torch.as_tensor(arrays["centroids"], device=device)
        self._width = self.centroids_.shape[1]
