"""Hooks into other libraries' training loops (imported on demand: they load those libraries).

* :class:`GaugeCallback`: a ``transformers.Trainer`` callback that measures a
  :class:`~lm_probe.DiffusionGauge` while the model trains.
* :class:`~lm_probe.integrations.lightning.ProbeCallback`: a Lightning callback that measures
  gauges, geometry and probes on a fixed probe subset while the model trains (optional
  extra ``pip install "lm_probe[lightning]"``; Lightning is imported at its first use).
"""

from __future__ import annotations

from typing import Any

from .trainer import GaugeCallback

__all__ = ["GaugeCallback"]  # ProbeCallback is lazy: a star import must not load Lightning


def __getattr__(name: str) -> Any:
    """``ProbeCallback`` from :mod:`lm_probe.integrations.lightning`, imported at its first use."""
    if name == "ProbeCallback":
        from .lightning import ProbeCallback

        return ProbeCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
