"""Probes: online classifiers and regressors on pooled activations.

A :class:`Probe` trains a scikit-learn estimator with ``partial_fit`` one batch at a time
(:mod:`lm_probe.probes.config`: ``SGDClassifier(loss="log_loss")``, the multinomial softmax
head, ``SGDRegressor``, an MLP), on features standardized with running float64 moments. It
is a :class:`~lm_probe.core.consumer.Consumer`: the runner feeds it pooled activations, it
scores a cached validation set every ``eval_every`` steps, asks its
:class:`~lm_probe.probes.early_stopping.EarlyStopping` whether to stop, and keeps the
weights of its best validation loss. Learned state ends in ``_``; predicting or
``compute()`` before any training raises :class:`ProbeNotFittedError`.

``fit_probes`` gives each probe its settings for a pass as a :class:`Training` in
``start(context)`` (``context.training[probe.name]``); the torch probe bank trains the
weights of its probes outside ``partial_fit`` and meets them through public methods only
(:meth:`Probe.note_step`, :meth:`Probe.after_step`, :meth:`Probe.load_weights`,
:meth:`Probe.load_moments`).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import numpy as np
from loguru import logger
from sklearn import config_context
from sklearn.exceptions import NotFittedError

from ..core.consumer import Consumer, NotComputedError, PooledBatch, RunContext, finite_rows
from ..core.labels import labeled
from ..functional.metrics import classification_metrics, prediction_loss, regression_metrics
from ..functional.sgd import asgd_average
from ..functional.stats import welford_update
from .codelength import Codelength
from .config import ProbeConfig, default_alpha
from .early_stopping import StopReason
from .lbfgs import FitRows, row_keys, solve
from .training import Training, batch_targets

__all__ = ["Probe", "LinearProbe", "ProbeNotFittedError"]


class ProbeNotFittedError(NotComputedError, NotFittedError):
    """A probe was asked to predict or summarize before any training: the consumers'
    :class:`NotComputedError`, and scikit-learn's ``NotFittedError`` for callers that
    catch that."""


class Probe(Consumer):
    """An online probe on one (site, pooling): a classifier or a regressor.

    Args:
        config: The probe's configuration.
        classes: The classes to predict (overrides ``config.classes`` when that is None).
        random_state: Seed of the estimator.
        name: Override the probe's name (control twins are ``"<name> [control]"``).

    Attributes:
        estimator_: The scikit-learn estimator (best validation state once trained).
        head_: The head trained (``config.head``; ``"auto"`` resolved by the classes).
        classes_: ``(n_classes,)`` labels in the column order of ``predict_proba``
            (``None`` for regression).
        coef_, intercept_: Weights on standardized features (linear heads).
        mean_, scale_: Standardization (zeros / ones when ``standardize=False``).
        n_steps_: Training batches seen.
        best_loss_: Best validation loss (log-loss, or mean squared error).
        best_step_: Step of ``best_loss_``.
        stopped_reason_: A :class:`StopReason`.
        n_nonfinite_: Training and validation rows left out for non-finite activations
            (each training row counted once, in the first epoch, whatever the number of
            epochs).
        codelength_: The online codelength of the first epoch's labels (:class:`Codelength`).
        n_decays_: Step decays so far (``lr_decay``); at each the average of the iterates
            restarts (its trainer counts the rows: this probe's :meth:`partial_fit`, or the bank).
    """

    def __init__(self, config: ProbeConfig, classes: Iterable[int] | None = None,
                 random_state: int | None = None, name: str | None = None) -> None:
        self.config = config
        self.name = name or config.name
        self.requests = ((config.site, config.pool),)
        self.is_classifier = config.task == "classification"
        self._classes = np.asarray(config.classes if config.classes is not None else
                                   sorted(set(int(c) for c in classes or ())), dtype=np.int64)
        self.random_state = random_state
        self._training = Training()
        self.n_rows_: int | None = None  # training rows of the current fit (alpha="auto" scales by it)
        self.reset()

    # ------------------------------------------------------------ estimator API
    def reset(self) -> None:
        """Forget everything learned: back to the state right after :meth:`start` (the
        pass's :class:`Training` settings stay, with fresh early stopping and decay)."""
        self.classes_ = self._classes if self.is_classifier else None
        self._lbfgs = self.config.solver == "lbfgs"
        n_classes = len(self.classes_) if self.is_classifier else None  # head="auto": softmax past two classes
        self.head_ = self.config.resolve_head(n_classes)
        self.estimator_, self._average = self.config.build_estimator(self.random_state, self.n_rows_, n_classes)
        self._eta0 = float(getattr(self.estimator_, "eta0", 0.0) or 0.0)
        self.C_ = self.converged_ = None  # solver="lbfgs": the C chosen, whether it converged
        self.n_epochs_, self.lr_scale_ = 0, 1.0
        self._running = self._avg = None  # (coef, intercept): the plain SGD weights, and their running average
        self._seen = self._avg_from = 0  # rows seen; rows seen at the last step decay
        self._n, self._mean, self._m2 = 0, 0.0, 0.0
        self.n_steps_, self.best_loss_ = 0, float("inf")
        self.best_step_, self.stopped_reason_, self._best = None, StopReason.NONE, None
        self.history_: list[tuple[int, float]] = []
        self.codelength_ = Codelength.for_probe(self)  # online codelength of the first epoch's labels
        settings = self._training
        self._val, self._relabel = settings.validation, settings.relabel
        self._stopper = copy.deepcopy(settings.early_stopping)
        self._decay = copy.deepcopy(settings.decay) if self._eta0 and not self._lbfgs else None
        self._fit_rows = FitRows(self.name, settings.max_row_bytes)  # solver="lbfgs": the fit rows, until solved
        self._eval_every, self._max_steps = settings.eval_every, settings.max_steps
        self.n_nonfinite_ = int(settings.n_nonfinite)

    def reset_estimator_alpha(self) -> None:
        """Resolve ``alpha="auto"`` again for :attr:`n_rows_` (a probe loaded from disk)."""
        if self.config.probe_kwargs.get("alpha") == "auto" and not self._lbfgs:
            self.estimator_.set_params(alpha=default_alpha(self.n_rows_))

    @property
    def n_decays_(self) -> int:
        return self._decay.n_decays_ if self._decay is not None else 0

    @property
    def mean_(self) -> np.ndarray:
        return np.asarray(self._mean, np.float64)

    @property
    def scale_(self) -> np.ndarray:
        if not self.config.standardize or self._n == 0:
            return np.ones_like(np.atleast_1d(self.mean_))
        scale = np.sqrt(np.asarray(self._m2) / self._n)
        return np.where(scale > 0, scale, 1.0)

    @property
    def coef_(self) -> np.ndarray:
        self._check_fitted()
        return self.estimator_.coef_

    @property
    def intercept_(self) -> np.ndarray:
        self._check_fitted()
        return self.estimator_.intercept_

    @property
    def moments(self) -> tuple[int, np.ndarray, np.ndarray]:
        """The standardization's running float64 moments ``(n, mean, m2)`` (``scale_ = sqrt(m2 / n)``)."""
        return int(self._n), np.atleast_1d(np.asarray(self._mean, np.float64)), \
            np.atleast_1d(np.asarray(self._m2, np.float64))

    def load_moments(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Set the moments (as :attr:`moments` gives them): for the torch probe bank, which keeps its own."""
        self._n, self._mean, self._m2 = int(n), np.array(mean, np.float64), np.array(m2, np.float64)

    def load_weights(self, coef: np.ndarray, intercept: np.ndarray, *, n_seen: int) -> None:
        """Set the linear head's weights on standardized features, for a trainer that
        steps them outside :meth:`partial_fit` (the torch probe bank).

        Args:
            coef: ``(outputs, hidden)`` weights, scikit-learn's ``coef_`` layout.
            intercept: ``(outputs,)`` intercepts.
            n_seen: Training rows behind these weights (the schedule's count, ``t_ - 1``).
        """
        est = self.estimator_
        est.coef_ = np.asarray(coef, np.float64)
        est.intercept_ = np.asarray(intercept, np.float64)
        est.classes_ = np.asarray(self.classes_)
        est.n_features_in_ = est.coef_.shape[1]
        est.t_ = float(n_seen + 1)

    def _check_fitted(self) -> None:
        if self.n_steps_ == 0 and self._best is None:
            raise ProbeNotFittedError(f"probe {self.name!r} is not fitted yet: run fit_probes (or partial_fit) first")

    def _transform(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if not self.config.standardize:
            return X
        return (X - self.mean_) / self.scale_

    def partial_fit(self, X: np.ndarray, y: np.ndarray, *, code: bool = False) -> "Probe":
        """One step on ``X (rows, hidden)``, ``y (rows,)``; ``code``: first add the labels to :attr:`codelength_`."""
        if self.config.standardize:
            self._n, self._mean, self._m2 = welford_update(self._n, self._mean, self._m2, X)
        if code:  # before the step, standardized with the moments that include the batch
            self.codelength_.code_probe(self, X, y)
        est = self.estimator_
        if self._running is not None:  # step from the plain SGD weights, not their average
            est.coef_, est.intercept_ = self._running[0].copy(), self._running[1].copy()
        started = hasattr(est, "coef_") or hasattr(est, "coefs_")  # checked at the first step; rows are finite
        with config_context(skip_parameter_validation=started, assume_finite=True):
            if self.is_classifier:
                est.partial_fit(self._transform(X), y, **({} if started else {"classes": self.classes_}))
            else:
                est.partial_fit(self._transform(X), np.asarray(y, np.float64))
        if self._average:
            self._running = (est.coef_.copy(), np.atleast_1d(est.intercept_).copy())
            seen, start = self._seen - self._avg_from, self._average if not self._avg_from else 1
            self._avg = asgd_average(self._avg, self._running, seen, len(y), start)
            if seen + len(y) >= int(start):
                est.coef_, est.intercept_ = self._avg[0].copy(), self._avg[1].copy().reshape(est.intercept_.shape)
        self._seen += len(y)
        self.n_steps_ += 1
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Raw scores for pooled activations ``X (n, hidden)`` (linear classifiers)."""
        self._check_fitted()
        return self.estimator_.decision_function(self._transform(X))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, n_classes)`` for pooled activations ``X (n, hidden)``."""
        self._check_fitted()
        if not self.is_classifier:
            raise AttributeError(f"probe {self.name!r} is a regression probe: use predict()")
        return self.estimator_.predict_proba(self._transform(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted labels (or values, for regression) ``(n,)`` for ``X (n, hidden)``."""
        if self.is_classifier:
            return self.classes_[np.argmax(self.predict_proba(X), axis=1)]
        self._check_fitted()
        return self.estimator_.predict(self._transform(X))

    def score(self, X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """Metrics on ``X``, ``y``: classification (loss = log-loss, accuracy, precision,
        recall, f1, matthews, support) or regression (loss = mse, r2, mse, pearson)."""
        if self.is_classifier:
            return classification_metrics(np.asarray(y), self.predict_proba(X), self.classes_)
        return regression_metrics(np.asarray(y, np.float64), self.predict(X))

    # ------------------------------------------------------------ consumer API
    @property
    def active(self) -> bool:
        return self.stopped_reason_ is StopReason.NONE

    def start(self, context: RunContext) -> None:
        """Start a training pass with this probe's :class:`Training` settings,
        ``context.training[self.name]`` (the defaults when the context has none for it).

        Raises:
            TypeError: the context's entry for this probe is not a :class:`Training`.
        """
        settings = context.training.get(self.name, Training())
        if not isinstance(settings, Training):
            raise TypeError(f"probe {self.name!r}: context.training[{self.name!r}] must be an "
                            f"lm_probe.probes.training.Training, got {type(settings).__name__}")
        if settings.classes is not None:
            self._classes = np.asarray(sorted(int(c) for c in settings.classes), dtype=np.int64)
        self._training = settings
        self.n_rows_ = None if settings.n_rows is None else int(settings.n_rows)
        self.reset()

    def targets(self, batch: PooledBatch) -> np.ndarray:
        """This probe's targets for a batch's rows (``IGNORE`` where unlabeled): the
        batch's labels, or the pass's control labels (:func:`~lm_probe.probes.training.batch_targets`)."""
        return batch_targets(batch, self.config.pool == "none", self._relabel, self.name)

    def update(self, batch: PooledBatch) -> None:
        X, y = batch.acts[self.requests[0]], self.targets(batch)
        keep, finite = labeled(y), finite_rows(X)
        self.count_nonfinite(batch, keep & ~finite)
        keep &= finite
        X, y = X[keep], y[keep]
        if len(y) == 0:
            return
        self.n_epochs_ = max(self.n_epochs_, batch.epoch + 1)
        if self._lbfgs:
            self._collect(X, y, row_keys(batch, self.config.pool == "none", keep))
            return
        self.partial_fit(X, y, code=batch.epoch == 0)  # each row coded once, in the first epoch
        self.after_step()

    # ------------------------------------------------------------ solver="lbfgs"
    def _collect(self, X: np.ndarray, y: np.ndarray, keys: np.ndarray | None) -> None:
        """Keep a batch's rows, with their ``(example id, token position)`` keys, for the
        full-batch solve (and fold them into the moments)."""
        self._fit_rows.add(X, y, keys)
        if self.config.standardize:
            self._n, self._mean, self._m2 = welford_update(self._n, self._mean, self._m2, X)
        self.n_steps_ += 1

    def on_event(self, event: str, step: int, epoch: int) -> None:
        """``solver="lbfgs"``: solve at the end of the first epoch (then the probe is done)."""
        if self._lbfgs and event == "epoch_end" and self._fit_rows:
            self._solve()

    def _solve(self) -> None:
        """The full-batch solve on the standardized rows (:func:`lm_probe.probes.lbfgs.solve`):
        the ``C`` chosen on held-out rows (``best_loss_`` is its held-out log-loss), refit on
        the fit and validation rows."""
        X, y = self._fit_rows.take(self._transform)
        validation = None if self._val is None else (self._transform(self._val[0]), self._val[1])
        losses, best, self.estimator_ = solve(X, y, validation, config=self.config, classes=self.classes_,
                                              random_state=self.random_state, name=self.name)
        self.best_loss_, self.C_ = float(losses[best]), self.config.Cs[best]
        self.history_.extend((self.n_steps_, float(loss)) for loss in losses)
        self.best_step_ = self.n_steps_
        self.converged_ = bool(np.all(self.estimator_.n_iter_ < self.estimator_.max_iter))
        self._best = None
        self.stopped_reason_ = StopReason.SOLVED

    def count_nonfinite(self, batch: PooledBatch, bad: np.ndarray) -> None:
        """Count (in the first epoch only: each row once) and report rows left out for
        non-finite activations."""
        n_bad = int(np.sum(bad))
        if n_bad and batch.epoch == 0:
            self.n_nonfinite_ += n_bad
            logger.warning("probe {!r}: {} training rows have non-finite activations at site {!r} (step {}); "
                           "they are left out", self.name, n_bad, self.config.site, batch.step)

    def _eval_due(self) -> bool:
        """Whether the step just taken is one where the validation set is scored."""
        return bool(self._eval_every) and self.n_steps_ % self._eval_every == 0

    def note_step(self) -> bool:
        """Count one step taken outside :meth:`partial_fit` (the torch bank's); whether the validation
        set is scored after it (the trainer then loads its weights, :meth:`load_weights`, first)."""
        self.n_steps_ += 1
        return self._eval_due()

    def after_step(self) -> None:
        """Bookkeeping after a training step: evaluate when due, stop at the step budget."""
        if self._eval_due():
            self._evaluate()
        if self.active and self._max_steps is not None and self.n_steps_ >= self._max_steps:
            self._stop(StopReason.MAX_STEPS)

    def _evaluate(self, decide: bool = True) -> None:
        """Score the cached validation set; snapshot on improvement; maybe stop."""
        if self._val is None or self._stopper is None:
            return
        X, y = self._val  # the loss alone: score() would also compute every test metric
        loss = prediction_loss(y, self.predict_proba(X) if self.is_classifier else self.predict(X), self.classes_)
        self.history_.append((self.n_steps_, loss))
        stop, reason = self._stopper.check(loss, self.n_steps_)
        if self._decay is not None and decide:
            decays, self.lr_scale_ = self._decay.n_decays_, self._decay.check(self._stopper.improved_)
            self.estimator_.eta0 = self._eta0 * self.lr_scale_
            if self._decay.n_decays_ > decays:  # the average restarts: it forgets the larger step's iterates
                self._avg_from = self._seen
        if self._stopper.improved_:
            self.best_loss_, self.best_step_ = loss, self.n_steps_
            self._best = (copy.deepcopy(self.estimator_), np.copy(self._mean), np.copy(self._m2), self._n)
        if stop and decide:
            self._stop(reason)

    def _stop(self, reason: StopReason) -> None:
        self.stopped_reason_ = reason

    def finish(self) -> None:
        """End of training: score the final weights too, then restore the best ones."""
        if self._lbfgs and self._fit_rows:
            self._solve()
        if self.n_steps_ == 0:
            if self.active:
                self.stopped_reason_ = StopReason.END_OF_DATA
            return
        if self._lbfgs:
            return
        if not self.history_ or self.history_[-1][0] != self.n_steps_:
            self._evaluate(decide=False)
        if self.active:
            self.stopped_reason_ = StopReason.END_OF_DATA
        if self._best is not None:
            estimator, mean, m2, n = self._best
            self.estimator_, self._mean, self._m2, self._n = copy.deepcopy(estimator), mean, m2, n

    def compute(self) -> dict[str, Any]:
        """Training summary: steps, best validation loss, stop reason."""
        self._check_fitted()
        return {
            "n_steps": self.n_steps_, "best_val_loss": self.best_loss_, "best_step": self.best_step_,
            "stopped_early": self.stopped_reason_ in (StopReason.PATIENCE, StopReason.NON_FINITE),
            "stop_reason": str(self.stopped_reason_),
            "n_nonfinite": self.n_nonfinite_,
            **self.solver_summary(),
        }

    def solver_summary(self) -> dict[str, Any]:
        """Which solver produced the weights: ``solver``, ``C`` (lbfgs) or ``alpha`` (SGD and
        MLP heads), ``n_epochs`` run, and ``converged`` (lbfgs: within ``max_iter``; SGD:
        stopped by early stopping rather than by the epoch or step bound)."""
        alpha = self.estimator_.get_params().get("alpha", np.nan)
        if self._lbfgs:
            converged = bool(self.converged_)  # None (not solved yet) counts as not converged
        else:
            converged = self.stopped_reason_ is StopReason.PATIENCE
        return {"solver": self.config.solver, "C": np.nan if self.C_ is None else self.C_,
                "alpha": np.nan if self._lbfgs else alpha, "n_epochs": self.n_epochs_, "converged": converged}

    def __repr__(self) -> str:
        return (f"Probe({self.name!r}, {self.config.task}/{self.config.head}, steps={self.n_steps_}, "
                f"stop={self.stopped_reason_})")


LinearProbe = Probe  #: The name of issue 2's API; every head is a :class:`Probe`.
