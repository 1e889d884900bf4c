"""Percentile bootstrap intervals over test rows, vectorized and memory-bounded.

A metric computed on a finite test set is an estimate; its percentile bootstrap interval
redraws the test rows with replacement ``n_boot`` times, recomputes the metric on each
resample and reports the ``(1 - ci) / 2`` and ``(1 + ci) / 2`` percentiles of those values.

Resample ``b`` draws its ``n`` row indices as ``floor(u * n)`` with ``u = rng.random(n)``,
the ``b``-th such draw from ``np.random.default_rng(seed)``; the draws do not depend on how
the resamples are chunked, so a slow loop over ``rng.random(n)`` sees exactly the same rows.
Resamples are processed ``chunk`` at a time: each chunk becomes a ``(chunk, n)`` matrix of
row counts (how often each row was drawn), and every metric that sums over rows (accuracy,
log-loss, per-class counts, binned calibration gaps, regression moments) is one matrix
product of those counts with per-row features. Rank metrics (AUROC, recall at a false
positive rate) sort the rows once and sum the counts by tied-score group. All in float64.
A resample on which a metric is undefined (one class only) gives NaN and is left out of
its percentiles; a metric NaN on every resample gets a NaN interval.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .metrics import ECE_BINS, MAX_FPR

__all__ = ["resample_counts", "bootstrap_interval", "classification_statistics", "regression_statistics",
           "mean_statistics"]

Statistic = Callable[[np.ndarray], dict[str, np.ndarray]]


def resample_counts(n: int, n_boot: int, seed: int, chunk: int):
    """Yield ``(chunk, n)`` float64 matrices of how often each row is drawn, resample by resample."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        idx = np.minimum((rng.random((size, n)) * n).astype(np.int64), n - 1)
        flat = idx + (np.arange(size) * n)[:, None]
        yield np.bincount(flat.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)


def bootstrap_interval(statistic: Statistic, n: int, *, ci: float = 0.95, n_boot: int = 1000, seed: int = 0,
                       max_cells: int = 2**22) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap bounds of every statistic ``statistic`` returns.

    Args:
        statistic: Maps ``(resamples, n)`` row counts to ``{name: (resamples,) values}``.
        n: Rows in the test set.
        ci: Coverage of the interval, in (0, 1).
        n_boot: Resamples.
        seed: Seed of ``np.random.default_rng``.
        max_cells: Resamples are processed in chunks of at most this many ``resample x row`` cells.

    Returns:
        ``{name: (lo, hi)}``; NaN bounds where ``n == 0`` or every resample is undefined.
    """
    if n == 0 or n_boot == 0:
        return {}
    chunk = max(1, min(n_boot, max_cells // n))
    parts: dict[str, list[np.ndarray]] = {}
    for counts in resample_counts(n, n_boot, seed, chunk):
        for name, values in statistic(counts).items():
            parts.setdefault(name, []).append(np.asarray(values, np.float64))
    q = [100 * (1 - ci) / 2, 100 * (1 + ci) / 2]
    out = {}
    for name, chunks in parts.items():
        values = np.concatenate(chunks)
        values = values[~np.isnan(values)]
        lo, hi = np.percentile(values, q) if len(values) else (np.nan, np.nan)
        out[name] = (float(lo), float(hi))
    return out


def _ratio(num: np.ndarray, den: np.ndarray, empty: float = 0.0) -> np.ndarray:
    """``num / den`` with ``empty`` where ``den == 0``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), empty)


def _grouped(score: np.ndarray):
    """Rows sorted by descending score, and the start of each tied-score group in that order."""
    order = np.argsort(-score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return order, starts


def _rank_statistics(counts: np.ndarray, positive: np.ndarray, score: np.ndarray, max_fpr: float | None):
    """AUROC (and, with ``max_fpr``, the largest recall with false-positive rate <= it) of
    ``score`` for the ``positive`` rows, on every resample: ties count one half."""
    order, starts = _grouped(score)
    w = counts[:, order]
    pos = np.add.reduceat(w * positive[order], starts, axis=1)  # (resamples, groups), descending score
    neg = np.add.reduceat(w * ~positive[order], starts, axis=1)
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    neg_below = n_neg[:, None] - np.cumsum(neg, axis=1)  # negatives with a strictly lower score
    defined = (n_pos > 0) & (n_neg > 0)
    auc = np.where(defined, _ratio((pos * (neg_below + neg / 2)).sum(1), n_pos * n_neg, np.nan), np.nan)
    if max_fpr is None:
        return auc, None
    fpr, tpr = _ratio(np.cumsum(neg, 1), n_neg[:, None]), _ratio(np.cumsum(pos, 1), n_pos[:, None])
    recall = np.where(fpr <= max_fpr, tpr, 0.0).max(axis=1)  # the (0, 0) point of the curve: recall 0
    return auc, np.where(defined, recall, np.nan)


def classification_statistics(y: np.ndarray, proba: np.ndarray, classes: np.ndarray, *, bins: int = ECE_BINS,
                              max_fpr: float = MAX_FPR) -> Statistic:
    """The statistic of :func:`bootstrap_interval` for a classifier's test predictions: the
    columns of :func:`lm_probe.functional.metrics.classification_metrics` (log-loss clipped
    as scikit-learn clips it, macro precision/recall/f1 with 0 for an empty class, Matthews,
    AUROC (one-vs-rest macro beyond two classes), ECE, recall at ``max_fpr`` for two classes).

    Args:
        y: ``(n,)`` true labels, each one of ``classes``.
        proba: ``(n, n_classes)`` probabilities, columns in the order of ``classes``.
        classes: The classes.
    """
    classes = np.asarray(classes)
    proba = np.asarray(proba, np.float64)
    k, eps = len(classes), np.finfo(np.float64).eps
    true = np.asarray(y)[:, None] == classes[None, :]  # (n, k)
    top = np.argmax(proba, axis=1)
    pred = np.arange(k)[None, :] == top[:, None]
    correct = (true & pred).any(1)
    conf = proba.max(1)
    bin_of = np.clip(np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], conf, side="left"), 0, bins - 1)
    gap = (correct - conf)[:, None] * (bin_of[:, None] == np.arange(bins)[None, :])
    row_loss = -np.log(np.clip(proba[true], eps, 1 - eps)) if k else np.zeros(len(y))
    features = np.column_stack([correct, row_loss, true & pred, true, pred, gap]).astype(np.float64)

    def statistic(counts: np.ndarray) -> dict[str, np.ndarray]:
        sums = counts @ features
        n = counts.sum(1)
        c, loss = sums[:, 0], sums[:, 1]
        tp, t, p = sums[:, 2:2 + k], sums[:, 2 + k:2 + 2 * k], sums[:, 2 + 2 * k:2 + 3 * k]
        cov = np.maximum(n ** 2 - (p ** 2).sum(1), 0) * np.maximum(n ** 2 - (t ** 2).sum(1), 0)
        out = {"loss": loss / n, "accuracy": c / n, "precision": _ratio(tp, p).mean(1),
               "recall": _ratio(tp, t).mean(1), "f1": _ratio(2 * tp, t + p).mean(1),
               "matthews": _ratio(c * n - (t * p).sum(1), np.sqrt(cov)),
               "ece": np.abs(sums[:, 2 + 3 * k:]).sum(1) / n}
        if k == 2:
            out["auroc"], out["recall_at_fpr"] = _rank_statistics(counts, true[:, 1], proba[:, 1], max_fpr)
        else:
            out["auroc"] = np.mean([_rank_statistics(counts, true[:, j], proba[:, j], None)[0] for j in range(k)],
                                   axis=0)
            out["recall_at_fpr"] = np.full(len(counts), np.nan)
        return out

    return statistic


def regression_statistics(y: np.ndarray, pred: np.ndarray) -> Statistic:
    """The statistic of :func:`bootstrap_interval` for a regression's test predictions:
    ``loss`` (= ``mse``), ``r2`` and ``pearson`` (NaN where a resample's variance is 0),
    from moments of the centred values."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    a, b = y - y.mean(), pred - pred.mean()  # centring first keeps the moments accurate
    features = np.column_stack([a, b, a * a, b * b, a * b, (y - pred) ** 2])

    def statistic(counts: np.ndarray) -> dict[str, np.ndarray]:
        n = counts.sum(1)
        s = counts @ features / n[:, None]
        var_y, var_p = s[:, 2] - s[:, 0] ** 2, s[:, 3] - s[:, 1] ** 2
        cov = s[:, 4] - s[:, 0] * s[:, 1]
        mse = s[:, 5]
        tiny = 1e-12 * max(float(np.mean(a * a)), float(np.mean(b * b)), np.finfo(np.float64).tiny)
        ok = (var_y > tiny) & (var_p > tiny)
        return {"loss": mse, "mse": mse, "r2": np.where(var_y > tiny, 1 - _ratio(mse, var_y, np.nan), np.nan),
                "pearson": np.where(ok, _ratio(cov, np.sqrt(np.abs(var_y * var_p)), np.nan), np.nan)}

    return statistic


def mean_statistics(values: dict[str, np.ndarray]) -> Statistic:
    """The statistic of :func:`bootstrap_interval` for means of per-row values
    (``{name: (n,) values}``), e.g. a paired accuracy difference."""
    names = list(values)
    features = np.column_stack([np.asarray(values[k], np.float64) for k in names])

    def statistic(counts: np.ndarray) -> dict[str, np.ndarray]:
        means = counts @ features / counts.sum(1)[:, None]
        return {name: means[:, j] for j, name in enumerate(names)}

    return statistic
