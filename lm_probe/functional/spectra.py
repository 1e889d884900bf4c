"""The geometry of a set of activation rows, as pure functions on float64 arrays.

Definitions (λ the covariance eigenvalues, sorted descending and clipped at 0;
p = λ / Σλ; D the hidden size; the covariance divides by n - 1):

* participation ratio ``d_pr`` = (Σλ)² / Σλ², entropy dimension ``d_entropy`` =
  exp(-Σ p ln p), ``stable_rank`` = Σλ / λ₁, top-k shares, ``k90`` / ``k95``, and the
  slope of ln λᵢ against i for i = 10 ... min(200, D) - 1;
* on a sample: singular-value effective rank, stable rank, participation ratio,
  explained-variance shares, and pairwise cosine similarity of the raw rows;
* between two sites with paired rows: linear CKA from the cross-covariance, mean
  row cosine, and subspace novelty from principal angles.

The stateful :class:`lm_probe.consumers.geometry.Geometry` streams the moments these need and
calls these functions in ``compute()``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "clip_eigenvalues", "covariance_eigh", "spectrum_metrics", "sample_metrics", "linear_cka",
    "subspace_novelty", "normalize_rows", "SPECTRUM_KEYS", "SAMPLE_KEYS",
]

SPECTRUM_KEYS = ("d_pr", "d_pr_norm", "d_entropy", "d_entropy_norm", "stable_rank", "top1_share",
                 "top10_share", "top32_share", "k90", "k95", "log_spectrum_slope_10_200")
SAMPLE_KEYS = ("sv_effective_rank", "sv_stable_rank", "sv_participation_ratio", "ve_4", "ve_8", "ve_16",
               "ve_32", "cos_sim_mean", "cos_sim_std")


def clip_eigenvalues(values: np.ndarray) -> np.ndarray:
    """Sort descending and zero eigenvalues below a dtype-relative tolerance.

    Round-off makes the eigenvalues of a PSD matrix slightly negative; anything with
    ``|λ| <= max(λ) * D * eps(float64)`` is treated as zero (as scikit-learn's
    ``_check_psd_eigenvalues`` does), and clearly negative values are a bug upstream.
    """
    values = np.sort(np.asarray(values, np.float64))[::-1]
    if values.size == 0:
        return values
    tol = max(float(np.abs(values).max()), 0.0) * values.size * np.finfo(np.float64).eps
    return np.where(values > tol, values, 0.0)


def covariance_eigh(scatter: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of the sample covariance ``scatter / (n - 1)``.

    Args:
        scatter: ``(D, D)`` sum of outer products of centered rows.
        n: Number of rows (at least 2).

    Returns:
        ``(eigenvalues descending, clipped at 0; eigenvectors as columns in that order)``.
    """
    cov = np.asarray(scatter, np.float64) / (n - 1)
    cov = (cov + cov.T) / 2  # symmetrize before eigh
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    return clip_eigenvalues(values[order]), vectors[:, order]


def _first_k_reaching(cumulative: np.ndarray, share: float) -> float:
    return float(np.searchsorted(cumulative, share - 1e-12) + 1)


def spectrum_metrics(eigenvalues: np.ndarray, dim: int | None = None) -> dict[str, float]:
    """Dimension and anisotropy measures of a covariance spectrum.

    Args:
        eigenvalues: Covariance eigenvalues (any order; clipped at 0 here).
        dim: The hidden size D that the ``_norm`` variants divide by (default: the
            number of eigenvalues).

    Returns:
        A dict with the keys of :data:`SPECTRUM_KEYS` (NaN when all eigenvalues are 0).
    """
    lam = clip_eigenvalues(eigenvalues)
    dim = dim or lam.size
    total = lam.sum()
    if lam.size == 0 or total <= 0:
        return dict.fromkeys(SPECTRUM_KEYS, float("nan"))
    p = lam / total
    positive = p[p > 0]
    cumulative = np.cumsum(p)
    d_pr = total**2 / np.sum(lam**2)
    d_entropy = float(np.exp(-np.sum(positive * np.log(positive))))
    idx = np.arange(10, min(200, dim))
    idx = idx[(idx < lam.size)]
    idx = idx[lam[idx] > 0]
    slope = float(np.polyfit(idx, np.log(lam[idx]), 1)[0]) if idx.size >= 5 else float("nan")
    return {
        "d_pr": float(d_pr), "d_pr_norm": float(d_pr / dim),
        "d_entropy": d_entropy, "d_entropy_norm": d_entropy / dim,
        "stable_rank": float(total / lam[0]),
        "top1_share": float(cumulative[0]), "top10_share": float(cumulative[min(10, lam.size) - 1]),
        "top32_share": float(cumulative[min(32, lam.size) - 1]),
        "k90": _first_k_reaching(cumulative, 0.90), "k95": _first_k_reaching(cumulative, 0.95),
        "log_spectrum_slope_10_200": slope,
    }


def sample_metrics(rows: np.ndarray) -> dict[str, float]:
    """Singular-value and cosine measures of a sample of rows ``(n, D)``.

    Singular values ``s`` of the centered sample above ``max(s) * max(n, D) * eps``
    count; shares are of Σs². Cosine similarity is over distinct pairs of the
    *uncentered* rows (rows of zero norm are left out).

    Returns:
        A dict with the keys of :data:`SAMPLE_KEYS` (NaN with fewer than 2 rows).
    """
    X = np.asarray(rows, np.float64)
    out = dict.fromkeys(SAMPLE_KEYS, float("nan"))
    if X.shape[0] < 2:
        return out
    s = np.linalg.svd(X - X.mean(0), compute_uv=False)
    s = s[s > (s.max() if s.size else 0) * max(X.shape) * np.finfo(np.float64).eps]
    if s.size:
        q = s / s.sum()
        energy = np.cumsum(s**2) / np.sum(s**2)
        out.update(
            sv_effective_rank=float(np.exp(-np.sum(q * np.log(q)))),
            sv_stable_rank=float(np.sum(s**2) / s[0] ** 2),
            sv_participation_ratio=float(np.sum(s**2) ** 2 / np.sum(s**4)),
            **{f"ve_{k}": float(energy[min(k, s.size) - 1]) for k in (4, 8, 16, 32)},
        )
    norms = np.linalg.norm(X, axis=1)
    unit = X[norms > 0] / norms[norms > 0, None]
    if unit.shape[0] >= 2:
        cos = (unit @ unit.T)[np.triu_indices(unit.shape[0], k=1)]
        out.update(cos_sim_mean=float(cos.mean()), cos_sim_std=float(cos.std()))
    return out


def linear_cka(cross: np.ndarray, scatter_x: np.ndarray, scatter_y: np.ndarray) -> float:
    """Linear CKA ``||XᵀY||²_F / (||XᵀX||_F ||YᵀY||_F)`` of centered X, Y from their moments.

    Args:
        cross: ``(Dx, Dy)`` co-moment Σ (x - x̄)(y - ȳ)ᵀ.
        scatter_x: ``(Dx, Dx)`` scatter of x; ``scatter_y``: ``(Dy, Dy)`` of y.
    """
    denom = np.linalg.norm(scatter_x) * np.linalg.norm(scatter_y)
    return float(np.linalg.norm(cross) ** 2 / denom) if denom > 0 else float("nan")


def subspace_novelty(vectors_a: np.ndarray, vectors_b: np.ndarray, k: int) -> float:
    """Mean over principal angles θ between two top-k subspaces of sqrt(1 - cos²θ).

    Args:
        vectors_a, vectors_b: Orthonormal columns, leading ones first.
        k: Subspace dimension (capped by the available columns).

    Returns:
        0 for identical subspaces, 1 for orthogonal ones.
    """
    k = min(k, vectors_a.shape[1], vectors_b.shape[1])
    if k == 0:
        return float("nan")
    cos = np.clip(np.linalg.svd(vectors_a[:, :k].T @ vectors_b[:, :k], compute_uv=False), 0.0, 1.0)
    return float(np.mean(np.sqrt(1.0 - cos**2)))


def normalize_rows(X: np.ndarray, how: str) -> np.ndarray:
    """The normalization variants of the ablation: ``raw``, ``token_l2``, ``token_rms``,
    ``feature_standardized`` (columns to zero mean, unit sample std; constant columns to 0)."""
    X = np.asarray(X, np.float64)
    if how == "raw":
        return X
    if how == "token_l2":
        norms = np.linalg.norm(X, axis=1, keepdims=True)
        return np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)
    if how == "token_rms":
        rms = np.sqrt(np.mean(X**2, axis=1, keepdims=True))
        return np.divide(X, rms, out=np.zeros_like(X), where=rms > 0)
    if how == "feature_standardized":
        std = X.std(0, ddof=1) if X.shape[0] > 1 else np.zeros(X.shape[1])
        return np.divide(X - X.mean(0), std, out=np.zeros_like(X), where=std > 0)
    raise ValueError(f"unknown normalization {how!r}; choose raw, token_l2, token_rms, feature_standardized")
