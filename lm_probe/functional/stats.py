"""Streaming moments in float64: Welford's update and Chan's parallel merge, for
per-feature moments and for co-moment matrices.

Pure functions on arrays; the stateful classes (probe standardization, geometry
accumulators) hold ``(n, mean, m2)`` and call these. ``m2`` is the sum of squared
deviations from the mean, so the population variance is ``m2 / n`` and the sample
variance ``m2 / (n - 1)``.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import blas

__all__ = ["welford_update", "welford_merge", "comoment_merge", "comoment_batch", "comoment_update"]


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


def comoment_merge(
    n_a: int, mx_a: np.ndarray, my_a: np.ndarray, c_a: np.ndarray,
    n_b: int, mx_b: np.ndarray, my_b: np.ndarray, c_b: np.ndarray,
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Combine co-moments ``C = sum (x - mean_x)(y - mean_y)^T`` of two disjoint samples.

    The matrix form of :func:`welford_merge` (x = y gives the scatter matrix, whose
    division by ``n - 1`` is the sample covariance).

    Args:
        n_a, mx_a, my_a, c_a: count, ``(dx,)`` and ``(dy,)`` means, ``(dx, dy)`` co-moment of A.
        n_b, mx_b, my_b, c_b: the same for B.

    Returns:
        ``(n, mean_x, mean_y, C)`` of the union, float64.
    """
    n = n_a + n_b
    if n_a == 0:
        return n_b, mx_b, my_b, c_b
    if n_b == 0:
        return n_a, mx_a, my_a, c_a
    dx, dy = mx_b - mx_a, my_b - my_a
    return n, mx_a + dx * (n_b / n), my_a + dy * (n_b / n), c_a + c_b + np.outer(dx, dy) * (n_a * n_b / n)


def comoment_batch(x: np.ndarray, y: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Co-moment state of one batch of paired rows ``x (rows, dx)``, ``y (rows, dy)``, in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mx, my = x.mean(0), y.mean(0)
    return x.shape[0], mx, my, (x - mx).T @ (y - my)


def comoment_update(n: int, mx: np.ndarray, my: np.ndarray, C: np.ndarray, x: np.ndarray, y: np.ndarray
                    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Fold a batch of paired rows ``x (rows, dx)``, ``y (rows, dy)`` into co-moments, in
    float64, updating ``C`` in place (the caller owns it: copy a state before sharing it).

    The batch form of Welford's co-moment update, ``C += (x - mean_x_new)^T (y - mean_y_old)``:
    equal to :func:`comoment_merge` of :func:`comoment_batch` (``C_b`` plus the
    ``n_a n_b / n`` term of the means) in one matrix product added in place (BLAS
    ``dgemm``), without the ``(dx, dy)`` temporaries of the merge. The first batch
    (``n == 0``) uses its own y mean.

    Returns:
        ``(n, mean_x, mean_y, C)`` with the batch folded in (``C`` the same array).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    rows = x.shape[0]
    if rows == 0:
        return n, mx, my, C
    total = n + rows
    mx_new = mx + (x.mean(0) - mx) * (rows / total)
    my_new = my + (y.mean(0) - my) * (rows / total)
    A, B = x - mx_new, y - (my if n else my_new)
    if C.dtype == np.float64 and C.flags.c_contiguous:
        out = blas.dgemm(1.0, B, A, beta=1.0, c=C.T, trans_a=1, overwrite_c=1)  # C^T (Fortran order) += B^T A
        if not np.shares_memory(out, C):  # BLAS made a copy after all
            C[...] = out.T
    else:
        C += A.T @ B
    return total, mx_new, my_new, C
