"""``SGDClassifier`` with scikit-learn's own steps taken in numpy: the linear head's estimator.

A probe trains its linear head one batch at a time with ``SGDClassifier.partial_fit``.
On pooled activations a batch is small (16 rows), so the step itself costs little; what
costs is the call around it: input validation, the class weights, the dataset wrapper,
one random generator per output. With the SGD twins and a converging schedule a probe
takes thousands of such steps, and the calls, not the arithmetic, made the probes 0.4x a
bare forward on the end-to-end benchmark.

:class:`OnlineSGDClassifier` is ``SGDClassifier`` (same parameters, attributes, pickles and
predictions), whose ``partial_fit`` lets scikit-learn take the first call (which checks the
input and allocates the weights) and takes the later ones itself, when the settings are the
ones it implements (log-loss; ``penalty`` ``"l2"`` or ``None``; any ``learning_rate`` but
the passive-aggressive ones; no ``average`` or ``early_stopping``; dense rows, no
sample weights): the same per-row SGD in the same row order (scikit-learn's shuffle, its
seeds drawn from ``random_state`` as scikit-learn draws them), all one-vs-rest outputs at
once (:func:`lm_probe.functional.sgd.plain_sgd_log`). Other settings go to scikit-learn's
``partial_fit`` unchanged. tests/probes/test_online_sgd.py holds it to ``SGDClassifier``'s
weights after many calls (1e-10), across binary, multi-class, class weights and schedules.
"""

from __future__ import annotations

from functools import lru_cache
from numbers import Integral
from typing import Any

import numpy as np
from sklearn.linear_model import SGDClassifier
from sklearn.utils import check_random_state

from ..core.labels import class_columns
from ..functional.sgd import plain_sgd_log, shuffled_order

__all__ = ["OnlineSGDClassifier"]

_MAX_INT = np.iinfo(np.int32).max  # scikit-learn's bound for the seeds it draws


def _draw_seeds(random_state: Any, outputs: int) -> tuple[int, ...]:
    """Each output's shuffle seed, drawn as ``SGDClassifier.partial_fit`` draws it: one
    generator (binary) or one per class seeded from ``random_state``; each first draws the
    dataset's own seed (``make_dataset``), then the shuffle's (``fit_binary``)."""
    if outputs == 1:
        generators = [check_random_state(random_state)]
    else:
        generators = [check_random_state(s) for s in check_random_state(random_state).randint(_MAX_INT, size=outputs)]
    seeds = []
    for generator in generators:
        generator.randint(1, _MAX_INT)
        seeds.append(int(generator.randint(_MAX_INT)))
    return tuple(seeds)


_seeds_of_int = lru_cache(maxsize=1024)(_draw_seeds)  # an int random_state gives the same seeds each call


@lru_cache(maxsize=4096)
def _order(n: int, seed: int) -> np.ndarray:
    order = shuffled_order(n, seed)
    order.setflags(write=False)
    return order


def _optimal(est: SGDClassifier, t: np.ndarray) -> np.ndarray:
    """``learning_rate="optimal"``: ``1 / (alpha * (t0 + t - 1))``, ``t0`` so that the first
    step is ``sqrt(1 / sqrt(alpha))`` (scikit-learn's, for log-loss)."""
    return 1.0 / (est.alpha * (1.0 / (np.sqrt(1.0 / np.sqrt(est.alpha)) * est.alpha) + t - 1))


#: The step size of each row, from the rows' counts ``t`` (1-based, over all calls).
#: ``"adaptive"`` divides the step only between epochs of ``fit``: within ``partial_fit`` it
#: is ``"constant"``.
_SCHEDULES = {
    "constant": lambda est, t: np.full(len(t), float(est.eta0)),
    "adaptive": lambda est, t: np.full(len(t), float(est.eta0)),
    "invscaling": lambda est, t: est.eta0 / t ** est.power_t,
    "optimal": _optimal,
}


class OnlineSGDClassifier(SGDClassifier):
    """``SGDClassifier`` whose later ``partial_fit`` calls step in numpy, identically (see the
    module docstring). Parameters, attributes and methods are ``SGDClassifier``'s."""

    def _steps_here(self, X: Any, sample_weight: Any) -> bool:
        """Whether this call is one :meth:`partial_fit` takes itself."""
        return (hasattr(self, "coef_") and hasattr(self, "classes_") and sample_weight is None
                and isinstance(X, np.ndarray) and self.loss == "log_loss" and self.penalty in ("l2", None)
                and self.learning_rate in _SCHEDULES and not self.average
                and not self.early_stopping)

    def partial_fit(self, X: Any, y: Any, classes: Any = None, sample_weight: Any = None) -> "OnlineSGDClassifier":
        """One epoch of SGD over the batch ``X (rows, hidden)``, ``y (rows,)``, as
        ``SGDClassifier.partial_fit`` (``classes`` on the first call)."""
        if not self._steps_here(X, sample_weight):
            return super().partial_fit(X, y, classes=classes, sample_weight=sample_weight)
        X, y = np.ascontiguousarray(X, dtype=np.float64), np.asarray(y)
        if X.ndim != 2 or X.shape[1] != self.coef_.shape[1] or len(X) != len(y):
            raise ValueError(f"X has shape {X.shape} and y {y.shape}: expected (rows, {self.coef_.shape[1]}) "
                             "features and one label per row")
        K, index = len(self.classes_), class_columns(self.classes_, y)
        cw = self.class_weight or {}  # a dict (or None): 'balanced' is refused by scikit-learn's first call
        weights = np.array([float(cw.get(c, 1.0)) for c in self.classes_.tolist()])
        if K == 2:  # one output: the second class against the first
            T = (index == 1)[:, None].astype(np.float64)
            weight = np.where(T > 0, weights[1], weights[0])
        else:
            T = (index[:, None] == np.arange(K)).astype(np.float64)
            weight = np.where(T > 0, weights[None, :], 1.0)
        outputs = T.shape[1]
        draw = _seeds_of_int if isinstance(self.random_state, Integral) else _draw_seeds
        seeds = draw(self.random_state, outputs)
        n = len(y)
        order = np.stack([_order(n, s) if self.shuffle else np.arange(n) for s in seeds])
        t = self.t_ + np.arange(n)
        eta = _SCHEDULES[self.learning_rate](self, t)
        alpha = float(self.alpha) if self.penalty == "l2" else 0.0
        self.coef_, self.intercept_ = plain_sgd_log(self.coef_, self.intercept_, X, T, order, eta, alpha, weight,
                                                    bool(self.fit_intercept))
        self._expanded_class_weight, self.t_, self.n_iter_ = weights, self.t_ + n, 1
        return self
