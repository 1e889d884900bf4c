"""A multinomial (softmax) logistic regression trained online: ``head="softmax"``.

scikit-learn's ``SGDClassifier`` fits ``K > 2`` classes one-vs-rest: ``K`` binary problems,
each class against the rest. An offline ``LogisticRegression`` (and ``LogisticRegressionCV``)
is multinomial: one softmax over the classes, trained jointly. The two differ most where a
class sits between others, as ordinal bins do: a middle bin is a slab, not a half-space,
and no single one-vs-rest hyperplane cuts it out. On benchmarks/quality.py's 6 length bins
of SmolLM2-135M activations scikit-learn's own one-vs-rest ``LogisticRegression`` loses
0.12-0.17 test accuracy to the multinomial one on the same rows.

:class:`SoftmaxSGDClassifier` minimizes the multinomial objective of scikit-learn's SGD
family, ``mean(cross-entropy) + alpha / 2 * |W|^2`` (intercepts not penalized): at
``alpha = 1 / (C * rows)`` the minimizer of ``LogisticRegression(C)``. A batch's rows are
stepped ``rows_per_step`` (4) at a time, in order: each chunk one step with the summed
gradient of its rows against the weights of the chunk's start, each row moving the weights
by ``eta`` times its own gradient, the L2 shrinkage compounded once per row, as the torch
probe backend steps (its ``rows_per_step``, also 4: the two backends take the same steps).
A whole batch in one step converged too slowly on token-level batches (about 330 rows): on
notebook 02's word classes most softmax probes reached the 100-epoch bound. The math is the
pure function :func:`lm_probe.functional.sgd.softmax_sgd_step`; the class holds state and speaks scikit-learn's
estimator API (``partial_fit``, ``predict_proba``, ``coef_`` ``(K, hidden)``), so the probe
averages, snapshots, scores and saves it like any other head. Two classes are a softmax
over two outputs (the same model as the binary logistic regression, parametrized twice).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from ..core.labels import class_columns
from ..functional.sgd import softmax, softmax_sgd_step

__all__ = ["SoftmaxSGDClassifier", "SCHEDULES"]

#: The ``learning_rate`` schedules the softmax head implements.
SCHEDULES = ("constant", "invscaling")


class SoftmaxSGDClassifier(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression by online SGD (see the module docstring).

    Args:
        alpha: L2 strength (``mean(loss) + alpha / 2 * |W|^2``).
        eta0: Step size per row.
        learning_rate: ``"constant"`` (``eta0``) or ``"invscaling"``
            (``eta0 / t ** power_t``, ``t`` the rows seen, at the batch's first row).
        power_t: Exponent of ``"invscaling"``.
        fit_intercept: Learn an intercept per class.
        class_weight: ``{class: weight}`` or ``None``.
        average: Accepted for the probe's API (the probe averages the iterates itself).
        random_state: Unused (the step is deterministic); kept for the probe's API.
        rows_per_step: Rows of a batch stepped together against the same weights (1: plain
            per-row SGD).
    """

    def __init__(self, alpha: float = 1e-4, eta0: float = 0.01, learning_rate: str = "constant",
                 power_t: float = 0.5, fit_intercept: bool = True, class_weight: dict | None = None,
                 average: bool | int = False, random_state: int | None = None, rows_per_step: int = 4) -> None:
        self.alpha, self.eta0, self.learning_rate, self.power_t = alpha, eta0, learning_rate, power_t
        self.fit_intercept, self.class_weight, self.average, self.random_state = (fit_intercept, class_weight,
                                                                                   average, random_state)
        self.rows_per_step = rows_per_step

    def partial_fit(self, X: np.ndarray, y: np.ndarray, classes: Any = None) -> "SoftmaxSGDClassifier":
        """One step on the batch ``X (rows, hidden)``, labels ``y (rows,)``."""
        X, y = np.asarray(X, np.float64), np.asarray(y)
        if not hasattr(self, "coef_"):
            if classes is None:
                raise ValueError("classes must be given on the first call to partial_fit")
            if self.learning_rate not in SCHEDULES:
                raise ValueError(f"learning_rate must be 'constant' or 'invscaling', got {self.learning_rate!r}")
            self.classes_ = np.asarray(sorted(classes))
            self.coef_ = np.zeros((len(self.classes_), X.shape[1]))
            self.intercept_ = np.zeros(len(self.classes_))
            self.t_ = 1.0
        index = class_columns(self.classes_, y)
        Y = np.zeros((len(y), len(self.classes_)))
        Y[np.arange(len(y)), index] = 1.0
        cw = self.class_weight or {}
        weight = np.array([float(cw.get(c, 1.0)) for c in self.classes_])[index]
        step = max(1, int(self.rows_per_step))
        for lo in range(0, len(y), step):
            rows = slice(lo, lo + step)
            eta = self.eta0 if self.learning_rate == "constant" else self.eta0 / self.t_ ** self.power_t
            self.coef_, self.intercept_ = softmax_sgd_step(self.coef_, np.asarray(self.intercept_, np.float64),
                                                           X[rows], Y[rows], weight[rows], float(eta),
                                                           float(self.alpha), self.fit_intercept)
            self.t_ += len(Y[rows])
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Class scores ``(n, K)``."""
        return np.asarray(X, np.float64) @ self.coef_.T + self.intercept_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, K)``: the softmax of the scores."""
        return softmax(self.decision_function(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The most probable class of each row."""
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]
