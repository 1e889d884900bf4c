"""lm_probe: train many probes on a language model's activations from one forward pass.

The flow is one-way: dataset -> batches -> one nnsight trace per batch -> pooled
activations per site -> consumers (probes, ...) -> result tables.

``import lm_probe`` is cheap: each public name is imported from its module at first use
(PEP 562), so torch, transformers, nnsight and scikit-learn load when something needs
them, and ``transformers.Trainer`` only with :mod:`lm_probe.integrations`. Submodules
(``lm_probe.embedded``, ``lm_probe.integrations``...) are reachable as attributes too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Each public name and the module that defines it.
_EXPORTS = {
    "ActivationStore": "store",
    "Architecture": "architectures",
    "Cache": "replay",
    "Consumer": "consumer",
    "DiffusionGauge": "gauge",
    "EarlyStopping": "early_stopping",
    "Geometry": "geometry",
    "GeometryResults": "geometry",
    "IGNORE": "dataset",
    "LinearProbe": "probe",
    "LogitLens": "lens",
    "ModelNotFoundError": "model",
    "Probe": "probe",
    "NotComputedError": "consumer",
    "PooledBatch": "consumer",
    "ProbeConfig": "probe",
    "ProbeDataset": "dataset",
    "ProbeRunner": "runner",
    "Site": "sites",
    "SiteError": "sites",
    "StopReason": "early_stopping",
    "Trigger": "trigger",
    "describe": "architectures",
    "load_model": "model",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # the same names, for type checkers and editors
    from .architectures import Architecture, describe
    from .consumer import Consumer, NotComputedError, PooledBatch
    from .dataset import IGNORE, ProbeDataset
    from .early_stopping import EarlyStopping, StopReason
    from .gauge import DiffusionGauge
    from .geometry import Geometry, GeometryResults
    from .lens import LogitLens
    from .model import ModelNotFoundError, load_model
    from .probe import LinearProbe, Probe, ProbeConfig
    from .replay import Cache
    from .runner import ProbeRunner
    from .sites import Site, SiteError
    from .store import ActivationStore
    from .trigger import Trigger


def _submodules() -> set[str]:
    """The package's public modules (``lm_probe.embedded``, ``lm_probe.integrations``...)."""
    import pkgutil

    return {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}


def __getattr__(name: str) -> Any:
    """Import a public name, or a submodule, at its first use (PEP 562)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("_") and name in _submodules():
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_submodules()})
