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
positive rate) sort the positive and negative rows once; on each resample a cumulative sum
of the negatives' counts, read at each positive's place, gives how many it outranks. All in float64.
A resample on which a metric is undefined (one class only) gives NaN and is left out of
its percentiles; a metric NaN on every resample gets a NaN interval.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from .metrics import ECE_BINS, MAX_FPR, confidence_bins

__all__ = ["resample_counts", "bootstrap_interval", "classification_statistics", "regression_statistics",
           "mean_statistics"]

Statistic = Callable[[np.ndarray], dict[str, np.ndarray]]


def resample_counts(n: int, n_boot: int, seed: int, chunk: int) -> Iterator[np.ndarray]:
    """Yield ``(chunk, n)`` float64 matrices of how often each row is drawn, resample by
    resample (the last chunk may be shorter), ``n_boot`` rows in all."""
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
        max_cells: Resamples are processed in chunks of at most this many ``resample x row``
            cells (the default: 32 MiB per float64 matrix), or one resample if ``n`` is larger.

    Returns:
        ``{name: (lo, hi)}``, with NaN bounds for a statistic undefined on every resample;
        ``{}`` if ``n`` or ``n_boot`` is 0.
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


class _Ranked:
    """The part of a rank metric that does not depend on the resample, for one score and its
    positive rows: each side's rows by descending score, and for each positive how many
    negatives (and positives) score above it, or at least as high."""

    def __init__(self, positive: np.ndarray, score: np.ndarray) -> None:
        pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
        self.pos = pos[np.argsort(-score[pos], kind="stable")]
        self.neg = neg[np.argsort(-score[neg], kind="stable")]
        neg_key, pos_key = -score[self.neg], -score[self.pos]  # ascending
        self.neg_above = np.searchsorted(neg_key, pos_key, side="left")  # negatives scoring > each positive
        self.neg_at_least = np.searchsorted(neg_key, pos_key, side="right")  # ... >= each positive
        self.pos_at_least = np.searchsorted(pos_key, pos_key, side="right")  # positives scoring >= each

    def statistics(self, counts: np.ndarray, max_fpr: float | None) -> tuple[np.ndarray, np.ndarray | None]:
        """AUROC on every resample (a tie counts one half) and, with ``max_fpr``, the largest
        recall at a threshold (an observed positive's score, or above all: recall 0) whose
        false-positive rate is at most ``max_fpr``; NaN where a resample lacks a class."""
        wp, wn = counts[:, self.pos], counts[:, self.neg]
        n_pos, n_neg = wp.sum(1), wn.sum(1)
        neg_cum = np.zeros((len(counts), len(self.neg) + 1))
        np.cumsum(wn, axis=1, out=neg_cum[:, 1:])
        above, at_least = neg_cum[:, self.neg_above], neg_cum[:, self.neg_at_least]
        defined = (n_pos > 0) & (n_neg > 0)
        # each positive beats the negatives below it and ties half of those level with it
        auc = np.where(defined, _ratio((wp * (n_neg[:, None] - (above + at_least) / 2)).sum(1), n_pos * n_neg,
                                       np.nan), np.nan)
        if max_fpr is None:
            return auc, None
        pos_cum = np.zeros((len(counts), len(self.pos) + 1))
        np.cumsum(wp, axis=1, out=pos_cum[:, 1:])
        fpr, tpr = _ratio(at_least, n_neg[:, None]), _ratio(pos_cum[:, self.pos_at_least], n_pos[:, None])
        recall = np.where(fpr <= max_fpr, tpr, 0.0).max(axis=1, initial=0.0)
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
    gap = (correct - conf)[:, None] * (confidence_bins(conf, bins)[:, None] == np.arange(bins)[None, :])
    row_loss = -np.log(np.clip(proba[true], eps, 1 - eps)) if k else np.zeros(len(y))
    features = np.column_stack([correct, row_loss, true & pred, true, pred, gap]).astype(np.float64)
    ranked = [_Ranked(true[:, 1], proba[:, 1])] if k == 2 else [_Ranked(true[:, j], proba[:, j]) for j in range(k)]

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
            out["auroc"], out["recall_at_fpr"] = ranked[0].statistics(counts, max_fpr)
        else:
            out["auroc"] = np.mean([r.statistics(counts, None)[0] for r in ranked], axis=0)
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
