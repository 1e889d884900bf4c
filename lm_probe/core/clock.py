"""The clock of a pass: its moments, told to every consumer, and the subsets they ask for.

``fit_probes`` and ``collect`` tell their consumers the moments of a pass with
``on_event`` (``"start"``, ``"step"``, ``"validation"``, ``"epoch_end"``, ``"end"``). A
consumer that declares a :class:`~lm_probe.core.consumer.SubsetRequest` at a moment gets
its rows with ``observe``; each request is pooled once per pass (the model is frozen
while it runs) by the reader the clock is given, and its rows are let go at the end.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from .consumer import Consumer, Request, SubsetRequest

__all__ = ["Clock"]


class Clock:
    """The events of one ``fit_probes`` or ``collect`` call, told to its consumers.

    Args:
        pooled: The pass's reader, ``pooled(data, requests, batch_size, desc)`` (the
            runner's :meth:`~lm_probe.ProbeRunner.pooled`).
    """

    def __init__(self, pooled: Any) -> None:
        self.pooled = pooled
        self.rows: dict[SubsetRequest, dict[Request, np.ndarray]] = {}  # by identity: one request per pass

    def emit(self, consumers: Iterable[Consumer], event: str, step: int, epoch: int) -> None:
        """Tell each consumer the moment; pool and hand in the subset it asks for."""
        for consumer in consumers:
            consumer.on_event(event, step, epoch)
            wanted = consumer.subset_due(event, step, epoch)
            if wanted is None:
                continue
            if wanted not in self.rows:
                self.rows[wanted] = self.pooled(wanted.data, list(wanted.requests), wanted.batch_size, "subset")
            consumer.observe(self.rows[wanted], event, step, epoch)

    def end(self, consumers: Iterable[Consumer], step: int, epoch: int) -> None:
        """The end of a consumer's pass: ``finish()``, then the ``"end"`` event."""
        consumers = list(consumers)
        for consumer in consumers:
            consumer.finish()
        self.emit(consumers, "end", step, epoch)
        self.rows.clear()
