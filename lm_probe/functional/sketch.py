"""Frequent Directions (Liberty, 2013; Ghashami et al., 2016): a small matrix B whose
Gram matrix BᵀB approximates AᵀA for a stream of rows A, with
0 ⪯ AᵀA - BᵀB ⪯ ||A - A_k||²_F / (ℓ - k) for every k < ℓ. Sketches merge by stacking
and shrinking again. Used by :class:`lm_probe.consumers.geometry.Geometry` for wide models.
"""

from __future__ import annotations

import numpy as np

from .spectra import clip_eigenvalues

__all__ = ["fd_shrink", "fd_eigh"]


def fd_shrink(rows: np.ndarray, rank: int) -> np.ndarray:
    """Shrink a stack of rows to a sketch of at most ``2 * rank`` rows.

    When there are more than ``2 * rank`` rows, the squared singular values are all
    reduced by the ``rank``-th largest one, leaving at most ``rank`` non-zero rows.

    Args:
        rows: ``(m, D)`` the current sketch stacked with new rows.
        rank: The sketch rank ℓ.

    Returns:
        ``(<= 2 * rank, D)`` float64 sketch.
    """
    rows = np.asarray(rows, np.float64)
    if rows.shape[0] <= 2 * rank:
        return rows
    _, s, vt = np.linalg.svd(rows, full_matrices=False)
    delta = s[rank - 1] ** 2 if s.size >= rank else 0.0
    shrunk = np.sqrt(np.maximum(s[:rank] ** 2 - delta, 0.0))
    return shrunk[:, None] * vt[:rank]


def fd_eigh(sketch: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate covariance eigenpairs ``(BᵀB) / (n - 1)`` of a sketch of centered rows.

    Returns:
        ``(eigenvalues descending, clipped; eigenvectors as columns)``; only the
        sketch's rank many are non-zero.
    """
    _, s, vt = np.linalg.svd(np.asarray(sketch, np.float64), full_matrices=False)
    return clip_eigenvalues(s**2 / (n - 1)), vt.T
