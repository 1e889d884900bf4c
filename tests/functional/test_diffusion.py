"""lm_probe.functional.diffusion against dense float64 references written out in the most direct way."""

import tracemalloc
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import cdist
from sklearn.decomposition import PCA

import lm_probe.functional.diffusion as diffusion
from lm_probe.functional.diffusion import (
    DiffusionResult, diffuse, diffusion_eigenvalues, diffusion_operator, spectral_entropy,
)
from lm_probe.functional.kernel import diffusion_kernel, knn_distances


def points(n=120, d=5, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


# ---------------------------------------------------------------- references (dense, explicit)

def ref_sigma(X, knn):
    D = cdist(X, X)
    return np.array([np.sort(np.delete(D[i], i))[knn - 1] for i in range(len(X))])


def ref_knn_mask(X, knn):
    """mask[i, j]: j is among i's knn nearest neighbours (i itself excluded) or i among j's."""
    D = cdist(X, X)
    n = len(X)
    mask = np.zeros((n, n), bool)
    for i in range(n):
        others = [j for j in np.argsort(D[i], kind="stable") if j != i][:knn]
        mask[i, others] = True
    return mask | mask.T


def ref_kernel(X, sigma, self_loops=True, mask=None):
    D = cdist(X, X)
    n = len(X)
    K = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i == j:
                K[i, j] = 1.0 if self_loops else 0.0
            elif mask is None or mask[i, j]:
                K[i, j] = np.exp(-D[i, j] ** 2 / (sigma[i] * sigma[j]))
    return K


def ref_operators(K, alpha):
    """(P, A): Coifman-Lafon anisotropy, then the row-stochastic P and the symmetric A."""
    d = K.sum(axis=1)
    Ka = K / np.outer(d**alpha, d**alpha)
    d = Ka.sum(axis=1)
    return Ka / d[:, None], Ka / np.sqrt(np.outer(d, d))


def dense(M):
    return M.toarray() if sp.issparse(M) else np.asarray(M)


def ref_eigenvalues(P, k):
    """The top k eigenvalues of the (non-symmetric) P by a general eigensolver, test-only."""
    return np.sort(np.linalg.eigvals(P).real)[::-1][:k]


# ---------------------------------------------------------------- neighbours and kernels

def test_knn_distances_match_cdist():
    X = points(80)
    idx, dist = knn_distances(X, 6)
    D = cdist(X, X)
    np.fill_diagonal(D, np.inf)
    assert idx.shape == dist.shape == (80, 6)
    np.testing.assert_array_equal(idx, np.argsort(D, axis=1)[:, :6])
    np.testing.assert_allclose(dist, np.sort(D, axis=1)[:, :6], rtol=0, atol=1e-13)
    assert not np.any(idx == np.arange(80)[:, None])


def test_knn_duplicates_are_neighbours_but_self_is_not():
    X = np.vstack([np.zeros((4, 2)), points(20, 2)])
    idx, dist = knn_distances(X, 3)
    for i in range(4):
        assert set(idx[i]) == set(range(4)) - {i}
        np.testing.assert_array_equal(dist[i], 0.0)


@pytest.mark.parametrize("self_loops", [True, False])
def test_dense_kernel_matches_reference(self_loops):
    X = points()
    K, sigma = diffusion_kernel(X, knn=7, sparse=False, self_loops=self_loops)
    np.testing.assert_allclose(sigma, ref_sigma(X, 7), rtol=1e-13)
    assert isinstance(K, np.ndarray)
    np.testing.assert_allclose(K, ref_kernel(X, ref_sigma(X, 7), self_loops), rtol=0, atol=1e-13)


@pytest.mark.parametrize("self_loops", [True, False])
def test_sparse_kernel_is_the_union_of_knn_patterns(self_loops):
    X = points()
    K, sigma = diffusion_kernel(X, knn=7, self_loops=self_loops)
    assert isinstance(K, sp.csr_matrix)
    mask = ref_knn_mask(X, 7)
    expected_pattern = mask | (np.eye(len(X), dtype=bool) if self_loops else False)
    np.testing.assert_array_equal(dense(K) != 0, expected_pattern)
    np.testing.assert_allclose(dense(K), ref_kernel(X, ref_sigma(X, 7), self_loops, mask), rtol=0, atol=1e-13)
    assert abs(K - K.T).max() == 0


def test_fixed_bandwidth():
    X = points()
    K, sigma = diffusion_kernel(X, bandwidth=1.7, sparse=False)
    np.testing.assert_array_equal(sigma, 1.7)
    np.testing.assert_allclose(K, ref_kernel(X, np.full(len(X), 1.7)), rtol=0, atol=1e-13)
    Ks, _ = diffusion_kernel(X, knn=5, bandwidth=1.7)
    mask = ref_knn_mask(X, 5)
    np.testing.assert_allclose(dense(Ks), ref_kernel(X, np.full(len(X), 1.7), True, mask), rtol=0, atol=1e-13)


def test_median_bandwidth():
    X = points()
    D = cdist(X, X)
    median = np.median(D[np.triu_indices(len(X), 1)])
    K, sigma = diffusion_kernel(X, bandwidth="median", sparse=False)
    np.testing.assert_allclose(sigma, median, rtol=1e-14)
    np.testing.assert_allclose(K, ref_kernel(X, sigma), rtol=0, atol=1e-13)


def test_median_bandwidth_on_a_seeded_subsample_for_large_n():
    X = points(2_500, 2, seed=1)
    _, sigma = diffusion_kernel(X, knn=3, bandwidth="median")
    _, again = diffusion_kernel(X, knn=3, bandwidth="median")
    full = np.median(cdist(X, X)[np.triu_indices(len(X), 1)])
    assert sigma[0] == again[0]  # deterministic
    assert abs(sigma[0] / full - 1) < 0.05  # 2,000 of 2,500 points: close to the full median


def test_n_pca_projects_before_distances():
    X = points(100, 12)
    Z = PCA(n_components=3, svd_solver="full").fit_transform(X)
    K, sigma = diffusion_kernel(X, knn=6, sparse=False, n_pca=3)
    np.testing.assert_allclose(sigma, ref_sigma(Z, 6), rtol=1e-12)
    np.testing.assert_allclose(K, ref_kernel(Z, ref_sigma(Z, 6)), rtol=0, atol=1e-12)
    # all components: a rotation, so the same kernel as without PCA
    K_all, _ = diffusion_kernel(X, knn=6, sparse=False, n_pca=12)
    np.testing.assert_allclose(K_all, diffusion_kernel(X, knn=6, sparse=False)[0], rtol=0, atol=1e-10)


# ---------------------------------------------------------------- operators

@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_operators_match_reference(sparse, alpha):
    X = points()
    K, _ = diffusion_kernel(X, knn=7, sparse=sparse)
    P_ref, A_ref = ref_operators(dense(K), alpha)
    P, A = diffusion_operator(K, alpha=alpha, normalization="markov")
    assert sp.issparse(P) == sp.issparse(A) == sparse
    np.testing.assert_allclose(dense(P), P_ref, rtol=0, atol=1e-13)
    np.testing.assert_allclose(dense(A), A_ref, rtol=0, atol=1e-13)
    S, A2 = diffusion_operator(K, alpha=alpha, normalization="symmetric")
    np.testing.assert_allclose(dense(S), A_ref, rtol=0, atol=1e-13)
    assert S is A2


@pytest.mark.parametrize("normalization", ["markov", "symmetric"])
def test_alpha_changes_the_operator(normalization):
    # regression: manylatents ignored alpha unless the normalization was symmetric
    X = np.vstack([points(100, 3), 0.05 * points(50, 3, seed=1)])  # uneven density
    plain = dense(diffuse(X, knn=8, alpha=0.0, normalization=normalization).operator)
    corrected = dense(diffuse(X, knn=8, alpha=1.0, normalization=normalization).operator)
    assert np.abs(plain - corrected).max() > 1e-3


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_markov_rows_sum_to_one_and_symmetric_is_symmetric(sparse, alpha):
    X = points()
    P = dense(diffuse(X, knn=7, sparse=sparse, alpha=alpha).operator)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=0, atol=1e-13)
    assert (P >= 0).all()
    A = dense(diffuse(X, knn=7, sparse=sparse, alpha=alpha, normalization="symmetric").operator)
    np.testing.assert_array_equal(A, A.T)


# ---------------------------------------------------------------- eigenvalues

@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_eigenvalues_equal_those_of_the_dense_markov_matrix(sparse, alpha):
    X = points()
    result = diffuse(X, knn=7, sparse=sparse, alpha=alpha, n_eigs=20)
    reference = ref_eigenvalues(dense(result.operator), 20)
    assert result.eigenvalues.dtype == np.float64 and result.eigenvalues.shape == (20,)
    np.testing.assert_allclose(result.eigenvalues, reference, rtol=0, atol=1e-8)
    symmetric = diffuse(X, knn=7, sparse=sparse, alpha=alpha, n_eigs=20, normalization="symmetric")
    np.testing.assert_allclose(symmetric.eigenvalues, reference, rtol=0, atol=1e-8)


def test_whole_spectrum_and_bounds():
    X = points(60)
    result = diffuse(X, knn=5, self_loops=False, n_eigs=1_000)  # capped at n
    assert result.eigenvalues.shape == (60,)
    assert np.all(np.diff(result.eigenvalues) <= 0)
    np.testing.assert_allclose(result.eigenvalues, ref_eigenvalues(dense(result.operator), 60), atol=1e-8)
    assert result.eigenvalues[0] == pytest.approx(1.0, abs=1e-12)  # connected graph
    assert np.abs(result.eigenvalues).max() <= 1 + 1e-12
    assert result.eigenvalues.min() < 0  # without self-loops the walk has negative eigenvalues


def test_sparse_eigensolver_matches_dense(monkeypatch):
    X = points(300, 4)
    K, _ = diffusion_kernel(X, knn=10)
    _, A = diffusion_operator(K)
    dense_values = diffusion_eigenvalues(A, 12)
    monkeypatch.setattr(diffusion, "DENSE_EIGEN_MAX_N", 10)
    sparse_values = diffusion_eigenvalues(A, 12)
    np.testing.assert_allclose(sparse_values, dense_values, rtol=0, atol=1e-10)
    np.testing.assert_allclose(sparse_values, np.sort(np.linalg.eigvalsh(A.toarray()))[::-1][:12], atol=1e-10)


def test_two_components_have_two_unit_eigenvalues_and_no_gap():
    X = np.vstack([points(40, 2), points(40, 2, seed=1) + 1_000.0])
    result = diffuse(X, knn=5)
    np.testing.assert_allclose(result.eigenvalues[:2], 1.0, atol=1e-10)
    assert result.spectral_gap == pytest.approx(0.0, abs=1e-10)


def test_spectral_gap_and_entropy_of_the_result():
    result = diffuse(points(), knn=7, n_eigs=16, t=3)
    lam = result.eigenvalues
    assert result.spectral_gap == pytest.approx(1 - lam[1], abs=1e-15)
    p = np.abs(lam) ** 3 / np.sum(np.abs(lam) ** 3)
    assert result.entropy == pytest.approx(-np.sum(p * np.log(p)), rel=1e-13)
    assert isinstance(result, DiffusionResult)
    assert result.sigma.shape == (120,)


@pytest.mark.parametrize(
    "eigenvalues, t, expected",
    [
        ([1.0, 0.0, 0.0], 1, 0.0),
        ([1.0, 1.0], 1, np.log(2)),
        ([1.0, -1.0, 1.0, -1.0], 2, np.log(4)),
        ([1.0, 0.5], 1, -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))),
        ([1.0, 0.5], 2, -(0.8 * np.log(0.8) + 0.2 * np.log(0.2))),
        ([0.0, 0.0], 1, np.nan),
    ],
)
def test_entropy_formula(eigenvalues, t, expected):
    np.testing.assert_allclose(spectral_entropy(np.array(eigenvalues), t), expected, rtol=1e-14)


def test_entropy_falls_with_diffusion_time():
    lam = diffuse(points(), knn=7).eigenvalues
    assert spectral_entropy(lam, 1) > spectral_entropy(lam, 4) > spectral_entropy(lam, 16)


# ---------------------------------------------------------------- compatibility

def manylatents_diffusion_gauge(X, k=15):
    """The manylatents DiffusionGauge default, restated: a dense Gaussian kernel with an
    adaptive bandwidth σᵢ = distance to the k-th neighbour, weights exp(-d²/(σᵢσⱼ)), no
    self-loops, no anisotropy, then each row divided by its sum."""
    D = cdist(X, X)
    sigma = np.sort(D, axis=1)[:, k]  # column 0 is the point itself
    K = np.exp(-(D**2) / np.outer(sigma, sigma))
    np.fill_diagonal(K, 0.0)
    return K / K.sum(axis=1, keepdims=True)


def test_manylatents_default_is_reproduced():
    X = points(150, 8)
    ours = diffuse(X, sparse=False, self_loops=False, alpha=0, normalization="markov", knn=15).operator
    np.testing.assert_allclose(ours, manylatents_diffusion_gauge(X), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(knn=0), "knn must be an integer >= 1"),
        (dict(knn=2.5), "knn must be an integer"),
        (dict(knn=30), r"n=30.*knn <= 29 or collect more samples"),
        (dict(knn=31), "n=30"),
        (dict(alpha=-0.1), r"alpha must be in \[0, 1\]"),
        (dict(alpha=1.5), r"alpha must be in \[0, 1\]"),
        (dict(normalization="laplacian"), "unknown normalization 'laplacian'"),
        (dict(bandwidth="silverman"), "unknown bandwidth 'silverman'"),
        (dict(bandwidth=0.0), "positive finite float"),
        (dict(bandwidth=-1.0), "positive finite float"),
        (dict(bandwidth=float("nan")), "positive finite float"),
        (dict(n_eigs=0), "n_eigs must be an integer >= 1"),
        (dict(t=0), "t must be > 0"),
        (dict(n_pca=0), "n_pca"),
        (dict(n_pca=6), r"n_pca=6 exceeds min\(n, d\)=5"),
    ],
)
def test_bad_options(kwargs, message):
    X = points(30)
    with pytest.raises(ValueError, match=message):
        diffuse(X, **{"knn": 5, **kwargs})


def test_knn_is_not_needed_for_a_dense_fixed_bandwidth():
    assert diffuse(points(10), knn=15, bandwidth=1.0, sparse=False).eigenvalues[0] == pytest.approx(1.0)


def test_non_finite_rows_are_counted():
    X = points(30)
    X[3, 1], X[7, 0], X[7, 2] = np.nan, np.inf, -np.inf
    with pytest.raises(ValueError, match="2 of 30 rows"):
        diffuse(X, knn=5)


@pytest.mark.parametrize("X", [np.zeros((20, 3)), np.ones((5, 2)) * 3.0])
def test_identical_points_have_no_geometry(X):
    with pytest.raises(ValueError, match="identical"):
        diffuse(X, knn=2)


@pytest.mark.parametrize("X", [np.zeros(5), np.zeros((1, 3))])
def test_bad_shapes(X):
    with pytest.raises(ValueError, match="2-D|at least 2 points"):
        diffuse(X, knn=1)


@pytest.mark.parametrize(
    "K, message",
    [
        (np.array([[1.0, 0.5], [0.2, 1.0]]), "symmetric"),
        (np.array([[1.0, -0.5], [-0.5, 1.0]]), "non-negative"),
        (np.ones((2, 3)), "square"),
    ],
)
def test_operator_rejects_bad_kernels(K, message):
    with pytest.raises(ValueError, match=message):
        diffusion_operator(K)


def test_an_isolated_point_stays_finite_and_warns():
    K = sp.csr_matrix(np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.warns(UserWarning, match="1 point"):
        P, A = diffusion_operator(K, alpha=0.5)
    np.testing.assert_array_equal(dense(P), [[0, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert np.isfinite(dense(A)).all()


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("self_loops", [True, False])
@pytest.mark.parametrize("bandwidth", ["adaptive", "median"])
def test_duplicate_points_give_finite_operators(sparse, self_loops, bandwidth):
    # 45 copies of one point (>= knn duplicates, so its adaptive σ is 0 before the
    # floor) and 10 of another: most pairwise distances are 0, and so is the median
    X = np.vstack([np.zeros((45, 3)), np.ones((10, 3)), points(5, 3)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a point may end up isolated
        result = diffuse(X, knn=5, sparse=sparse, self_loops=self_loops, bandwidth=bandwidth)
    P = dense(result.operator)
    assert np.isfinite(P).all() and np.isfinite(result.eigenvalues).all() and np.isfinite(result.entropy)
    assert (result.sigma > 0).all()
    rows = P.sum(axis=1)
    np.testing.assert_allclose(rows[rows > 0], 1.0, atol=1e-12)
    np.testing.assert_allclose(P[:45, :45].sum(axis=1), 1.0, atol=1e-12)  # the duplicates diffuse among themselves


def test_dense_path_warns_before_heavy_work():
    X = np.random.default_rng(0).normal(size=(5_001, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # turn the warning into an exception: stops the work
        with pytest.raises(UserWarning, match=r"O\(n²\) memory"):
            diffuse(X, knn=2, sparse=False)
        diffuse(X[:50], knn=2, sparse=False)  # no warning below the threshold


def test_sparse_path_memory_is_linear_in_n():
    n, knn = 3_000, 10
    X = np.random.default_rng(0).normal(size=(n, 3))
    tracemalloc.start()
    try:
        result = diffuse(X, knn=knn, n_eigs=8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(result.operator, sp.csr_matrix)
    assert result.operator.nnz <= 2 * n * knn + n
    assert peak < n * n * 8 / 8  # an eighth of one dense n x n float64 array
    assert result.eigenvalues[0] == pytest.approx(1.0, abs=1e-10)
