"""Diffusion operators on a point cloud, as pure functions on float64 arrays.

A diffusion operator turns a cloud of activation rows into a random walk: each point
spreads its mass over nearby points with Gaussian weights, and the spectrum of that
walk says how fast mass mixes (the spectral gap) and over how many directions it
spreads (the spectral entropy). The definitions, for rows ``X`` of shape ``(n, d)``:

* distances dᵢⱼ are Euclidean, optionally after a deterministic PCA to ``n_pca`` dims;
* the bandwidth σᵢ is ``"adaptive"``: the distance from i to its ``knn``-th nearest
  neighbour other than itself; a float: the same σ for every point; or ``"median"``:
  the median of the pairwise distances;
* the kernel is Kᵢⱼ = exp(-dᵢⱼ² / (σᵢσⱼ)). The sparse kernel keeps the pairs where j
  is among i's ``knn`` neighbours *or* i among j's, so K is symmetric; the dense one
  keeps all pairs. Self-loops Kᵢᵢ = 1 are kept unless ``self_loops=False``;
* anisotropy ``alpha`` (Coifman & Lafon) first replaces K by D^-α K D^-α with D the
  row sums of K, whatever the normalization;
* ``"markov"`` gives P = D⁻¹K (rows sum to 1) and ``"symmetric"`` gives
  A = D^-½ K D^-½, with D the row sums of the (anisotropy-corrected) K.

P = D^-½ A D^½ is similar to A, so the eigenvalues of either operator are computed
from the symmetric A with a symmetric eigensolver: real by construction and in
[-1, 1]. ``eig`` is never called on the non-symmetric P.

On the sparse path nothing is O(n²): beyond the input (and its PCA), every array is
O(n · knn) or a bounded chunk. The neighbour search is chunked by scikit-learn; the
kernel, degrees and conjugate stay ``scipy.sparse`` matrices; the eigenvalues come
from ARPACK above n = 2,000 (a dense solve below, at most 2,000²). The dense path
(``sparse=False``) is O(n²) and warns above n = 5,000. The consumer that streams
activations into these functions holds the state.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh
from scipy.spatial.distance import pdist, squareform
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

__all__ = [
    "DiffusionResult", "knn_distances", "diffusion_kernel", "diffusion_operator",
    "diffusion_eigenvalues", "spectral_entropy", "diffuse",
]

NORMALIZATIONS = ("markov", "symmetric")
DENSE_EIGEN_MAX_N = 2_000  #: up to this n the eigenvalues come from a dense ``eigvalsh``
DENSE_WARN_N = 5_000  #: above this n the dense kernel warns about its O(n²) memory
MEDIAN_SAMPLE = 2_000  #: the median bandwidth is computed on at most this many points
MEDIAN_SEED = 0  #: seed of that subsample
SIGMA_FLOOR = 1e-6  #: bandwidths are floored at this fraction of the data scale
_ROW_CHUNK_ELEMENTS = 1 << 20  # float64 elements (8 MiB) per chunk when recomputing neighbour distances


@dataclass(frozen=True)
class DiffusionResult:
    """The output of :func:`diffuse`.

    Attributes:
        operator: ``(n, n)`` P (markov) or A (symmetric); a ``csr_matrix`` when the
            kernel is sparse, else an ndarray.
        eigenvalues: The top ``n_eigs`` eigenvalues, descending, float64.
        sigma: ``(n,)`` bandwidths used (after the floor).
        spectral_gap: 1 - λ₂ (NaN when only one eigenvalue was asked for).
        entropy: :func:`spectral_entropy` of ``eigenvalues`` at diffusion time ``t``.
    """

    operator: np.ndarray | sp.csr_matrix
    eigenvalues: np.ndarray
    sigma: np.ndarray
    spectral_gap: float
    entropy: float


def _check_points(X: np.ndarray) -> np.ndarray:
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


def _check_int(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_knn(knn: object, n: int) -> int:
    knn = _check_int("knn", knn)
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


def _check_operator_options(alpha: object, normalization: object) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (0: no anisotropy correction, 1: Laplace-Beltrami), got {alpha!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; use 'markov' or 'symmetric'")


def _project(X: np.ndarray, n_pca: int | None) -> np.ndarray:
    if n_pca is None:
        return X
    n_pca = _check_int("n_pca", n_pca)
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
    X = _check_points(X)
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
    else:
        dist = squareform(pdist(Z))  # each pair once, so the matrix is exactly symmetric
    if bandwidth == "adaptive":
        if sparse:
            sigma = distances[:, knn - 1].copy()
        else:
            np.fill_diagonal(dist, np.inf)  # i is not its own neighbour; duplicates are
            sigma = np.partition(dist, knn - 1, axis=1)[:, knn - 1]
            np.fill_diagonal(dist, 0.0)
        sigma = np.maximum(sigma, floor)
    elif bandwidth == "median":
        sigma = np.full(n, max(_median_distance(Z), floor))
    else:
        sigma = np.full(n, float(bandwidth))

    if not sparse:
        K = np.exp(-(dist**2) / np.outer(sigma, sigma))
        np.fill_diagonal(K, 1.0 if self_loops else 0.0)
        return K, sigma
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
    return K, sigma


def _inverse_power(degrees: np.ndarray, power: float) -> np.ndarray:
    """``degrees ** -power`` with 0 for isolated points (degree 0) instead of inf."""
    out = np.zeros_like(degrees)
    positive = degrees > 0
    out[positive] = degrees[positive] ** -power
    return out


def _scale(K: np.ndarray | sp.spmatrix, left: np.ndarray, right: np.ndarray) -> np.ndarray | sp.csr_matrix:
    """diag(left) K diag(right), keeping K's sparsity."""
    if sp.issparse(K):
        return (sp.diags(left) @ K @ sp.diags(right)).tocsr()
    return left[:, None] * K * right[None, :]


def _row_sums(K: np.ndarray | sp.spmatrix) -> np.ndarray:
    return np.asarray(K.sum(axis=1), np.float64).ravel()


def diffusion_operator(
    K: np.ndarray | sp.spmatrix, *, alpha: float = 0.0, normalization: str = "markov"
) -> tuple[np.ndarray | sp.csr_matrix, np.ndarray | sp.csr_matrix]:
    """Normalize a symmetric non-negative kernel into a diffusion operator.

    First the anisotropy correction K ← D^-α K D^-α (D the row sums of K), for both
    normalizations; then P = D⁻¹K (``"markov"``) or A = D^-½ K D^-½ (``"symmetric"``)
    with D the row sums of the corrected K. A point whose kernel row is all zero (it
    can happen without self-loops, for a point far from its neighbours relative to
    their bandwidths) stays isolated: its row of the operator is zero and a warning
    says how many there are.

    Args:
        K: ``(n, n)`` symmetric kernel with non-negative entries, dense or sparse.
        alpha: Anisotropy in [0, 1]; 0 keeps K, 1 removes the effect of the sampling density.
        normalization: ``"markov"`` or ``"symmetric"``.

    Returns:
        ``(operator, A)``: P or A, and the symmetric conjugate A = D^-½ K D^-½ whose
        eigenvalues are the operator's (the same object twice for ``"symmetric"``).
        Sparse input gives ``csr_matrix`` outputs.
    """
    _check_operator_options(alpha, normalization)
    K = sp.csr_matrix(K, dtype=np.float64) if sp.issparse(K) else np.asarray(K, np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"K must be a square (n, n) kernel, got shape {K.shape}")
    values = K.data if sp.issparse(K) else K
    if values.size and (not np.isfinite(values).all() or values.min() < 0):
        raise ValueError("K must be finite and non-negative; build it with diffusion_kernel")
    largest = float(values.max()) if values.size else 0.0
    asymmetry = float(abs(K - K.T).max()) if values.size else 0.0
    if asymmetry > 1e-12 * max(largest, 1.0):
        raise ValueError(f"K must be symmetric (max |K - Kᵀ| = {asymmetry:.3g}); "
                         "symmetrize it first, e.g. (K + K.T) / 2")
    if alpha > 0:
        q = _inverse_power(_row_sums(K), alpha)
        K = _scale(K, q, q)
    degrees = _row_sums(K)
    isolated = int(np.count_nonzero(degrees <= 0))
    if isolated:
        warnings.warn(f"{isolated} point(s) have no kernel weight and stay isolated (zero rows); "
                      "use self_loops=True or a larger knn", UserWarning, stacklevel=2)
    half = _inverse_power(degrees, 0.5)
    A = _scale(K, half, half)
    A = (A + A.T) / 2  # exact symmetry, against round-off in the two scalings
    A = A.tocsr() if sp.issparse(A) else A
    if normalization == "symmetric":
        return A, A
    return _scale(K, _inverse_power(degrees, 1.0), np.ones_like(degrees)), A


def diffusion_eigenvalues(A_symmetric: np.ndarray | sp.spmatrix, n_eigs: int) -> np.ndarray:
    """The top eigenvalues of a symmetric diffusion operator, descending.

    Dense ``np.linalg.eigvalsh`` of (A + Aᵀ)/2 when n <= ``DENSE_EIGEN_MAX_N`` (2,000)
    or ``n_eigs >= n - 1`` (ARPACK needs k < n; this densifies a large sparse A);
    otherwise ``scipy.sparse.linalg.eigsh(which="LA")`` from a seeded start vector, which
    finds the largest algebraic eigenvalues: the spectrum lies in [-1, 1] and the top
    ones are wanted. Round-off outside [-1, 1] (at most n · eps) is clipped back, and
    eigenvalues with ``|λ| <= n · eps`` are set to 0. Negative eigenvalues are legitimate
    here, so :func:`lm_probe.functional.spectra.clip_eigenvalues` (which zeroes them) is not used.

    Args:
        A_symmetric: ``(n, n)`` symmetric operator, dense or sparse.
        n_eigs: How many to return (capped at n).

    Returns:
        ``(min(n_eigs, n),)`` float64 eigenvalues, descending.
    """
    n = A_symmetric.shape[0]
    n_eigs = min(_check_int("n_eigs", n_eigs), n)
    if n <= DENSE_EIGEN_MAX_N or n_eigs >= n - 1:
        A = A_symmetric.toarray() if sp.issparse(A_symmetric) else np.asarray(A_symmetric, np.float64)
        values = np.linalg.eigvalsh((A + A.T) / 2)
    else:
        A = sp.csr_matrix(A_symmetric, dtype=np.float64)
        v0 = np.random.default_rng(0).uniform(-1.0, 1.0, n)
        values = eigsh((A + A.T) / 2, k=n_eigs, which="LA", v0=v0, return_eigenvectors=False)
    values = np.sort(np.asarray(values, np.float64))[::-1][:n_eigs]
    tol = n * np.finfo(np.float64).eps
    values = np.where(np.abs(values) <= tol, 0.0, values)
    return np.where(np.abs(values) - 1.0 <= tol, np.clip(values, -1.0, 1.0), values)


def spectral_entropy(eigenvalues: np.ndarray, t: float = 1) -> float:
    """Von Neumann entropy of the normalized spectrum of Pᵗ.

    p = |λ|ᵗ / Σ|λ|ᵗ and H = -Σ p ln p over p > 0, in nats. The sum runs over the
    eigenvalues given: for :func:`diffuse`, the top ``n_eigs`` computed, not the
    whole spectrum.

    Args:
        eigenvalues: Operator eigenvalues (any order).
        t: Diffusion time, > 0.

    Returns:
        H, between 0 and ln(number of eigenvalues); NaN when all are 0.
    """
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not t > 0:
        raise ValueError(f"diffusion time t must be > 0, got {t!r}")
    weights = np.abs(np.asarray(eigenvalues, np.float64)) ** t
    total = weights.sum()
    if not total > 0:
        return float("nan")
    p = weights[weights > 0] / total
    return float(-np.sum(p * np.log(p)))


def diffuse(
    X: np.ndarray,
    *,
    knn: int = 15,
    bandwidth: str | float = "adaptive",
    sparse: bool = True,
    self_loops: bool = True,
    alpha: float = 0.0,
    normalization: str = "markov",
    n_eigs: int = 32,
    t: float = 1,
    n_pca: int | None = None,
) -> DiffusionResult:
    """Kernel, operator, eigenvalues, spectral gap and entropy of a point cloud.

    All options are checked before any distance is computed. See
    :func:`diffusion_kernel`, :func:`diffusion_operator`, :func:`diffusion_eigenvalues`
    and :func:`spectral_entropy` for each stage; ``n_eigs`` above n is capped at n.

    Args:
        X: ``(n, d)`` points.
        knn, bandwidth, sparse, self_loops, n_pca: As in :func:`diffusion_kernel`.
        alpha, normalization: As in :func:`diffusion_operator`.
        n_eigs: Number of top eigenvalues to compute, >= 1.
        t: Diffusion time of the entropy.

    Returns:
        A :class:`DiffusionResult`.
    """
    _check_operator_options(alpha, normalization)
    _check_int("n_eigs", n_eigs)
    spectral_entropy(np.ones(1), t)  # validates t
    K, sigma = diffusion_kernel(X, knn=knn, bandwidth=bandwidth, sparse=sparse,
                                self_loops=self_loops, n_pca=n_pca)
    operator, A = diffusion_operator(K, alpha=alpha, normalization=normalization)
    eigenvalues = diffusion_eigenvalues(A, n_eigs)
    gap = float(1.0 - eigenvalues[1]) if eigenvalues.size > 1 else float("nan")
    return DiffusionResult(operator=operator, eigenvalues=eigenvalues, sigma=sigma,
                           spectral_gap=gap, entropy=spectral_entropy(eigenvalues, t))
