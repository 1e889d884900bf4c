"""The Gaussian kernel of a point cloud: neighbours, bandwidths and weights (pure functions).

For rows ``X`` of shape ``(n, d)``, :func:`diffusion_kernel` gives Kᵢⱼ = exp(-dᵢⱼ² / (σᵢσⱼ))
on Euclidean distances (optionally after a deterministic PCA to ``n_pca`` dims), with an
``"adaptive"`` (the distance to the ``knn``-th neighbour other than i), ``"median"`` or
fixed bandwidth σ. The sparse kernel keeps the pairs where j is among i's ``knn``
neighbours *or* i among j's (:func:`knn_distances`), so K is symmetric and nothing is
O(n²); the dense one keeps all pairs. :mod:`lm_probe.functional.diffusion` turns K into
an operator and its spectrum.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import scipy.sparse as sp
from scipy.spatial.distance import pdist, squareform
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

__all__ = ["knn_distances", "diffusion_kernel", "check_points", "check_int"]

DENSE_WARN_N = 5_000  #: above this n the dense kernel warns about its O(n²) memory
MEDIAN_SAMPLE = 2_000  #: the median bandwidth is computed on at most this many points
MEDIAN_SEED = 0  #: seed of that subsample
SIGMA_FLOOR = 1e-6  #: bandwidths are floored at this fraction of the data scale
_ROW_CHUNK_ELEMENTS = 1 << 20  # float64 elements (8 MiB) per chunk when recomputing neighbour distances


def check_points(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D array (n, d), got shape {X.shape}")
    bad = int(np.count_nonzero(~np.isfinite(X).all(axis=1)))
    if bad:
        raise ValueError(f"X has non-finite values (NaN or inf) in {bad} of {X.shape[0]} rows; "
                         "drop or impute those rows first")
    if X.shape[0] < 2:
        raise ValueError(f"a diffusion operator needs at least 2 points, got n={X.shape[0]}")
    if not np.ptp(X, axis=0).any():
        raise ValueError(f"all {X.shape[0]} points are identical, so there is no geometry to diffuse "
                         "over; check that the activations were collected correctly")
    return X


def check_int(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_knn(knn: object, n: int) -> int:
    knn = check_int("knn", knn)
    if knn >= n:
        raise ValueError(f"knn={knn} needs more than knn points, but there are only n={n}; "
                         f"use knn <= {n - 1} or collect more samples")
    return knn


def _check_bandwidth(bandwidth: object) -> None:
    if isinstance(bandwidth, str):
        if bandwidth not in ("adaptive", "median"):
            raise ValueError(f"unknown bandwidth {bandwidth!r}; use 'adaptive', 'median' or a positive float")
    elif isinstance(bandwidth, bool) or not isinstance(bandwidth, numbers.Real) \
            or not np.isfinite(bandwidth) or bandwidth <= 0:
        raise ValueError(f"bandwidth must be 'adaptive', 'median' or a positive finite float, got {bandwidth!r}")


def _project(X: np.ndarray, n_pca: int | None) -> np.ndarray:
    if n_pca is None:
        return X
    n_pca = check_int("n_pca", n_pca)
    if n_pca > min(X.shape):
        raise ValueError(f"n_pca={n_pca} exceeds min(n, d)={min(X.shape)}; use a smaller n_pca or None")
    return PCA(n_components=n_pca, svd_solver="full", random_state=0).fit_transform(X)


def knn_distances(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest neighbours of every row, itself excluded.

    scikit-learn's ``NearestNeighbors`` finds the indices (brute force in chunks for
    wide data, so memory stays O(n · k) beyond its working-memory chunk). An exact
    duplicate of i is a neighbour of i; only i itself is excluded. The distances are
    then recomputed from the differences of the rows in float64, because the
    ||x||² - 2x·y + ||y||² expansion used in the search loses precision for close pairs.

    Args:
        X: ``(n, d)`` points.
        k: Neighbours per point, ``1 <= k < n``.

    Returns:
        ``(indices, distances)``, both ``(n, k)``, each row sorted by ascending distance.
    """
    X = np.asarray(X, np.float64)
    k = _check_knn(k, X.shape[0])
    indices = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(return_distance=False)
    distances = np.empty(indices.shape, np.float64)
    chunk = max(1, _ROW_CHUNK_ELEMENTS // (k * max(X.shape[1], 1)))
    for start in range(0, X.shape[0], chunk):
        rows = slice(start, start + chunk)
        diff = X[indices[rows]] - X[rows, None, :]
        distances[rows] = np.sqrt(np.einsum("ikd,ikd->ik", diff, diff))
    order = np.argsort(distances, axis=1, kind="stable")
    return np.take_along_axis(indices, order, 1), np.take_along_axis(distances, order, 1)


def _median_distance(Z: np.ndarray) -> float:
    if Z.shape[0] > MEDIAN_SAMPLE:
        Z = Z[np.random.default_rng(MEDIAN_SEED).choice(Z.shape[0], MEDIAN_SAMPLE, replace=False)]
    return float(np.median(pdist(Z)))


def _sigma_floor(Z: np.ndarray) -> float:
    """``SIGMA_FLOOR`` times the diagonal of the bounding box (never so small that σᵢσⱼ underflows)."""
    scale = float(np.linalg.norm(np.ptp(Z, axis=0)))  # no (n, d) temporary
    return max(SIGMA_FLOOR * scale, float(np.sqrt(np.finfo(np.float64).tiny)))


def diffusion_kernel(
    X: np.ndarray,
    *,
    knn: int = 15,
    bandwidth: str | float = "adaptive",
    sparse: bool = True,
    self_loops: bool = True,
    n_pca: int | None = None,
) -> tuple[np.ndarray | sp.csr_matrix, np.ndarray]:
    """The Gaussian kernel Kᵢⱼ = exp(-dᵢⱼ² / (σᵢσⱼ)) of a point cloud.

    Bandwidths: ``"adaptive"`` σᵢ is the distance to the ``knn``-th neighbour other
    than i; ``"median"`` is the median of all pairwise distances, computed on a
    subsample of ``MEDIAN_SAMPLE`` = 2,000 points (seed ``MEDIAN_SEED``) when n is
    larger; a float is used as given. Adaptive and median bandwidths are floored at
    ``SIGMA_FLOOR`` (1e-6) times the diagonal of the points' bounding box, so
    that a point with at least ``knn`` exact duplicates (σᵢ = 0) gets a tiny positive
    σᵢ instead of NaN or inf weights; only such near-duplicates are affected.

    Args:
        X: ``(n, d)`` points, finite, not all identical.
        knn: Neighbours for the adaptive bandwidth and the sparse pattern, ``1 <= knn < n``.
        bandwidth: ``"adaptive"``, ``"median"`` or a positive float.
        sparse: Keep only the symmetrized kNN pairs (a ``csr_matrix``, O(n · knn)
            memory) instead of all pairs (a dense ndarray, O(n²); warns above n = 5,000).
        self_loops: Keep Kᵢᵢ = 1; ``False`` zeroes the diagonal.
        n_pca: Project on this many principal components first (``None``: no PCA).

    Returns:
        ``(K, sigma)``: the symmetric ``(n, n)`` kernel and the ``(n,)`` bandwidths.
    """
    X = check_points(X)
    n = X.shape[0]
    _check_bandwidth(bandwidth)
    if sparse or bandwidth == "adaptive":
        knn = _check_knn(knn, n)
    if not sparse and n > DENSE_WARN_N:
        warnings.warn(f"the dense kernel (sparse=False) on n={n} points needs O(n²) memory "
                      f"(~{8 * n * n / 2**30:.1f} GiB per n x n array); use sparse=True for large n",
                      UserWarning, stacklevel=2)
    Z = _project(X, n_pca)
    floor = _sigma_floor(Z)
    if sparse:
        indices, distances = knn_distances(Z, knn)
        sigma = _bandwidths(Z, bandwidth, knn, floor, distances[:, knn - 1].copy())
        return _sparse_kernel(indices, distances, sigma, self_loops), sigma
    dist = squareform(pdist(Z))  # each pair once, so the matrix is exactly symmetric
    kth = None
    if bandwidth == "adaptive":
        np.fill_diagonal(dist, np.inf)  # i is not its own neighbour; duplicates are
        kth = np.partition(dist, knn - 1, axis=1)[:, knn - 1]
        np.fill_diagonal(dist, 0.0)
    sigma = _bandwidths(Z, bandwidth, knn, floor, kth)
    K = np.exp(-(dist**2) / np.outer(sigma, sigma))
    np.fill_diagonal(K, 1.0 if self_loops else 0.0)
    return K, sigma


def _bandwidths(Z: np.ndarray, bandwidth: str | float, knn: int, floor: float,
                kth: np.ndarray | None) -> np.ndarray:
    """``(n,)`` bandwidths σᵢ: ``kth`` (each point's distance to its ``knn``-th neighbour)
    floored at ``floor`` (``"adaptive"``), the floored median distance, or the float given."""
    n = Z.shape[0]
    if bandwidth == "adaptive":
        return np.maximum(kth, floor)
    if bandwidth == "median":
        return np.full(n, max(_median_distance(Z), floor))
    return np.full(n, float(bandwidth))


def _sparse_kernel(indices: np.ndarray, distances: np.ndarray, sigma: np.ndarray, self_loops: bool) -> sp.csr_matrix:
    """The symmetrized kNN kernel from each row's ``(n, knn)`` neighbours and distances."""
    n, knn = indices.shape
    rows = np.repeat(np.arange(n), knn)
    cols = indices.ravel()
    weights = np.exp(-(distances.ravel() ** 2) / (sigma[rows] * sigma[cols]))
    K = sp.csr_matrix((weights, (rows, cols)), shape=(n, n))
    # d(i, j) and d(j, i) are computed from negated differences, so both directions carry
    # the same weight and the elementwise maximum is the union of the two kNN patterns.
    K = K.maximum(K.T)
    if self_loops:  # i is never its own kNN neighbour, so the diagonal is still empty
        K = K + sp.identity(n, format="csr")
    K = K.tocsr()
    K.eliminate_zeros()  # pairs whose weight underflowed to 0 are not stored
    K.sort_indices()
    return K
