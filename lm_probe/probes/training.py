"""What a probe is told for one training pass, and which targets it trains on.

``fit_probes`` decides one :class:`Training` per probe (classes, the cached validation
rows, early stopping, the step budget, a control task's labels...) and gives it in
``start(context)`` as ``context.training[probe.name]``; the probe keeps it for the pass
and :meth:`~lm_probe.probes.probe.Probe.reset` goes back to it. :func:`batch_targets` reads
a batch's targets for a probe: the batch's own labels, or those of the pass's control
task (``relabel``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.consumer import PooledBatch
from .early_stopping import DecayOnPlateau, EarlyStopping

__all__ = ["Training", "batch_targets"]


@dataclass(frozen=True, eq=False)
class Training:
    """One probe's settings for a training pass (``fit_probes`` decides them; the probe
    reads its own from ``context.training[probe.name]`` in ``start``).

    Args:
        classes: The classes (classification); ``None``: the probe's own.
        validation: Cached validation set ``(X, y)``, unlabeled rows already removed.
        n_nonfinite: Validation rows already left out for non-finite activations.
        early_stopping: The stopping rule, a template: the probe works on its own copy,
            made fresh at ``start()`` and ``reset()``.
        eval_every: Steps between validation evaluations.
        max_steps: Steps at most.
        decay: Step-size decay on validation plateaus (SGD linear heads), a template as
            ``early_stopping``.
        relabel: Targets to use instead of the batch's, indexed by dataset position
            (an array for sequence tasks, a list of per-example token arrays for
            token tasks): a control task.
        max_row_bytes: ``solver="lbfgs"``: most bytes of fit rows it may hold.
        n_rows: The training rows this pass will show the probe (``alpha="auto"``
            scales its L2 strength by them: :func:`default_alpha`).
    """

    classes: tuple[int, ...] | None = None
    validation: tuple[np.ndarray, np.ndarray] | None = None
    n_nonfinite: int = 0
    early_stopping: EarlyStopping | None = None
    eval_every: int = 10
    max_steps: int | None = None
    decay: DecayOnPlateau | None = None
    relabel: Any = None
    max_row_bytes: int | None = None
    n_rows: int | None = None



def batch_targets(batch: PooledBatch, token: bool, relabel: Any, name: str) -> np.ndarray:
    """A probe's targets for a batch's rows (``IGNORE`` where unlabeled).

    Args:
        batch: The batch.
        token: One row per real token (``pool="none"``): the token labels.
        relabel: The pass's :attr:`Training.relabel` (a control task), or ``None``: the
            batch's own labels.
        name: The probe's name, for the message.

    Raises:
        ValueError: a token probe on data without token labels.
    """
    if relabel is not None:
        if token:
            return np.concatenate([relabel[i] for i in batch.index])
        return np.asarray(relabel)[batch.index]
    if token:
        if batch.token_labels is None:
            raise ValueError(f"probe {name!r} uses pool='none' but the data has no token labels; "
                             "build it with ProbeDataset.from_tagged(...)")
        return batch.token_labels
    return batch.labels
