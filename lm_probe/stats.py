"""Streaming moments in float64: Welford's update and Chan's parallel merge.

Pure functions on arrays; the stateful classes (probe standardization, geometry
accumulators) hold ``(n, mean, m2)`` and call these. ``m2`` is the sum of squared
deviations from the mean, so the population variance is ``m2 / n`` and the sample
variance ``m2 / (n - 1)``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["welford_update", "welford_merge"]


def welford_merge(
    n_a: int, mean_a: np.ndarray, m2_a: np.ndarray, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    """Combine the moments of two disjoint samples (Chan et al., 1979).

    Args:
        n_a, mean_a, m2_a: count, ``(d,)`` mean and ``(d,)`` sum of squared deviations of A.
        n_b, mean_b, m2_b: the same for B.

    Returns:
        ``(n, mean, m2)`` of the union, float64.
    """
    n = n_a + n_b
    if n == 0:
        return 0, np.asarray(mean_a, np.float64), np.asarray(m2_a, np.float64)
    delta = np.asarray(mean_b, np.float64) - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta**2 * (n_a * n_b / n)
    return n, mean, m2


def welford_update(
    n: int, mean: np.ndarray, m2: np.ndarray, batch: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    """Fold a batch of rows ``(rows, d)`` into running moments, in float64."""
    batch = np.asarray(batch, dtype=np.float64)
    if batch.shape[0] == 0:
        return n, mean, m2
    b_mean = batch.mean(0)
    b_m2 = ((batch - b_mean) ** 2).sum(0)
    return welford_merge(n, mean, m2, batch.shape[0], b_mean, b_m2)
