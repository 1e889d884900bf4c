"""``lm_probe.architectures``, the import path of earlier versions: the site strings by kind
now live in :mod:`lm_probe.core.architectures`."""

from __future__ import annotations

from .core.architectures import KINDS, Architecture, describe, sites

__all__ = ["Architecture", "KINDS", "describe", "sites"]
