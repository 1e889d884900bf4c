"""lm_probe: train many probes on a language model's activations from one forward pass.

The flow is one-way: dataset -> batches -> one nnsight trace per batch -> pooled
activations per site -> consumers (probes, ...) -> result tables.
"""

from __future__ import annotations

from .consumer import Consumer, NotComputedError, PooledBatch
from .dataset import ProbeDataset
from .early_stopping import EarlyStopping, StopReason
from .geometry import Geometry, GeometryResults
from .model import load_model
from .probe import LinearProbe, ProbeConfig
from .runner import ProbeRunner
from .sites import Site, SiteError

__version__ = "0.1.0"

__all__ = [
    "Consumer",
    "EarlyStopping",
    "Geometry",
    "GeometryResults",
    "LinearProbe",
    "NotComputedError",
    "PooledBatch",
    "ProbeConfig",
    "ProbeDataset",
    "ProbeRunner",
    "Site",
    "SiteError",
    "StopReason",
    "load_model",
]
