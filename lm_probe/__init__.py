"""lm_probe: train many probes on a language model's activations from one forward pass.

The flow is one-way: dataset -> batches -> one nnsight trace per batch -> pooled
activations per site -> consumers (probes, ...) -> result tables.
"""

from __future__ import annotations

from .architectures import Architecture, describe
from .consumer import Consumer, NotComputedError, PooledBatch
from .dataset import ProbeDataset
from .early_stopping import EarlyStopping, StopReason
from .gauge import DiffusionGauge
from .geometry import Geometry, GeometryResults
from .lens import LogitLens
from .model import ModelNotFoundError, load_model
from .probe import IGNORE, LinearProbe, Probe, ProbeConfig
from .replay import Cache
from .runner import ProbeRunner
from .sites import Site, SiteError
from .store import ActivationStore
from .trigger import Trigger
from . import integrations  # noqa: E402  (lm_probe.integrations.GaugeCallback)

__version__ = "0.1.0"

__all__ = [
    "ActivationStore",
    "Architecture",
    "Cache",
    "Consumer",
    "DiffusionGauge",
    "EarlyStopping",
    "Geometry",
    "GeometryResults",
    "IGNORE",
    "LinearProbe",
    "LogitLens",
    "ModelNotFoundError",
    "Probe",
    "NotComputedError",
    "PooledBatch",
    "ProbeConfig",
    "ProbeDataset",
    "ProbeRunner",
    "Site",
    "SiteError",
    "StopReason",
    "Trigger",
    "describe",
    "load_model",
]
