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

from .core.versions import __version__

#: Each public name and the module that defines it.
_EXPORTS = {
    "ActivationStore": "consumers.store",
    "Architecture": "core.architectures",
    "Cache": "core.replay",
    "CircuitProbe": "circuits.circuit",
    "Consumer": "core.consumer",
    "DiffusionGauge": "consumers.gauge",
    "EarlyStopping": "probes.early_stopping",
    "Geometry": "consumers.geometry",
    "GeometryResults": "consumers.geometry_results",
    "IGNORE": "core.labels",
    "LinearProbe": "probes.probe",
    "LogitLens": "consumers.lens",
    "ModelNotFoundError": "core.model",
    "MonitorStep": "probes.monitor",
    "Probe": "probes.probe",
    "NotComputedError": "core.consumer",
    "PooledBatch": "core.consumer",
    "ProbeConfig": "probes.config",
    "ProbeDataset": "core.dataset",
    "ProbeRunner": "runner",
    "RouterStats": "consumers.router",
    "Site": "core.sites",
    "SiteError": "core.sites",
    "StopReason": "probes.early_stopping",
    "StoredRun": "consumers.store_run",
    "SubnetworkProbe": "circuits.subnetwork",
    "Trigger": "core.trigger",
    "ablate": "circuits.targets",
    "describe": "core.architectures",
    "load_model": "core.model",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # the same names, for type checkers and editors
    from .circuits.circuit import CircuitProbe
    from .circuits.subnetwork import SubnetworkProbe
    from .circuits.targets import ablate
    from .consumers.gauge import DiffusionGauge
    from .consumers.geometry import Geometry
    from .consumers.geometry_results import GeometryResults
    from .consumers.lens import LogitLens
    from .consumers.router import RouterStats
    from .consumers.store import ActivationStore
    from .consumers.store_run import StoredRun
    from .core.architectures import Architecture, describe
    from .core.consumer import Consumer, NotComputedError, PooledBatch
    from .core.dataset import ProbeDataset
    from .core.labels import IGNORE
    from .core.model import ModelNotFoundError, load_model
    from .core.replay import Cache
    from .core.sites import Site, SiteError
    from .core.trigger import Trigger
    from .probes.config import ProbeConfig
    from .probes.monitor import MonitorStep
    from .probes.early_stopping import EarlyStopping, StopReason
    from .probes.probe import LinearProbe, Probe
    from .runner import ProbeRunner


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
