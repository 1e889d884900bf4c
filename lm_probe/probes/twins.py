"""SGD twins: one online probe per L2 strength, the best kept by validation loss.

An online SGD probe has one L2 strength, ``alpha``. The best one depends on the data: on
benchmarks/quality.py's real activations the offline ceiling (``LogisticRegressionCV``)
chose ``C`` from 0.006 to 1e4 across probes, and a probe trained at the wrong strength
lost up to 0.2 test accuracy. ``ProbeConfig(site, Cs=[...])`` makes the probe a
:class:`TwinProbe`: one twin per ``C`` (``alpha = 1 / (C * rows)``, the minimizer of
``LogisticRegression(C)`` on the training rows, :func:`~lm_probe.probes.config.default_alpha`),
trained side by side on the same batches, each with its own early stopping, step decay and
best snapshot. At the end the probe becomes the twin of lowest validation log-loss (ties go
to the first in ``Cs``): its weights, moments, history and codelength; ``C_`` says which.

The twins read the same pooled rows: the forward and the replay cache cost the same as one
probe; the probe steps cost ``len(Cs)`` times as much. A control twin (``control=True``) is
a :class:`TwinProbe` too, choosing its own ``C`` on the control labels. The torch backend
leaves these probes to scikit-learn.
"""

from __future__ import annotations

import copy
from typing import Iterable

import numpy as np

from ..core.consumer import PooledBatch, RunContext
from .config import ProbeConfig, default_alpha
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
        twins: The twins, a :class:`Probe` each, in the order of ``config.Cs``.
        C_: The chosen twin's ``C`` (after training).
        twin_losses_: ``{C: best validation loss}`` of every twin (after training).
    """

    def __init__(self, config: ProbeConfig, classes: Iterable[int] | None = None,
                 random_state: int | None = None, name: str | None = None) -> None:
        self.twins: list[Probe] = []
        self.twin_losses_: dict[float, float] = {}
        super().__init__(config, classes=classes, random_state=random_state, name=name)

    def reset(self) -> None:
        """Back to fresh twins (with this pass's settings)."""
        super().reset()
        self.twin_losses_ = {}
        self.twins = []
        for C in self.config.Cs:
            twin = Probe(twin_config(self.config, C), random_state=self.random_state, name=f"{self.name} [C={C:g}]")
            twin._classes, twin._training, twin.n_rows_ = self._classes, self._training, self.n_rows_
            twin.reset()
            self.twins.append(twin)

    def start(self, context: RunContext) -> None:
        """Start the twins with this probe's settings.

        Raises:
            ValueError: no validation split to choose ``C`` on (``fit_probes(val_size=0)``).
        """
        super().start(context)
        if self._training.validation is None and context.training:
            raise ValueError(f"probe {self.name!r} chooses C among SGD twins on the validation split, and "
                             "fit_probes(val_size=0) leaves none: give val_size > 0, or one alpha instead of Cs")

    def reset_estimator_alpha(self) -> None:
        """A loaded probe: the chosen twin's ``alpha`` for :attr:`n_rows_`."""
        if self.C_ is not None and self.n_rows_:
            self.estimator_.set_params(alpha=default_alpha(self.n_rows_, self.C_))

    @property
    def active(self) -> bool:
        return any(twin.active for twin in self.twins) if self.twins else super().active

    def update(self, batch: PooledBatch) -> None:
        for twin in self.twins:
            if twin.active:
                twin.update(batch)

    def finish(self) -> None:
        """End of training: each twin restores its best weights; this probe becomes the one of
        lowest validation loss."""
        if not self.twins:
            return super().finish()
        for twin in self.twins:
            twin.finish()
        losses = [twin.best_loss_ if np.isfinite(twin.best_loss_) else np.inf for twin in self.twins]
        chosen = self.twins[int(np.argmin(losses))]
        self.__dict__.update({k: v for k, v in vars(chosen).items() if k not in _IDENTITY})
        self.C_ = chosen.config.l2_C
        self.twin_losses_ = {twin.config.l2_C: float(twin.best_loss_) for twin in self.twins}
