"""SGD twins: one online probe per L2 strength, the best kept by validation loss.

An online SGD probe has one L2 strength, ``alpha``. The best one depends on the data: on
benchmarks/quality.py's real activations the offline ceiling (``LogisticRegressionCV``)
chose ``C`` from 0.0008 to 1,292 across probes, and on a strongly separable synthetic task
one probe at ``C=0.005`` ends at twice the exact solver's validation loss. An SGD
classifier's config (by default ``Cs=SGD_CS``) makes the probe a :class:`TwinProbe`: one
twin per ``C`` (``alpha = 1 / (C * rows)``, the minimizer of
``LogisticRegression(C)`` on the training rows, :func:`~lm_probe.probes.config.default_alpha`),
trained side by side on the same batches, each with its own early stopping, step decay and
best snapshot. At the end the probe becomes the twin of lowest validation log-loss (ties go
to the first in ``Cs``): its weights, moments, history and codelength; ``C_`` says which.
Without a validation split only the twin nearest ``alpha="auto"``'s ``C`` trains.

The twins read the same pooled rows: the forward and the replay cache cost the same as one
probe; the probe steps cost ``len(Cs)`` times as much. A control twin (``control=True``) is
a :class:`TwinProbe` too, choosing its own ``C`` on the control labels. With the torch
backend the bank steps the twins of linear and softmax heads with every other probe
(:attr:`TwinProbe.banked`); this probe then only chooses among them at the end.
"""

from __future__ import annotations

import copy
from typing import Iterable

import numpy as np
from loguru import logger

from ..core.consumer import PooledBatch, RunContext
from .config import DEFAULT_SGD_C, ProbeConfig, default_alpha
from .early_stopping import StopReason
from .probe import Probe

__all__ = ["TwinProbe", "make_probe"]

#: A probe's own identity, kept when it takes on its chosen twin's learned state.
_IDENTITY = ("config", "name", "requests", "random_state", "twins", "twin_losses_")


def make_probe(config: ProbeConfig, classes: Iterable[int] | None = None, random_state: int | None = None,
               name: str | None = None) -> Probe:
    """The probe of ``config``: a :class:`TwinProbe` for an SGD head with a ``Cs`` grid, else a :class:`Probe`."""
    twins = config.solver == "sgd" and config.Cs
    return (TwinProbe if twins else Probe)(config, classes=classes, random_state=random_state, name=name)


def twin_config(config: ProbeConfig, C: float) -> ProbeConfig:
    """``config`` as one twin: no grid, ``alpha="auto"`` at this ``C``."""
    twin = copy.copy(config)
    twin.Cs, twin.l2_C = None, float(C)
    twin.probe_kwargs = {**config.probe_kwargs, "alpha": "auto"}
    return twin


class TwinProbe(Probe):
    """An SGD probe trained as one twin per ``C`` of ``config.Cs`` (see the module docstring).

    Attributes:
        twins: The twins, a :class:`Probe` each, in the order of ``config.Cs`` (the same
            objects for the probe's life: a bank may hold them).
        banked: Whether the torch backend's bank steps and finishes the twins.
        C_: The chosen twin's ``C`` (after training).
        twin_losses_: ``{C: best validation loss}`` of every twin (after training).
    """

    def __init__(self, config: ProbeConfig, classes: Iterable[int] | None = None,
                 random_state: int | None = None, name: str | None = None) -> None:
        self.banked = False  # the torch backend's bank steps the twins (lm_probe.probes.backend.bank_for)
        self.twin_losses_: dict[float, float] = {}
        name = name or config.name
        self.twins = [Probe(twin_config(config, C), random_state=random_state, name=f"{name} [C={C:g}]")
                      for C in config.Cs]
        super().__init__(config, classes=classes, random_state=random_state, name=name)

    def reset(self) -> None:
        """Back to fresh twins (with this pass's settings)."""
        super().reset()
        self.twin_losses_ = {}
        for twin in self.twins:
            twin._classes, twin._training, twin.n_rows_ = self._classes, self._training, self.n_rows_
            twin.reset()

    def start(self, context: RunContext) -> None:
        """Start the twins with this probe's settings (``fit_probes`` also gives each twin's
        name this probe's entry in ``context.training``, for a bank that starts them).
        Without a validation split (``fit_probes(val_size=0)``) there is nothing to choose
        ``C`` on: only the twin nearest ``alpha="auto"``'s ``C`` (0.005) trains."""
        super().start(context)
        if self._training.validation is None and context.training:
            solo = self._fallback()
            logger.info("probe {!r}: no validation split to choose C on; training C={:g} alone", self.name,
                        solo.config.l2_C)
            for twin in self.twins:
                if twin is not solo:
                    twin._stop(StopReason.END_OF_DATA)

    def _fallback(self) -> Probe:
        """The twin whose ``C`` is nearest (in log scale) ``alpha="auto"``'s."""
        return min(self.twins, key=lambda t: abs(np.log(t.config.l2_C / DEFAULT_SGD_C)))

    def reset_estimator_alpha(self) -> None:
        """A loaded probe: the chosen twin's ``alpha`` for :attr:`n_rows_`."""
        if self.C_ is not None and self.n_rows_:
            self.estimator_.set_params(alpha=default_alpha(self.n_rows_, self.C_))

    @property
    def active(self) -> bool:
        return any(twin.active for twin in self.twins)

    def update(self, batch: PooledBatch) -> None:
        """Step each active twin on the batch (unless the torch backend's bank steps them)."""
        for twin in [] if self.banked else self.twins:
            if twin.active:
                twin.update(batch)

    def finish(self) -> None:
        """End of training: each twin restores its best weights (the bank finishes banked
        twins); this probe becomes the one of lowest validation loss."""
        for twin in [] if self.banked else self.twins:
            twin.finish()
        losses = [twin.best_loss_ if np.isfinite(twin.best_loss_) else np.inf for twin in self.twins]
        chosen = self.twins[int(np.argmin(losses))] if np.isfinite(min(losses)) else self._fallback()
        self.__dict__.update({k: v for k, v in vars(chosen).items() if k not in _IDENTITY})
        self.C_ = chosen.config.l2_C
        self.twin_losses_ = {twin.config.l2_C: float(twin.best_loss_) for twin in self.twins}
