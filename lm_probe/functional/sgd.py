"""The SGD steps of the linear probes, as pure functions on arrays.

* :func:`asgd_weight`: the weight of the newest iterate in the running average of SGD
  iterates (ASGD), every training row counted once, as scikit-learn's ``average``; the
  probe and the torch probe bank both average with it.
* :func:`logistic_sgd_step`: one step of one-vs-rest (or multinomial) logistic regression for many probes
  at once, on ``(probes, rows, hidden)`` torch tensors (the torch probe bank,
  ``backend="torch"``), with its one-vs-rest targets (:func:`ovr_targets`) and the
  float64 moments of its standardization (:func:`masked_moments`).
* :func:`softmax_sgd_step`: one step of multinomial logistic regression on a batch
  (``head="softmax"``, :class:`~lm_probe.probes.softmax.SoftmaxSGDClassifier`).
* :func:`plain_sgd_log`: scikit-learn's own per-row SGD for log-loss (``SGDClassifier``'s
  ``partial_fit``: one pass over a batch, one row at a time, in the order
  :func:`shuffled_order` gives), for all one-vs-rest outputs at once
  (:class:`~lm_probe.probes.online_sgd.OnlineSGDClassifier`).

The L2 shrinkage ``(1 - eta * alpha)`` is compounded once per row in both steps, as
scikit-learn applies it once per example.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["asgd_weight", "asgd_average", "ovr_targets", "masked_moments", "logistic_sgd_step", "softmax",
           "softmax_sgd_step", "shuffled_order", "plain_sgd_log"]


def asgd_weight(seen: Any, rows: Any, average: Any) -> Any:
    """Weight of the newest iterate in the running average of SGD iterates (ASGD).

    Every training row counts once, as in scikit-learn's ``average``: after a batch of
    ``rows`` rows that followed ``seen`` rows, the average moves towards the new weights
    by ``rows_in_window / rows_in_window_so_far``. Averaging covers rows from number
    ``average`` on (``True`` = 1: all rows); before that the weights are not averaged
    (weight 1). Works elementwise on numpy arrays.

    Args:
        seen: Rows seen before this batch.
        rows: Rows in this batch.
        average: ``True``/``1``: average all rows; ``n``: from row ``n`` on.

    Returns:
        The weight in ``[0, 1]`` (1 replaces the average with the new weights).
    """
    start = np.maximum(np.asarray(average, np.int64), 1)
    after = np.asarray(seen) + np.asarray(rows)
    in_window = np.clip(after - np.maximum(start - 1, seen), 0, None)
    total = np.maximum(after - (start - 1), 1)
    return np.where(after - (start - 1) > 0, in_window / total, 1.0)


def asgd_average(average: tuple[np.ndarray, ...] | None, iterate: tuple[np.ndarray, ...], seen: int, rows: int,
                 start: Any) -> tuple[np.ndarray, ...]:
    """The running average of SGD iterates after one more, ``iterate``, that followed
    ``seen`` rows with ``rows`` rows: a copy of ``iterate`` first, then moved towards it by
    :func:`asgd_weight` (``start``: its ``average``)."""
    weight = float(asgd_weight(seen, rows, start))
    if average is None:
        return tuple(part.copy() for part in iterate)
    return tuple(a + (r - a) * weight for a, r in zip(average, iterate))


def ovr_targets(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """One-vs-rest targets ``(rows, outputs)`` float32: one output (``y == classes[1]``)
    for two classes, one per class otherwise (scikit-learn's layout of ``coef_``)."""
    y, classes = np.asarray(y), np.asarray(classes)
    if len(classes) == 2:
        return (y == classes[1]).astype(np.float32)[:, None]
    return (y[:, None] == classes[None, :]).astype(np.float32)


def masked_moments(X: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, mean and sum of squared deviations of the rows of ``X (rows, hidden)``
    where ``mask (rows,)`` is true, in float64: ``((), (hidden,), (hidden,))``."""
    rows = X[mask].double()
    n = torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=X.device)
    if rows.shape[0] == 0:
        zeros = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
        return n, zeros, zeros.clone()
    mean = rows.mean(0)
    return n, mean, ((rows - mean) ** 2).sum(0)


def logistic_sgd_step(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor, T: torch.Tensor, weight: torch.Tensor,
                      eta: torch.Tensor, alpha: torch.Tensor, fit_intercept: torch.Tensor, multinomial: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step of one-vs-rest (or multinomial) logistic regression for many probes at once.

    Each row moves the weights by its own step size times its own log-loss gradient
    (evaluated at the batch's starting weights, summed over the batch); L2 decay
    ``(1 - eta * alpha)`` is compounded once per row, as scikit-learn applies it once per
    example. With one row per batch this is scikit-learn's update exactly.

    Args:
        W: ``(probes, outputs, hidden)`` weights.
        b: ``(probes, outputs)`` intercepts.
        X: ``(probes, rows, hidden)`` standardized features.
        T: ``(probes, rows, outputs)`` 0/1 targets.
        weight: ``(probes, rows, outputs)`` per-row weights (class weights; 0 for rows a probe skips).
        eta: ``(probes, rows)`` step size of each row (0 for rows a probe skips).
        alpha: ``(probes,)`` L2 strengths (0 for no penalty).
        fit_intercept: ``(probes,)`` 1.0 to learn the intercept, 0.0 to keep it at 0.
        multinomial: One softmax over the outputs (``T`` one-hot: the cross-entropy gradient
            of :func:`softmax_sgd_step`) instead of one sigmoid per output.

    Returns:
        The new ``(W, b)``.
    """
    Z = torch.einsum("prd,pkd->prk", X, W) + b[:, None, :]
    P = torch.softmax(Z, dim=-1) if multinomial else torch.sigmoid(Z)
    G = (P - T) * weight * eta[:, :, None]
    decay = torch.clamp(1 - eta * alpha[:, None], min=0).prod(1)
    W = W * decay[:, None, None] - torch.einsum("prk,prd->pkd", G, X)
    b = b - fit_intercept[:, None] * G.sum(1)
    return W, b


def softmax(Z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of scores ``Z (rows, K)``, stable for large scores."""
    Z = Z - Z.max(axis=1, keepdims=True)
    E = np.exp(Z)
    return E / E.sum(axis=1, keepdims=True)


def softmax_sgd_step(W: np.ndarray, b: np.ndarray, X: np.ndarray, Y: np.ndarray, weight: np.ndarray,
                     eta: float, alpha: float, fit_intercept: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One SGD step of multinomial logistic regression on a batch.

    Args:
        W: ``(K, hidden)`` weights; b: ``(K,)`` intercepts.
        X: ``(rows, hidden)`` features; Y: ``(rows, K)`` one-hot targets.
        weight: ``(rows,)`` per-row weights (class weights).
        eta: Step size per row.
        alpha: L2 strength (shrinkage ``(1 - eta * alpha)`` compounded once per row).
        fit_intercept: Whether ``b`` is learned.

    Returns:
        The new ``(W, b)``.
    """
    G = (softmax(X @ W.T + b) - Y) * weight[:, None]  # (rows, K): d cross-entropy / d scores
    decay = max(1.0 - eta * alpha, 0.0) ** len(X)
    W = W * decay - eta * (G.T @ X)
    if fit_intercept:
        b = b - eta * G.sum(axis=0)
    return W, b


#: scikit-learn's bounds for its xorshift generator (sklearn/utils/_random.pxd) and for the
#: weight vector's scale before it is folded in (sklearn/utils/_weight_vector.pyx.tp).
_RAND_R_MOD, _WSCALE_THRESHOLD = 2**31, 1e-9


def shuffled_order(n: int, seed: int) -> np.ndarray:
    """The order in which scikit-learn's SGD visits ``n`` rows shuffled with ``seed``.

    ``SequentialDataset.shuffle``: a Fisher-Yates shuffle of ``0..n-1`` drawing from
    scikit-learn's 32-bit xorshift (``our_rand_r``, a zero seed replaced by 1).
    """
    index, state = list(range(n)), int(seed) & 0xFFFFFFFF
    for i in range(n - 1):
        state = state or 1
        state ^= (state << 13) & 0xFFFFFFFF
        state ^= state >> 17
        state ^= (state << 5) & 0xFFFFFFFF
        j = i + (state % _RAND_R_MOD) % (n - i)
        index[i], index[j] = index[j], index[i]
    return np.array(index, dtype=np.int64)


def plain_sgd_log(W: np.ndarray, b: np.ndarray, X: np.ndarray, T: np.ndarray, order: np.ndarray, eta: np.ndarray,
                  alpha: float, weight: np.ndarray, fit_intercept: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One pass of scikit-learn's plain SGD for log-loss over a batch, for ``K`` one-vs-rest
    outputs side by side (``SGDClassifier.partial_fit``'s ``_plain_sgd``, dense rows).

    Row by row, in each output's own order: the score ``p = w.x + b`` with the weights
    so far, the log-loss gradient ``expit(p) - t`` (in scikit-learn's form), the update
    ``-eta * gradient * weight``; then the L2 shrinkage ``max(0, 1 - eta * alpha)`` of
    ``w`` (kept as a scale factor, as scikit-learn's weight vector keeps it), the update
    added to ``w`` along the row and to ``b``.

    Args:
        W: ``(K, hidden)`` weights; b: ``(K,)`` intercepts (not changed in place).
        X: ``(rows, hidden)`` float64 features.
        T: ``(rows, K)`` 0/1 targets of each output.
        order: ``(K, rows)``: the row each output visits at each step (:func:`shuffled_order`).
        eta: ``(rows,)`` the step size at each step (the ``i``-th row visited).
        alpha: L2 strength (0 for no penalty).
        weight: ``(rows, K)`` class weight of each row for each output.
        fit_intercept: Whether ``b`` is learned.

    Returns:
        The new ``(W, b)``.
    """
    W, b = np.array(W, np.float64), np.array(b, np.float64)
    K, n = order.shape
    visited = np.arange(K)[None, :]
    Xs = X[order.T]  # (rows, K, hidden): the row each output visits at each step
    Ts = T[order.T, visited]
    step = -np.asarray(eta, np.float64)[:, None] * weight[order.T, visited]  # (rows, K)
    shrink = np.maximum(0.0, 1.0 - np.asarray(eta, np.float64) * alpha)
    if K == 1:  # one output: scalars, as scikit-learn's loop
        w, b0 = _plain_sgd_log_1(W[0], float(b[0]), Xs[:, 0], Ts[:, 0], step[:, 0], shrink, fit_intercept)
        return w[None, :], np.array([b0])
    scale = np.ones(K)
    for i in range(n):
        x, t = Xs[i], Ts[i]
        p = np.einsum("kd,kd->k", W, x) * scale + b
        if p.min() > -37:  # scikit-learn's cgradient_half_binomial
            e = np.exp(-p)
            gradient = ((1 - t) - t * e) / (1 + e)
        else:
            e = np.exp(-np.maximum(p, -37.0))
            gradient = np.where(p > -37, ((1 - t) - t * e) / (1 + e), np.exp(np.minimum(p, -37.0)) - t)
        update = step[i] * gradient
        scale *= shrink[i]
        if scale.min() < _WSCALE_THRESHOLD:  # fold the scale into the weights, as scikit-learn's reset_wscale
            small = scale < _WSCALE_THRESHOLD
            W[small] *= scale[small, None]
            scale[small] = 1.0
        W += x * (update / scale)[:, None]
        if fit_intercept:
            b += update
    return W * scale[:, None], b


def _plain_sgd_log_1(w: np.ndarray, b: float, X: np.ndarray, t: np.ndarray, step: np.ndarray, shrink: np.ndarray,
                     fit_intercept: bool) -> tuple[np.ndarray, float]:
    """:func:`plain_sgd_log` for one output, on Python floats (``X`` in visiting order)."""
    scale = 1.0
    for x, ti, si, shrink_i in zip(X, t.tolist(), step.tolist(), shrink.tolist()):
        p = float(w @ x) * scale + b
        if p > -37:
            e = math.exp(-p)
            update = si * (((1 - ti) - ti * e) / (1 + e))
        else:
            update = si * (math.exp(p) - ti)
        scale *= shrink_i
        if scale < _WSCALE_THRESHOLD:
            w *= scale
            scale = 1.0
        w += x * (update / scale)
        if fit_intercept:
            b += update
    return w * scale, b
