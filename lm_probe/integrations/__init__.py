"""Hooks into other libraries' training loops (imported on demand: they load those libraries).

* :class:`GaugeCallback`: a ``transformers.Trainer`` callback that measures a
  :class:`~lm_probe.DiffusionGauge` while the model trains.
"""

from __future__ import annotations

from .trainer import GaugeCallback

__all__ = ["GaugeCallback"]
