"""Probes: online classifiers and regressors on pooled activations.

A :class:`Probe` wraps a scikit-learn estimator that learns with ``partial_fit``
(``head="linear"``: ``SGDClassifier(loss="log_loss")`` or, for ``task="regression"``,
``SGDRegressor``; ``head="mlp"``: ``MLPClassifier`` / ``MLPRegressor``) and trains it
one batch at a time, standardizing features with
running float64 moments (on by default, as SGD is sensitive to feature scale). It is
a :class:`~lm_probe.core.consumer.Consumer`: the runner feeds it pooled activations,
it evaluates itself on a cached validation set every ``eval_every`` steps, asks its
:class:`~lm_probe.probes.early_stopping.EarlyStopping` whether to stop, and keeps the
weights of its best validation loss. Learned state ends in ``_`` (scikit-learn's
convention); predicting or ``compute()`` before any training raises
:class:`ProbeNotFittedError` (both the consumers' :class:`NotComputedError` and
scikit-learn's ``NotFittedError``).

``fit_probes`` gives each probe its settings for a pass as a :class:`Training` in
``start(context)`` (``context.training[probe.name]``); the torch probe bank trains the
weights of its probes outside ``partial_fit`` and meets them through public methods only
(:meth:`Probe.note_step`, :meth:`Probe.after_step`, :meth:`Probe.load_weights`,
:meth:`Probe.load_moments`).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from loguru import logger
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, SGDClassifier, SGDRegressor
from sklearn.neural_network import MLPClassifier, MLPRegressor

from ..core.consumer import Consumer, NotComputedError, PooledBatch, RunContext, finite_rows
from ..core.dataset import IGNORE, format_labels
from ..core.pooling import check_pool
from ..functional.metrics import classification_metrics, regression_metrics
from ..functional.stats import welford_update
from .early_stopping import DecayOnPlateau, EarlyStopping, StopReason
from .softmax import SoftmaxSGDClassifier

__all__ = ["ProbeConfig", "Probe", "LinearProbe", "Training", "ProbeNotFittedError", "IGNORE",
           "DEFAULT_PROBE_KWARGS", "DEFAULT_CS", "SOLVERS", "PER_PROBE", "asgd_weight", "default_alpha",
           "DEFAULT_SGD_C"]

_HEADS: dict[tuple[str, str], type] = {
    ("classification", "linear"): SGDClassifier,
    ("classification", "softmax"): SoftmaxSGDClassifier,
    ("classification", "mlp"): MLPClassifier,
    ("regression", "linear"): SGDRegressor,
    ("regression", "mlp"): MLPRegressor,
}
_PARAMS = {cls: frozenset(cls().get_params()) for cls in (*_HEADS.values(), LogisticRegression)}
#: Heads trained by SGD steps on a linear model: the probe averages their iterates and
#: decays their step (``"softmax"``: multinomial, see :mod:`lm_probe.probes.softmax`).
_SGD_LINEAR = ("linear", "softmax")

#: ``"sgd"``: the online head (SGD, or the MLP's own optimizer) trained batch by batch.
#: ``"lbfgs"``: a full-batch L2 logistic regression on all the fit rows, at the end of the
#: first epoch, with ``C`` chosen on the validation split.
SOLVERS = ("sgd", "lbfgs")
#: The grid of inverse regularization strengths ``C`` searched by ``solver="lbfgs"``
#: (the same grid as scikit-learn's ``LogisticRegressionCV(Cs=10)``).
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 4, 10))
_LBFGS_DEFAULTS: dict[str, Any] = {"max_iter": 1000}

#: lm_probe's defaults for ``SGDClassifier``, overridden by any keyword given to a
#: ProbeConfig. scikit-learn's own default schedule (``learning_rate="optimal"``)
#: makes online probes far too confident on real activations (test log-loss near 10
#: on the demo data at 85% of the accuracy), which defeats early stopping on
#: validation log-loss; a small constant step is calibrated (log-loss about 0.5).
#: Averaging the iterates (ASGD) then takes the gap to an offline cross-validated
#: logistic regression on the same activations from 0.028 to 0.005 on average over
#: 11 layers of the demo model (benchmarks/overhead.py measures it).
#:
#: ``alpha="auto"`` (opt-in) is the L2 strength of ``LogisticRegression(C=DEFAULT_SGD_C)``
#: on the probe's training rows, ``alpha = 1 / (DEFAULT_SGD_C * rows)``
#: (:func:`default_alpha`): regularization that weakens as the data grows, as a
#: cross-validated ``C`` does. On benchmarks/quality.py's real activations (675 training
#: rows) ``LogisticRegressionCV`` chose ``C`` near 0.006 for most probes, where
#: scikit-learn's ``alpha=1e-4`` is ``C`` near 15, and only early stopping regularizes.
#:
#: ``average`` is implemented by the probe, not by scikit-learn: with ``partial_fit``,
#: scikit-learn 1.x restarts the running intercept of an averaged SGD from a stale value
#: on every call (binary: ``_standard_intercept`` is only stored before averaging
#: starts; multi-class: the averaged intercept is overwritten by the running one), so
#: its averaged intercept is shrunk towards 0 (0.22 instead of 1.75 on a 3:1 toy set).
#: The probe trains a plain SGD (``average=False``) and keeps the average of its
#: iterates after each batch, weighted by the batch's rows (:func:`asgd_weight`).
DEFAULT_PROBE_KWARGS: dict[str, Any] = {"learning_rate": "constant", "eta0": 0.003, "average": True}
#: ``alpha="auto"``'s regularization in LogisticRegression's units (see :func:`default_alpha`).
#: An SGD probe's ``alpha`` may be ``"auto"`` (``ProbeConfig(site, alpha="auto")``).
DEFAULT_SGD_C = 0.005
#: ``alpha="auto"`` for a probe stepped by hand (``partial_fit`` without ``start``): no
#: row count to scale by, so scikit-learn's default.
_UNSCALED_ALPHA = 1e-4


def default_alpha(n_rows: int | None, C: float = DEFAULT_SGD_C) -> float:
    """The SGD L2 strength equal to ``LogisticRegression(C=C)`` on ``n_rows`` rows.

    scikit-learn's SGD minimizes ``mean(loss) + alpha / 2 * |w|^2``, its logistic
    regression ``C * sum(loss) + 1 / 2 * |w|^2``: the same minimizer when
    ``alpha = 1 / (C * n_rows)``. ``None`` (rows unknown) gives scikit-learn's 1e-4.
    """
    if not n_rows:
        return _UNSCALED_ALPHA
    return 1.0 / (C * int(n_rows))


_DEFAULTS: dict[type, dict[str, Any]] = {
    SGDClassifier: {"loss": "log_loss", **DEFAULT_PROBE_KWARGS},
    SoftmaxSGDClassifier: dict(DEFAULT_PROBE_KWARGS),
    SGDRegressor: {},  # scikit-learn's: squared error, inverse-scaling step
    MLPClassifier: {},
    MLPRegressor: {},
}


#: ``fit_probes`` settings that a :class:`ProbeConfig` may set for its own probe, as the
#: original lm_probe's ProbeConfig did (``None``: the value given to ``fit_probes``).
PER_PROBE = ("patience", "warmup_steps", "max_steps")

#: Arguments of the original lm_probe's ProbeConfig (t-shoemaker/lm_probe) with no
#: per-probe meaning here, and where their setting lives now. Each is accepted with one
#: FutureWarning per process and argument; ``model_kwargs`` is still passed on.
ORIGINAL_ARGUMENTS: dict[str, str] = {
    "test_size": "is ignored: the validation rows for early stopping are one split of the training set, "
                 "shared by all probes (the original held out a share of each batch); set its share with "
                 "fit_probes(val_size=...)",
    "threshold": "is ignored: an improvement of validation log-loss counts when it is at least "
                 "fit_probes(min_delta=...) (absolute, where the original's threshold was relative)",
    "null_label": "is ignored: token-level probes are ProbeConfig(site, pool='none') on "
                  "ProbeDataset.from_tagged(...) data, whose unlabeled tokens are lm_probe.IGNORE",
    "model_kwargs": "is passed on, but give the estimator's arguments directly: ProbeConfig(site, classes, "
                    "alpha=...)",
}
_warned: set[str] = set()


def _from_original(probe_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``probe_kwargs`` without the original lm_probe's :data:`ORIGINAL_ARGUMENTS` (its
    ``model_kwargs`` merged in), warning once per process about each one given."""
    kwargs = dict(probe_kwargs)
    for argument, where in ORIGINAL_ARGUMENTS.items():
        if argument not in kwargs:
            continue
        value = kwargs.pop(argument)
        if argument not in _warned:
            _warned.add(argument)
            warnings.warn(f"ProbeConfig({argument}=...) of the original lm_probe {where}", FutureWarning,
                          stacklevel=3)
        if argument == "model_kwargs":
            kwargs = {**dict(value or {}), **kwargs}
    return kwargs


class ProbeNotFittedError(NotComputedError, NotFittedError):
    """A probe was asked to predict or summarize before any training: the consumers'
    :class:`NotComputedError`, and scikit-learn's ``NotFittedError`` for callers that
    catch that."""


@dataclass(frozen=True, eq=False)
class Training:
    """One probe's settings for a training pass (``fit_probes`` decides them; the probe
    reads its own from ``context.training[probe.name]`` in ``start``).

    Args:
        classes: The classes (classification); ``None``: the probe's own.
        validation: Cached validation set ``(X, y)``, unlabeled rows already removed.
        n_nonfinite: Validation rows already left out for non-finite activations.
        early_stopping: The stopping rule, a template: the probe works on its own copy,
            made fresh at ``start()`` and ``reset()``.
        eval_every: Steps between validation evaluations.
        max_steps: Steps at most.
        decay: Step-size decay on validation plateaus (SGD linear heads), a template as
            ``early_stopping``.
        relabel: Targets to use instead of the batch's, indexed by dataset position
            (an array for sequence tasks, a list of per-example token arrays for
            token tasks): a control task.
        max_row_bytes: ``solver="lbfgs"``: most bytes of fit rows it may hold.
        n_rows: The training rows this pass will show the probe (``alpha="auto"``
            scales its L2 strength by them: :func:`default_alpha`).
    """

    classes: tuple[int, ...] | None = None
    validation: tuple[np.ndarray, np.ndarray] | None = None
    n_nonfinite: int = 0
    early_stopping: EarlyStopping | None = None
    eval_every: int = 10
    max_steps: int | None = None
    decay: DecayOnPlateau | None = None
    relabel: Any = None
    max_row_bytes: int | None = None
    n_rows: int | None = None


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


def _class_labels(classes: Any, names: list[str] | None, probe: str) -> tuple[int, ...] | None:
    """A probe's classes as sorted integer labels; class names go through ``names``."""
    if classes is None:
        return None
    if isinstance(classes, str):
        raise TypeError(f"probe {probe!r}: classes must be a collection of labels, got the string {classes!r}")
    classes = set(classes)
    named = {c for c in classes if isinstance(c, str)}
    if not named:
        return tuple(sorted(int(c) for c in classes))
    if named != classes:
        raise ValueError(f"probe {probe!r}: classes {classes} mix class names and integer labels; use one or the other")
    if names is None:
        raise ValueError(f"probe {probe!r}: classes {sorted(named)} are class names, but nothing maps them to "
                         "integer labels; pass label_names=[...] too (label_names[i] names label i, e.g. "
                         "label_names=train.label_names), or give the integer labels")
    unknown = sorted(named - set(names))
    if unknown:
        raise ValueError(f"probe {probe!r}: classes {unknown} are not among label_names {names}")
    return tuple(sorted(names.index(c) for c in named))


class ProbeConfig:
    """What to probe and how.

    Args:
        site: Module path plus ``.output`` / ``.input`` (``"model.layers.3.output"``,
            ``"model.layers[-1].mlp.output"``).
        classes: The labels this probe predicts: any integers, or class names given
            with ``label_names``. ``None``: the distinct labels of the training set.
        label_names: The name of each integer label (``label_names[i]`` names label
            ``i``, as :attr:`ProbeDataset.label_names`): ``classes`` may then be names,
            and messages name the classes.
        pool: ``"mean"`` (default), ``"last"``, ``"first"``, ``"max"``, or ``"none"``
            for token-level probes (one row per labeled token; needs token labels,
            see :meth:`ProbeDataset.from_tagged`).
        name: Unique probe name (default: the site string).
        standardize: Standardize features with running moments before the estimator.
        head: ``"linear"`` (SGD; more than two classes one-vs-rest, as ``SGDClassifier``),
            ``"softmax"`` (SGD on one multinomial logistic regression, as an offline
            ``LogisticRegression``: :mod:`lm_probe.probes.softmax`) or ``"mlp"`` (scikit-learn's
            MLP, ``hidden_size`` units).
        task: ``"classification"`` or ``"regression"`` (continuous targets; metrics
            ``r2``, ``mse``, ``pearson``).
        hidden_size: Hidden units of the ``mlp`` head.
        control: Also train a control-task twin on the same activations in the same
            pass (Hewitt and Liang, 2019); metrics gain ``control_accuracy`` and
            ``selectivity``.
        solver: ``"sgd"`` (default: online, batch by batch) or ``"lbfgs"`` (linear
            classifiers: scikit-learn's ``LogisticRegression`` fit on all the fit rows at
            the end of the first epoch, ``C`` chosen from ``Cs``); see :data:`SOLVERS`.
        Cs: The ``C`` grid of ``solver="lbfgs"`` (default :data:`DEFAULT_CS`).
        cv: How ``solver="lbfgs"`` chooses ``C``: by the mean log-loss of a ``cv``-fold
            stratified cross-validation over the fit and validation rows together (default
            5, as ``LogisticRegressionCV``), or, with ``cv="validation"``, by the log-loss
            on the validation split alone (5 folds when there is none). Either way the
            probe is then refit with that ``C`` on the fit and validation rows.
        patience, warmup_steps, max_steps: This probe's own early stopping and step
            budget, in place of the values given to ``fit_probes`` (``None``: those; see
            :data:`PER_PROBE`). Patience counts validation evaluations, one every
            ``fit_probes(eval_every=...)`` steps.
        **probe_kwargs: Passed to the estimator (for the linear classifier: ``alpha``,
            ``penalty``, ``learning_rate``, ``eta0``, ``class_weight`` as a dict...), on
            top of :data:`DEFAULT_PROBE_KWARGS` for the linear classifier. The original
            lm_probe's ``test_size``, ``threshold``, ``null_label`` and ``model_kwargs``
            are accepted with a warning (:data:`ORIGINAL_ARGUMENTS`).
    """

    def __init__(
        self,
        site: str,
        classes: Iterable[int] | Iterable[str] | None = None,
        *,
        label_names: Sequence[str] | None = None,
        pool: str = "mean",
        name: str | None = None,
        standardize: bool = True,
        head: str = "linear",
        task: str = "classification",
        hidden_size: int = 64,
        control: bool = False,
        solver: str = "sgd",
        Cs: Iterable[float] | None = None,
        cv: int | str | None = None,
        patience: int | None = None,
        warmup_steps: int | None = None,
        max_steps: int | None = None,
        **probe_kwargs: Any,
    ) -> None:
        if not isinstance(site, str):
            raise TypeError(f"site must be a string such as 'model.layers.3.output', got {site!r}")
        label = name or site
        if (task, head) not in _HEADS:
            raise ValueError(f"probe {label!r}: head must be 'linear', 'softmax' (classification) or 'mlp', and "
                             f"task 'classification' or 'regression', got head={head!r}, task={task!r}")
        self.site, self.head, self.task = site, head, task
        self.label_names = None if label_names is None else [str(n) for n in label_names]
        self.classes = _class_labels(classes, self.label_names, label)
        if task == "regression" and classes is not None:
            raise ValueError(f"probe {label!r}: a regression probe has no classes")
        if self.classes is not None and len(self.classes) < 2:
            raise ValueError(f"probe {label!r}: classes={format_labels(self.classes, self.label_names)} needs at "
                             "least two classes")
        if control and task != "classification":
            raise ValueError(f"probe {label!r}: control tasks are defined for classification probes")
        self.pool = check_pool(pool)
        self.name = label
        self.standardize, self.hidden_size, self.control = bool(standardize), int(hidden_size), bool(control)
        if solver not in SOLVERS:
            raise ValueError(f"probe {label!r}: solver must be one of {SOLVERS}, got {solver!r}")
        if solver == "lbfgs" and (head, task) != ("linear", "classification"):
            raise ValueError(f"probe {label!r}: solver='lbfgs' fits linear classifiers; got head={head!r}, "
                             f"task={task!r} (use solver='sgd')")
        if Cs is not None and solver != "lbfgs":
            raise ValueError(f"probe {label!r}: Cs is the C grid of solver='lbfgs'; the SGD head takes alpha")
        self.solver = solver
        self.Cs = None if solver != "lbfgs" else tuple(float(c) for c in (DEFAULT_CS if Cs is None else Cs))
        if self.Cs is not None and (not self.Cs or min(self.Cs) <= 0):
            raise ValueError(f"probe {label!r}: Cs must be positive values of C, got {Cs!r}")
        if cv is not None and solver != "lbfgs":
            raise ValueError(f"probe {label!r}: cv is how solver='lbfgs' chooses C; the SGD head stops early on "
                             "the validation split instead (remove cv, or add solver='lbfgs')")
        if cv is not None and cv != "validation" and (not isinstance(cv, (int, np.integer)) or cv < 2):
            raise ValueError(f"probe {label!r}: cv is the number of cross-validation folds of solver='lbfgs' "
                             f"(at least 2), or 'validation' to choose C on the validation split; got {cv!r}")
        self.cv = None if solver != "lbfgs" else cv if cv == "validation" else int(cv or 5)
        if solver == "lbfgs" and "C" in probe_kwargs:
            raise ValueError(f"probe {label!r}: solver='lbfgs' chooses C from Cs; give Cs=[{probe_kwargs['C']}] "
                             "to fix it")
        for key, value, least in (("patience", patience, 1), ("warmup_steps", warmup_steps, 0),
                                  ("max_steps", max_steps, 1)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value < least):
                raise ValueError(f"probe {label!r}: {key} must be an integer of at least {least} (or None: "
                                 f"fit_probes' value), got {value!r}")
            setattr(self, key, None if value is None else int(value))
        probe_kwargs = _from_original(probe_kwargs)
        estimator = self.estimator
        unknown = sorted(set(probe_kwargs) - _PARAMS[estimator])
        if unknown:
            raise TypeError(
                f"probe {self.name!r}: unknown {estimator.__name__} arguments {unknown}; "
                f"valid ones are {sorted(_PARAMS[estimator] - {'loss'})}"
            )
        if estimator is SGDClassifier and probe_kwargs.get("loss", "log_loss") != "log_loss":
            raise ValueError(f"probe {self.name!r}: only loss='log_loss' gives probabilities; remove 'loss'")
        if probe_kwargs.get("class_weight") == "balanced":
            raise ValueError(
                f"probe {self.name!r}: class_weight='balanced' cannot be used with partial_fit; "
                "pass a dict such as {0: 1.0, 1: 3.0}"
            )
        defaults = dict(_DEFAULTS[estimator]) if solver == "sgd" else dict(_LBFGS_DEFAULTS)
        if head == "mlp":
            defaults["hidden_layer_sizes"] = (self.hidden_size,)
        self.probe_kwargs: dict[str, Any] = {**defaults, **probe_kwargs}

    @property
    def estimator(self) -> type:
        """The scikit-learn estimator class of this probe."""
        return LogisticRegression if getattr(self, "solver", "sgd") == "lbfgs" else _HEADS[(self.task, self.head)]

    def training(self, **defaults: Any) -> dict[str, Any]:
        """``fit_probes``' training settings, with this probe's own :data:`PER_PROBE`
        values in place of the ones it sets (``config.training(patience=5, min_delta=1e-4)``)."""
        own = {key: getattr(self, key, None) for key in PER_PROBE}  # None also in configs pickled before them
        return {key: value if own.get(key) is None else own[key] for key, value in defaults.items()}

    def __repr__(self) -> str:
        own = {k: getattr(self, k, None) for k in PER_PROBE if getattr(self, k, None) is not None}
        extra = "".join(f", {k}={v!r}" for k, v in {**own, **self.probe_kwargs}.items())
        solver = "" if self.solver == "sgd" else f", solver={self.solver!r}"
        names = "" if getattr(self, "label_names", None) is None else f", label_names={self.label_names!r}"
        return (f"ProbeConfig({self.site!r}, classes={self.classes}, pool={self.pool!r}, head={self.head!r}, "
                f"task={self.task!r}, name={self.name!r}{names}{solver}{extra})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProbeConfig) and vars(self) == vars(other)


class Probe(Consumer):
    """An online probe on one (site, pooling): a classifier or a regressor.

    Args:
        config: The probe's configuration.
        classes: The classes to predict (overrides ``config.classes`` when that is None).
        random_state: Seed of the estimator.
        name: Override the probe's name (control twins are ``"<name> [control]"``).

    Attributes:
        estimator_: The scikit-learn estimator (best validation state once trained).
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
        kwargs = dict(self.config.probe_kwargs)
        self._lbfgs = self.config.solver == "lbfgs"
        sgd_linear = self.config.head in _SGD_LINEAR and not self._lbfgs
        self._average = kwargs.pop("average", False) if sgd_linear else False
        if sgd_linear:
            kwargs["average"] = False  # averaged here: see DEFAULT_PROBE_KWARGS
        if kwargs.get("alpha") == "auto":
            kwargs["alpha"] = default_alpha(self.n_rows_)
        self.estimator_ = self.config.estimator(random_state=self.random_state, **kwargs)
        self._eta0 = float(getattr(self.estimator_, "eta0", 0.0) or 0.0)
        self._rows: list[np.ndarray] = []  # solver="lbfgs": the fit rows, until solved
        self._row_targets: list[np.ndarray] = []
        self._row_keys: list[np.ndarray] = []
        self._row_bytes = 0
        self.C_: float | None = None
        self.converged_: bool | None = None
        self.n_epochs_ = 0
        self.lr_scale_ = 1.0
        self._running: tuple[np.ndarray, np.ndarray] | None = None  # plain SGD weights under the average
        self._avg: tuple[np.ndarray, np.ndarray] | None = None
        self._seen = 0
        self._n, self._mean, self._m2 = 0, 0.0, 0.0
        self.n_steps_ = 0
        self.best_loss_ = float("inf")
        self.best_step_: int | None = None
        self.stopped_reason_ = StopReason.NONE
        self._best: tuple | None = None
        self.history_: list[tuple[int, float]] = []
        settings = self._training
        self._val, self._relabel = settings.validation, settings.relabel
        self._stopper = copy.deepcopy(settings.early_stopping)
        self._decay = copy.deepcopy(settings.decay) if self._eta0 and not self._lbfgs else None
        self._max_row_bytes = settings.max_row_bytes
        self._eval_every, self._max_steps = settings.eval_every, settings.max_steps
        self.n_nonfinite_ = int(settings.n_nonfinite)

    def reset_estimator_alpha(self) -> None:
        """Resolve ``alpha="auto"`` again for :attr:`n_rows_` (a probe loaded from disk)."""
        if self.config.probe_kwargs.get("alpha") == "auto" and not self._lbfgs:
            self.estimator_.set_params(alpha=default_alpha(self.n_rows_))

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
        """The standardization's running float64 moments ``(n, mean, m2)``: rows seen,
        ``(hidden,)`` mean and sum of squared deviations (``scale_`` divides ``m2`` by n)."""
        return int(self._n), np.atleast_1d(np.asarray(self._mean, np.float64)), \
            np.atleast_1d(np.asarray(self._m2, np.float64))

    def load_moments(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Set the standardization's moments (as :attr:`moments` gives them), for a trainer
        that keeps them outside :meth:`partial_fit` (the torch probe bank)."""
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

    def partial_fit(self, X: np.ndarray, y: np.ndarray) -> "Probe":
        """One step on a batch ``X (rows, hidden)``, targets ``y (rows,)``."""
        if self.config.standardize:
            self._n, self._mean, self._m2 = welford_update(self._n, self._mean, self._m2, X)
        est = self.estimator_
        if self._running is not None:  # step from the plain SGD weights, not their average
            est.coef_, est.intercept_ = self._running[0].copy(), self._running[1].copy()
        if self.is_classifier:
            est.partial_fit(self._transform(X), y, classes=self.classes_)
        else:
            est.partial_fit(self._transform(X), np.asarray(y, np.float64))
        if self._average:
            self._running = (est.coef_.copy(), np.atleast_1d(est.intercept_).copy())
            weight = float(asgd_weight(self._seen, len(y), self._average))
            if self._avg is None:
                self._avg = (self._running[0].copy(), self._running[1].copy())
            else:
                self._avg = tuple(a + (r - a) * weight for a, r in zip(self._avg, self._running))
            if self._seen + len(y) >= int(self._average):
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
            raise TypeError(f"probe {self.name!r}: context.training[{self.name!r}] must be an lm_probe.probes.probe.Training, "
                            f"got {type(settings).__name__}")
        if settings.classes is not None:
            self._classes = np.asarray(sorted(int(c) for c in settings.classes), dtype=np.int64)
        self._training = settings
        self.n_rows_ = None if settings.n_rows is None else int(settings.n_rows)
        self.reset()

    def targets(self, batch: PooledBatch) -> np.ndarray:
        """This probe's targets for a batch's rows (``IGNORE`` where unlabeled)."""
        token = self.config.pool == "none"
        if self._relabel is not None:
            if token:
                return np.concatenate([self._relabel[i] for i in batch.index])
            return np.asarray(self._relabel)[batch.index]
        if token:
            if batch.token_labels is None:
                raise ValueError(f"probe {self.name!r} uses pool='none' but the data has no token labels; "
                                 "build it with ProbeDataset.from_tagged(...)")
            return batch.token_labels
        return batch.labels

    def update(self, batch: PooledBatch) -> None:
        X, y = batch.acts[self.requests[0]], self.targets(batch)
        keep, finite = _labeled(y), finite_rows(X)
        self.count_nonfinite(batch, keep & ~finite)
        keep &= finite
        X, y = X[keep], y[keep]
        if len(y) == 0:
            return
        self.n_epochs_ = max(self.n_epochs_, batch.epoch + 1)
        if self._lbfgs:
            has_ids = batch.example_ids is not None or batch.index is not None
            ids, positions = batch.row_ids(self.config.pool == "none") if has_ids else (None, None)
            self._collect(X, y, None if ids is None else np.stack([ids, positions], 1)[keep])
            return
        self.partial_fit(X, y)
        self.after_step()

    # ------------------------------------------------------------ solver="lbfgs"
    def _collect(self, X: np.ndarray, y: np.ndarray, keys: np.ndarray | None) -> None:
        """Keep a batch's rows, with their ``(example id, token position)`` keys, for the
        full-batch solve (and fold them into the moments)."""
        rows = np.array(X, np.float32)
        self._row_bytes += rows.nbytes
        if self._max_row_bytes is not None and self._row_bytes > self._max_row_bytes:
            raise MemoryError(f"probe {self.name!r}: solver='lbfgs' needs all its fit rows in memory, more than "
                              f"the {self._max_row_bytes / 2**20:.1f} MiB of the cache budget; raise "
                              "Cache(memory_budget=...) or use solver='sgd'")
        if self.config.standardize:
            self._n, self._mean, self._m2 = welford_update(self._n, self._mean, self._m2, X)
        self._rows.append(rows)
        self._row_targets.append(np.asarray(y))
        if keys is not None:
            self._row_keys.append(keys)
        self.n_steps_ += 1

    def on_event(self, event: str, step: int, epoch: int) -> None:
        """``solver="lbfgs"``: solve at the end of the first epoch (then the probe is done)."""
        if self._lbfgs and event == "epoch_end" and self._rows:
            self._solve()

    def _solve(self) -> None:
        """Fit L2 logistic regressions on the standardized rows for each ``C`` of the grid,
        choose the ``C`` of the lowest log-loss (``best_loss_``): cross-validated over the
        fit and validation rows together (``config.cv`` folds), or on the validation split
        (``cv="validation"``); then refit with it on the fit and validation rows, as
        ``LogisticRegressionCV`` refits on all its rows."""
        from sklearn.metrics import log_loss

        X, y = self._transform(np.vstack(self._rows)), np.concatenate(self._row_targets)
        if self._row_keys:  # rows in example-id order: folds free of batch order (keys come with every batch)
            keys = np.concatenate(self._row_keys)
            order = np.lexsort((keys[:, 1], keys[:, 0]))
            X, y = X[order], y[order]
        self._rows, self._row_targets, self._row_keys = [], [], []
        missing = sorted(set(self.classes_.tolist()) - set(np.unique(y).tolist()))
        if missing:
            raise ValueError(f"probe {self.name!r}: solver='lbfgs' needs every class in the fit rows; classes "
                             f"{format_labels(missing, getattr(self.config, 'label_names', None))} have none")
        kwargs = dict(self.config.probe_kwargs)
        Cs, folds = self.config.Cs, getattr(self.config, "cv", "validation")  # configs saved before cv

        def fit(C: float, X: np.ndarray, y: np.ndarray) -> LogisticRegression:
            return LogisticRegression(C=C, random_state=self.random_state, **kwargs).fit(X, y)

        on_validation = self._val is not None and folds == "validation"
        if on_validation:
            Xv, yv = self._transform(self._val[0]), self._val[1]
            losses = [float(log_loss(yv, fit(C, X, y).predict_proba(Xv), labels=self.classes_)) for C in Cs]
        else:
            if self._val is not None:
                X, y = np.vstack([X, self._transform(self._val[0])]), np.concatenate([y, self._val[1]])
            with warnings.catch_warnings():  # scikit-learn 1.8 announces new defaults we do not rely on
                warnings.simplefilter("ignore", FutureWarning)
                cv = LogisticRegressionCV(Cs=list(Cs), cv=5 if folds == "validation" else folds,
                                          scoring="neg_log_loss", refit=False, random_state=self.random_state,
                                          **kwargs).fit(X, y)
            losses = (-next(iter(cv.scores_.values())).mean(axis=0)).tolist()  # (folds, Cs) -> per C
        best = int(np.argmin(losses))
        self.best_loss_, self.C_ = float(losses[best]), Cs[best]
        self.history_.extend((self.n_steps_, float(loss)) for loss in losses)
        if on_validation:
            X, y = np.vstack([X, Xv]), np.concatenate([y, yv])  # as LogisticRegressionCV: refit on all rows
        self.estimator_ = fit(self.C_, X, y)
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
        """Count one training step taken outside :meth:`partial_fit` (by the torch probe
        bank). Returns whether the validation set is scored after it: the trainer then
        loads the current weights (:meth:`load_weights`) before :meth:`after_step`."""
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
        loss = self.score(*self._val)["loss"]
        self.history_.append((self.n_steps_, loss))
        stop, reason = self._stopper.check(loss, self.n_steps_)
        if self._decay is not None and decide:
            self.lr_scale_ = self._decay.check(self._stopper.improved_)
            self.estimator_.eta0 = self._eta0 * self.lr_scale_
        if self._stopper.improved_:
            self.best_loss_, self.best_step_ = loss, self.n_steps_
            self._best = (copy.deepcopy(self.estimator_), np.copy(self._mean), np.copy(self._m2), self._n)
        if stop and decide:
            self._stop(reason)

    def _stop(self, reason: StopReason) -> None:
        self.stopped_reason_ = reason
        logger.trace("probe {!r} stopped after {} steps: {}", self.name, self.n_steps_, reason)

    def finish(self) -> None:
        """End of training: score the final weights too, then restore the best ones."""
        if self._lbfgs and self._rows:
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
            "n_steps": self.n_steps_,
            "best_val_loss": self.best_loss_,
            "best_step": self.best_step_,
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
        return f"Probe({self.name!r}, {self.config.task}/{self.config.head}, steps={self.n_steps_}, stop={self.stopped_reason_})"


#: The name of issue 2's API; every head is a :class:`Probe`.
LinearProbe = Probe


def _labeled(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.floating):
        return np.isfinite(y)
    return y != IGNORE
