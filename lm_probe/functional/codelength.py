"""Online (prequential) codelength of labels, as pure functions on arrays.

Voita and Titov (2020, "Information-Theoretic Probing with Minimum Description
Length") measure how much a representation helps predict labels by the number of
bits needed to transmit the labels given the representations. The *online* code
sends the labels batch by batch: each batch is coded with the model trained on the
batches before it (the first one with the uniform code, ``log2 K`` bits per label),
then the model trains on it. An online probe trainer gets this for free: score each
batch before the step it takes on it.

* :func:`label_bits`: the bits of a batch's labels under predicted probabilities,
  ``sum(-log2 p(y))``, the probabilities clipped to ``[eps, 1 - eps]`` as
  scikit-learn's ``log_loss`` clips them (``eps`` of float64), so a sum of these equals
  ``log_loss(y, proba, normalize=False) / ln 2``.
* :func:`uniform_bits`: the uniform code of ``n`` labels over ``k`` classes, ``n log2 k``.
* :func:`ovr_proba`: one-vs-rest probabilities from decision scores, as scikit-learn's
  linear classifiers normalize them in ``predict_proba`` (the torch probe bank codes with
  them).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

__all__ = ["label_bits", "uniform_bits", "ovr_proba"]

_EPS = np.finfo(np.float64).eps


def label_bits(proba: np.ndarray, y_index: np.ndarray) -> float:
    """Bits of labels under predicted probabilities: ``sum(-log2 proba[i, y_index[i]])``.

    Args:
        proba: ``(n, n_classes)`` probabilities (rows summing to 1).
        y_index: ``(n,)`` column of each row's true label in ``proba``.

    Returns:
        The total in bits, float64 (0.0 for no rows). Probabilities are clipped to
        ``[eps, 1 - eps]`` first (float64 ``eps``, as scikit-learn's ``log_loss``).

    Raises:
        ValueError: ``proba`` is not 2-D, or ``y_index`` has another length or a column
            outside ``proba``.
    """
    proba, y_index = np.asarray(proba, np.float64), np.asarray(y_index, np.int64)
    if proba.ndim != 2 or y_index.shape != (proba.shape[0],):
        raise ValueError(f"label_bits needs proba (n, n_classes) and y_index (n,), got {proba.shape} and "
                         f"{y_index.shape}")
    if len(y_index) and (y_index.min() < 0 or y_index.max() >= proba.shape[1]):
        raise ValueError(f"y_index must be columns of proba (0..{proba.shape[1] - 1}), got {y_index.min()}.."
                         f"{y_index.max()}")
    p = np.clip(proba[np.arange(len(y_index)), y_index], _EPS, 1 - _EPS)
    return float(-np.sum(np.log(p)) / np.log(2.0))


def uniform_bits(n: int, k: int) -> float:
    """The uniform code of ``n`` labels over ``k`` classes: ``n * log2(k)`` bits.

    Raises:
        ValueError: ``n < 0`` or ``k < 1``.
    """
    if n < 0 or k < 1:
        raise ValueError(f"uniform_bits needs n >= 0 and k >= 1, got n={n}, k={k}")
    return float(n * np.log2(k))


def ovr_proba(scores: np.ndarray) -> np.ndarray:
    """One-vs-rest probabilities from decision scores, as scikit-learn's ``predict_proba``
    of a linear classifier gives them: two classes from one score column ``(n,)`` or
    ``(n, 1)`` as ``[1 - sigmoid, sigmoid]``; more classes as each column's sigmoid, the
    row normalized to sum to 1 (uniform where every sigmoid underflows to 0).

    Args:
        scores: ``(n,)``, ``(n, 1)`` or ``(n, n_classes)`` decision scores.

    Returns:
        ``(n, n_classes)`` float64 probabilities.
    """
    scores = np.asarray(scores, np.float64)
    prob = expit(scores)
    if prob.ndim == 1 or prob.shape[1] == 1:
        prob = prob.reshape(-1)
        return np.stack([1 - prob, prob], axis=1)
    total = prob.sum(axis=1, keepdims=True)
    zero = total[:, 0] == 0
    prob[zero], total[zero] = 1.0, prob.shape[1]
    return prob / total
