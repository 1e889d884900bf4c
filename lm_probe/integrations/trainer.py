"""Hooks into training loops: a ``transformers.Trainer`` callback for diffusion gauges."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..consumers.gauge import DiffusionGauge
from ..core.dataset import ProbeDataset

__all__ = ["GaugeCallback"]


class GaugeCallback(TrainerCallback):
    """Measure a :class:`DiffusionGauge` while a ``transformers.Trainer`` trains ``model``.

    The gauge's trigger decides when: ``"start"`` (train begin, step 0), ``"step"`` (each
    optimizer step, with ``state.global_step``), ``"epoch_end"``, ``"validation"`` (after
    each evaluation) and ``"end"``; at most once per step.

    Args:
        gauge: The gauge.
        model: The model being trained (the same object the Trainer holds).
        probe_data: The examples the gauge draws its fixed probe subset from.
    """

    def __init__(self, gauge: DiffusionGauge, model: Any, probe_data: ProbeDataset) -> None:
        self.gauge, self.model = gauge, model
        if gauge.data is None:
            gauge.data = probe_data

    def _event(self, event: str, state: Any) -> None:
        epoch = int(round(state.epoch or 0))
        self.gauge.maybe_measure(self.model, event, int(state.global_step), epoch)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._event("start", state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._event("step", state)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._event("epoch_end", state)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._event("validation", state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._event("end", state)
