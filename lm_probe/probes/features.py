"""Each probe's input features for raw token ids: what ``runner[name].predict`` takes.

:class:`ProbeFeatures` gives :class:`~lm_probe.ProbeRunner` its
:meth:`~ProbeFeatures.get_probe_features` (the original lm_probe's call): the ids are
wrapped in a :class:`~lm_probe.core.dataset.ProbeDataset` and pooled through the
runner's ``pooled``, one trace per batch for all the probes asked for.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..core.consumer import requests_of
from ..core.dataset import ProbeDataset
from ..core.model import tokenizer_padding

__all__ = ["ProbeFeatures"]


class ProbeFeatures:
    """The runner's feature reading (a mixin: it uses the runner's ``model``, ``probes``,
    ``pooled`` and ``__getitem__``)."""

    def get_probe_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           subset: Sequence[str] | None = None, *,
                           batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Each probe's pooled input features for a padded batch (as the original lm_probe's).

        Args:
            input_ids, attention_mask: ``(n, tokens)`` ids and their mask.
            subset: Names of the probes to compute (default, or empty: all; a ``KeyError``
                for a name that is no probe's). A probe's name is its site unless its
                config names it.
            batch_size: Trace in chunks of this many rows (default: all at once).

        Returns:
            ``{probe name: (n, hidden) float32 array}``, the rows ``runner[name].predict`` takes.
        """
        probes = {name: self[name] for name in subset} if subset else self.probes
        batch_size = len(input_ids) if batch_size is None else batch_size  # pooled checks it
        pad_token_id, padding_side = tokenizer_padding(self.model)
        data = ProbeDataset.from_tensors(input_ids, attention_mask, np.zeros(len(input_ids), np.int64),
                                         pad_token_id=pad_token_id, padding_side=padding_side)
        acts = self.pooled(data, requests_of(probes.values()), batch_size, "features")
        return {name: acts[p.requests[0]] for name, p in probes.items()}
