"""A probe's online (prequential) codelength: the bits of its training labels.

Voita and Titov (2020) rate a representation by the description length of the labels
given it. The online code transmits the labels batch by batch, each under the model
trained on the batches before it; an online probe measures it as it trains. Each
classification probe (``solver="sgd"``) keeps a :class:`Codelength`: in the first epoch
of a fit only (each training row coded once, whatever the number of epochs), before a
batch updates the probe, the batch's labels are coded

* with the uniform code, ``log2 K`` bits per label, when the probe has not stepped yet
  (its first batch);
* otherwise with ``-log2 p(y)`` under the probe's probabilities at that moment: exactly
  what :meth:`~lm_probe.probes.probe.Probe.predict_proba` reports (the averaged weights
  once averaging has started; one-vs-rest probabilities normalized as scikit-learn
  normalizes them), on features standardized with the running moments **including the
  batch**. The probe folds a batch into its moments before it steps on it, and the code
  follows the step's preprocessing; the moments use the activations only, which the
  receiver of the code has, never the labels being coded.

The torch probe bank (:class:`~lm_probe.probes.backend.ProbeBank`) codes each probe with
its own current weights in the same way (:meth:`Codelength.code`).

:meth:`Codelength.compute` gives ``codelength_bits``, ``uniform_bits`` (``n log2 K``
over the same rows), ``compression`` (their ratio: above 1 when the representation
makes the labels cheaper to send than chance) and ``n_coded``. Rows a probe never
trains on (after it stops early in the first epoch) are not coded, in either sum.
Regression probes and ``solver="lbfgs"`` (fitted once on all rows, so there is no
sequence of models to code with) have no codelength: NaN, with the reason in
:attr:`Codelength.reason`. The math is :mod:`lm_probe.functional.codelength`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..core.labels import class_columns
from ..functional.codelength import label_bits, uniform_bits

__all__ = ["Codelength", "CODELENGTH_COLUMNS"]

#: The columns :meth:`Codelength.compute` adds to a probe's metrics row.
CODELENGTH_COLUMNS = ("codelength_bits", "uniform_bits", "compression", "n_coded")


@dataclass
class Codelength:
    """Running online codelength of one probe's training labels.

    Args:
        n_classes: ``K``, the probe's classes (the uniform code is ``log2 K`` per label).
        bits: Bits of the labels coded so far.
        n_coded: Rows coded so far.
        reason: Why this probe has no codelength (``None``: it has one).
    """

    n_classes: int
    bits: float = 0.0
    n_coded: int = 0
    reason: str | None = None

    @classmethod
    def for_probe(cls, probe: Any) -> "Codelength":
        """A fresh, empty codelength for ``probe`` (a :class:`~lm_probe.probes.probe.Probe`),
        with the reason it has none for regression probes and ``solver="lbfgs"``."""
        if not probe.is_classifier:
            return cls(0, reason="a regression probe: no label distribution to code")
        if probe.config.solver == "lbfgs":
            return cls(len(probe.classes_), reason="solver='lbfgs' fits once on all rows: no online sequence "
                                                   "of models to code the labels with")
        return cls(len(probe.classes_))

    def code(self, proba: np.ndarray | None, y: np.ndarray, classes: np.ndarray) -> None:
        """Add a batch's labels: under ``proba``, or the uniform code when ``proba`` is None.

        Args:
            proba: ``(rows, n_classes)`` probabilities, columns in the order of ``classes``,
                or ``None`` (no model yet: ``log2 K`` bits per label).
            y: ``(rows,)`` labels, each one of ``classes``.
            classes: The sorted classes of ``proba``'s columns.

        Raises:
            ValueError: a label is not one of ``classes``.
        """
        if self.reason is not None or len(y) == 0:
            return
        index = class_columns(classes, y, ": they cannot be coded")
        self.bits += uniform_bits(len(y), self.n_classes) if proba is None else label_bits(proba, index)
        self.n_coded += len(y)

    def code_probe(self, probe: Any, X: np.ndarray, y: np.ndarray) -> None:
        """Add a batch ``X (rows, hidden)``, ``y (rows,)`` under ``probe``'s probabilities at
        this moment (:meth:`code`; the uniform code before its first step)."""
        if self.reason is not None:
            return
        proba = None if probe.n_steps_ == 0 else probe.predict_proba(X)
        self.code(proba, y, getattr(probe.estimator_, "classes_", probe.classes_))

    def compute(self) -> dict[str, Any]:
        """``codelength_bits``, ``uniform_bits``, ``compression`` (uniform / online; NaN
        for no rows or no codelength) and ``n_coded``."""
        if self.reason is not None:
            return {**dict.fromkeys(CODELENGTH_COLUMNS[:3], np.nan), "n_coded": 0}
        uniform = uniform_bits(self.n_coded, self.n_classes)
        compression = uniform / self.bits if self.bits > 0 else np.nan
        return {"codelength_bits": self.bits if self.n_coded else np.nan,
                "uniform_bits": uniform if self.n_coded else np.nan, "compression": compression,
                "n_coded": self.n_coded}

    def to_dict(self) -> dict[str, Any]:
        """Plain data for :func:`~lm_probe.probes.persist.save_probes` (JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "Codelength":
        """The codelength saved by :meth:`to_dict`."""
        return cls(int(state["n_classes"]), float(state["bits"]), int(state["n_coded"]), state.get("reason"))
