"""What ``fit_probes`` decides for each probe before the first batch: its :class:`Training`.

One fit gives every probe its classes (its own, else the training set's), its cached
validation rows (pooled once for all probes, then cut to the rows that probe is scored
on: :func:`~lm_probe.probes.scoring.scored_rows`), a fresh early-stopping rule and step
budget (the ``fit_probes`` values, or the probe's own :data:`~lm_probe.probes.config.PER_PROBE`
settings), the training row count ``alpha="auto"`` scales by, and, for a control twin,
the control labels of the fit split. A probe whose config names no classes learns the
training set's :attr:`~lm_probe.ProbeDataset.label_names` (``label_names_``, saved with
it), so deployed predictions come back as class names.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..core.consumer import Request
from ..core.dataset import ProbeDataset
from ..core.labels import labeled
from .control import ControlTask, is_control
from .early_stopping import DecayOnPlateau, EarlyStopping
from .probe import Probe
from .scoring import scored_rows
from .training import Training

__all__ = ["fit_settings", "control_task"]


def control_task(probes: Mapping[str, Probe], fit: ProbeDataset, seed: int) -> ControlTask | None:
    """The fit's control task when a probe has a control twin (classification), else ``None``."""
    has_twin = any(is_control(name) for name in probes)
    return ControlTask.for_fit(fit, seed) if has_twin and not fit.is_regression else None


def fit_settings(probes: Mapping[str, Probe], train: ProbeDataset, fit: ProbeDataset, val: ProbeDataset | None,
                 val_acts: Mapping[Request, np.ndarray], control: ControlTask | None, *, stopping: dict[str, Any],
                 decay: DecayOnPlateau | None, **settings: Any) -> dict[str, Training]:
    """Every probe's :class:`Training` for one fit.

    Args:
        probes: The probes by name (control twins among them).
        train: The training set (its classes are the default classes).
        fit: The part of ``train`` the probes fit on.
        val: The validation part (``None``: no validation, no early stopping).
        val_acts: ``val``'s pooled activations, ``{request: (rows, hidden)}``.
        control: The fit's control task (``None`` without twins).
        stopping: ``fit_probes``' ``patience``, ``min_delta``, ``warmup_steps`` and
            ``max_steps`` (each probe's own values in their place).
        decay: The step-size decay template.
        **settings: Further :class:`Training` fields, the same for every probe.
    """
    control_fit = control.labels(fit) if control is not None else None
    n_rows = {False: int(labeled(fit.labels).sum()),  # training rows per pooling, for alpha="auto"
              True: int(labeled(fit.flat_token_labels()).sum()) if fit.token_labels is not None else None}
    training = {}
    for name, probe in probes.items():
        classes = probe.config.classes or tuple(train.classes.tolist())
        probe.label_names_ = None if train.label_names is None else [str(n) for n in train.label_names]
        validation, n_bad = None, 0
        if val is not None:
            X, y, _, n_bad = scored_rows(probe, val_acts[probe.requests[0]], val, classes, "validation", control)
            validation = (X, y)
        own = probe.config.training(**stopping)
        max_steps = own.pop("max_steps")
        training[name] = Training(classes=tuple(classes) if probe.is_classifier else None, validation=validation,
                                  n_nonfinite=n_bad, early_stopping=EarlyStopping(**own), max_steps=max_steps,
                                  decay=decay, n_rows=n_rows[probe.config.pool == "none"],
                                  relabel=control_fit if is_control(name) else None, **settings)
        training.update({twin.name: training[name] for twin in getattr(probe, "twins", ())})  # SGD twins: the same
    return training
