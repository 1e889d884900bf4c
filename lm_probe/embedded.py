"""``lm_probe.embedded``, the import path of earlier versions: the offline model and data
read from PyPI wheels now live in :mod:`lm_probe.core.embedded`."""

from __future__ import annotations

from .core.embedded import (EMBEDDED_MODELS, ROTTEN_TOMATOES, EmbeddedAssetError, WheelAsset, cache_dir,
                            embedded_model_path, fetch_wheel_member, rotten_tomatoes)

__all__ = ["EMBEDDED_MODELS", "ROTTEN_TOMATOES", "EmbeddedAssetError", "WheelAsset", "cache_dir",
           "embedded_model_path", "fetch_wheel_member", "rotten_tomatoes"]
