"""Seeded random numbers that are a function of a row's identity, not of its position.

A control label, or whether a row enters a sample, should not change when the same
examples arrive in another order, in other batches, or split across processes. Drawing
from a generator in stream order cannot give that; hashing the row's identity can:
:func:`hash_uniform` maps ``(seed, key, key, ...)`` to a number in ``[0, 1)`` with the
SplitMix64 finalizer (Steele, Lea and Flood, 2014), vectorized over numpy arrays.
:func:`file_sha256` is the one digest of a file's bytes (the embedded assets' checks, the
activation store's shard checksums).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

__all__ = ["hash_uniform", "file_sha256"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """The SplitMix64 finalizer on uint64 arrays (multiplication wraps modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_uniform(seed: int, *keys: np.ndarray | int) -> np.ndarray:
    """Uniform numbers in ``[0, 1)``, one per element of the broadcast ``keys``.

    The result depends only on ``seed`` and the key values (integers, e.g. example ids
    and token positions), so the same row gets the same number in any order or batch.

    Args:
        seed: Any integer.
        *keys: Integer arrays (or scalars) broadcast together.

    Returns:
        ``float64`` array of the broadcast shape.
    """
    parts = np.broadcast_arrays(*[np.asarray(k, np.int64) for k in keys]) if keys else [np.zeros((), np.int64)]
    with np.errstate(over="ignore"):
        h = _mix(np.full(parts[0].shape, np.asarray(seed, np.int64).astype(np.uint64), np.uint64) * _GOLDEN + _GOLDEN)
        for key in parts:
            h = _mix(_mix(h ^ (key.astype(np.uint64) * _GOLDEN)) + _GOLDEN)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def file_sha256(file: str | Path) -> str:
    """The hex SHA-256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
