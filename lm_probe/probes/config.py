"""What a probe is: :class:`ProbeConfig`, its heads and lm_probe's defaults for them.

A config names a site and a pooling, the head (``"auto"``, ``"linear"``, ``"softmax"``, ``"mlp"``)
and task (classification or regression) that choose the scikit-learn estimator, the
solver (``"sgd"`` online, or ``"lbfgs"`` full-batch, see :data:`SOLVERS`), and the
estimator's arguments on top of lm_probe's defaults (:data:`DEFAULT_PROBE_KWARGS`;
``alpha="auto"``: :func:`default_alpha`). Every argument is checked when the config is
built, before any model runs; the original lm_probe's arguments are accepted with a
warning (:data:`ORIGINAL_ARGUMENTS`).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression, SGDRegressor
from sklearn.neural_network import MLPClassifier, MLPRegressor

from ..core.labels import format_labels
from ..core.pooling import check_pool
from .online_sgd import OnlineSGDClassifier
from .original import ORIGINAL_ARGUMENTS, from_original
from .softmax import SCHEDULES as SOFTMAX_SCHEDULES
from .softmax import SoftmaxSGDClassifier

__all__ = ["ProbeConfig", "DEFAULT_PROBE_KWARGS", "DEFAULT_CS", "DEFAULT_SGD_C", "SGD_CS", "SOFTMAX_ETA0", "SOLVERS",
           "SCORINGS", "PER_PROBE", "ORIGINAL_ARGUMENTS", "default_alpha"]

_HEADS: dict[tuple[str, str], type] = {
    ("classification", "auto"): OnlineSGDClassifier,  # its arguments; by the classes: ProbeConfig.resolve_head
    ("classification", "linear"): OnlineSGDClassifier,  # SGDClassifier, its later steps in numpy
    ("classification", "softmax"): SoftmaxSGDClassifier,
    ("classification", "mlp"): MLPClassifier,
    ("regression", "auto"): SGDRegressor,
    ("regression", "linear"): SGDRegressor,
    ("regression", "mlp"): MLPRegressor,
}
_PARAMS = {cls: frozenset(cls().get_params()) for cls in (*_HEADS.values(), LogisticRegression)}
#: Heads trained by SGD steps on a linear model: the probe averages their iterates and
#: decays their step (``"softmax"``: multinomial, see :mod:`lm_probe.probes.softmax`).
_SGD_LINEAR = ("auto", "linear", "softmax")
#: What ``head="auto"`` may pass on to the softmax head it trains for more than two classes.
_SOFTMAX_PARAMS = frozenset(SoftmaxSGDClassifier().get_params())
_SGD_DEFAULTS = OnlineSGDClassifier().get_params()

#: ``"sgd"``: the online head (SGD, or the MLP's own optimizer) trained batch by batch.
#: ``"lbfgs"``: a full-batch L2 logistic regression on all the fit rows, at the end of the
#: first epoch, with ``C`` chosen on the validation split.
SOLVERS = ("sgd", "lbfgs")
#: What ``solver="lbfgs"`` may choose ``C`` by (held-out accuracy, ties to log-loss; or log-loss).
SCORINGS = ("accuracy", "log_loss")
#: The grid of inverse regularization strengths ``C`` searched by ``solver="lbfgs"``
#: (the same grid as scikit-learn's ``LogisticRegressionCV(Cs=10)``).
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 4, 10))
_LBFGS_DEFAULTS: dict[str, Any] = {"max_iter": 1000}
#: The default ``C`` grid of the SGD twins (:mod:`lm_probe.probes.twins`): on
#: benchmarks/quality_sweep.py's real activations (675 training rows, 64 to 576 features) the
#: offline ceiling's 5-fold choice of ``C`` ranged from 0.0008 to 1,292 (0.006 for most
#: decoder probes); with these five twins and the converging schedule the defaults met the
#: 0.02 / 0.05 gap targets on 4 and 5 of its 6 (model, task) pairs (seeds 0 and 1; README).
SGD_CS: tuple[float, ...] = (0.001, 0.005, 0.05, 0.5, 1e4)

#: lm_probe's defaults for ``SGDClassifier`` (and the softmax head, at its own
#: :data:`SOFTMAX_ETA0`), overridden by any keyword given to a ProbeConfig. scikit-learn's own default schedule
#: (``learning_rate="optimal"``) makes online probes far too confident on real activations
#: (test log-loss near 10 on the demo data at 85% of the accuracy), which defeats early
#: stopping on validation log-loss; a constant step that ``fit_probes``' ``lr_decay``
#: halves on validation plateaus converges instead, and averaging the iterates (ASGD)
#: smooths the last epochs. ``eta0=0.003``: on benchmarks/quality_sweep.py's six (model,
#: task) pairs 0.01 did as well, but with 32-example batches on the notebooks' sentiment task
#: it left the probes 0.05 below the offline ceiling on average (0.004 at 0.003).
#:
#: ``alpha="auto"`` is the L2 strength of ``LogisticRegression(C=DEFAULT_SGD_C)`` on the
#: probe's training rows, ``alpha = 1 / (DEFAULT_SGD_C * rows)`` (:func:`default_alpha`):
#: regularization that weakens as the data grows, as a cross-validated ``C`` does. On
#: benchmarks/quality.py's real activations (675 training rows) ``LogisticRegressionCV``
#: chose ``C`` near 0.006 for most probes, where scikit-learn's ``alpha=1e-4`` is ``C``
#: near 15 and leaves regularization to early stopping alone.
#:
#: ``average`` is implemented by the probe, not by scikit-learn: with ``partial_fit``,
#: scikit-learn 1.x restarts the running intercept of an averaged SGD from a stale value
#: on every call (binary: ``_standard_intercept`` is only stored before averaging
#: starts; multi-class: the averaged intercept is overwritten by the running one), so
#: its averaged intercept is shrunk towards 0 (0.22 instead of 1.75 on a 3:1 toy set).
#: The probe trains a plain SGD (``average=False``) and keeps the average of its
#: iterates after each batch, weighted by the batch's rows (:func:`asgd_weight`).
DEFAULT_PROBE_KWARGS: dict[str, Any] = {"learning_rate": "constant", "eta0": 0.003, "average": True, "alpha": "auto"}
#: The softmax head's step (``head="softmax"``, and ``head="auto"`` past two classes) unless
#: ``eta0`` is given: it steps 4 rows at a time whatever the batch size, so the binary
#: head's caution about 32-example batches does not apply. On benchmarks/quality_sweep.py's
#: two 6-class tasks (seeds 0 and 1) 0.01 was as good as 0.003 or better: decoder gap
#: +0.021 / +0.064 and +0.036 / +0.092 against +0.023 / +0.100 and +0.045 / +0.128, encoder
#: -0.012 / +0.004 and -0.007 / +0.008 against -0.005 / +0.024 and -0.011 / -0.004. On
#: notebook 02's 7 word classes (7,500 token rows) it cost 0.001-0.004 at 9 of 11 layers.
SOFTMAX_ETA0 = 0.01
#: ``alpha="auto"``'s regularization in LogisticRegression's units (see :func:`default_alpha`).
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
    OnlineSGDClassifier: {"loss": "log_loss", **DEFAULT_PROBE_KWARGS},
    SoftmaxSGDClassifier: {**DEFAULT_PROBE_KWARGS, "eta0": SOFTMAX_ETA0},
    SGDRegressor: {},  # scikit-learn's: squared error, inverse-scaling step
    MLPClassifier: {},
    MLPRegressor: {},
}


#: ``fit_probes`` settings that a :class:`ProbeConfig` may set for its own probe, as the
#: original lm_probe's ProbeConfig did (``None``: the value given to ``fit_probes``).
PER_PROBE = ("patience", "warmup_steps", "max_steps")

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
        head: ``"auto"`` (default: ``"softmax"`` for a classifier of more than two
            classes, else ``"linear"``; :meth:`resolve_head`), ``"linear"`` (SGD; more than
            two classes one-vs-rest, as ``SGDClassifier``), ``"softmax"`` (SGD on one
            multinomial logistic regression, as an offline ``LogisticRegression``:
            :mod:`lm_probe.probes.softmax`) or ``"mlp"`` (scikit-learn's MLP,
            ``hidden_size`` units).
        task: ``"classification"`` or ``"regression"`` (continuous targets; metrics
            ``r2``, ``mse``, ``pearson``).
        hidden_size: Hidden units of the ``mlp`` head.
        control: Also train a control-task twin on the same activations in the same
            pass (Hewitt and Liang, 2019); metrics gain ``control_accuracy`` and
            ``selectivity``.
        solver: ``"sgd"`` (default: online, batch by batch) or ``"lbfgs"`` (linear
            classifiers: scikit-learn's ``LogisticRegression`` fit on all the fit rows at
            the end of the first epoch, ``C`` chosen from ``Cs``); see :data:`SOLVERS`.
        Cs: The ``C`` grid of ``solver="lbfgs"`` (default :data:`DEFAULT_CS`). With the SGD
            linear or softmax classifier: train one twin per ``C``, with ``alpha = 1 / (C *
            rows)`` (:func:`default_alpha`), side by side on the same batches, and keep the
            one of lowest validation log-loss (:class:`~lm_probe.probes.twins.TwinProbe`);
            default :data:`SGD_CS`, unless ``alpha`` is given; ``Cs=()``: one probe at
            ``alpha="auto"``.
        cv: How ``solver="lbfgs"`` chooses ``C``: by the mean log-loss of a ``cv``-fold
            stratified cross-validation over the fit and validation rows together (default
            5, as ``LogisticRegressionCV``), or, with ``cv="validation"``, by the log-loss
            on the validation split alone (5 folds when there is none). Either way the
            probe is then refit with that ``C`` on the fit and validation rows.
        scoring: What ``solver="lbfgs"`` chooses ``C`` by: ``"accuracy"`` (default, as
            ``LogisticRegressionCV``; ties go to the lower log-loss) or ``"log_loss"``.
        patience, warmup_steps, max_steps: This probe's own early stopping and step
            budget, in place of the values given to ``fit_probes`` (``None``: those; see
            :data:`PER_PROBE`). Patience counts validation evaluations, one every
            ``fit_probes(eval_every=...)`` steps.
        **probe_kwargs: Passed to the estimator (for the linear classifier: ``alpha``,
            ``penalty``, ``learning_rate``, ``eta0``, ``class_weight`` as a dict...), on
            top of :data:`DEFAULT_PROBE_KWARGS` for the linear classifier (the softmax head's
            step is :data:`SOFTMAX_ETA0`; :attr:`given_kwargs` keeps them as given). The original
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
        head: str = "auto",
        task: str = "classification",
        hidden_size: int = 64,
        control: bool = False,
        solver: str = "sgd",
        Cs: Iterable[float] | None = None,
        cv: int | str | None = None,
        scoring: str | None = None,
        patience: int | None = None,
        warmup_steps: int | None = None,
        max_steps: int | None = None,
        **probe_kwargs: Any,
    ) -> None:
        if not isinstance(site, str):
            raise TypeError(f"site must be a string such as 'model.layers.3.output', got {site!r}")
        label = name or site
        if (task, head) not in _HEADS:
            raise ValueError(f"probe {label!r}: head must be 'auto', 'linear', 'softmax' (classification) or "
                             f"'mlp', and task 'classification' or 'regression', got head={head!r}, task={task!r}")
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
        self._set_solver(solver, Cs, cv, scoring, probe_kwargs)
        self._set_own(patience=patience, warmup_steps=warmup_steps, max_steps=max_steps)
        #: The estimator arguments as given; ``probe_kwargs``: its estimator's defaults under them.
        self.given_kwargs: dict[str, Any] = from_original(probe_kwargs)
        self.probe_kwargs: dict[str, Any] = self._estimator_kwargs(self.given_kwargs)

    def _set_solver(self, solver: str, Cs: Iterable[float] | None, cv: int | str | None, scoring: str | None,
                    probe_kwargs: dict[str, Any]) -> None:
        """Check and set ``solver``, ``Cs`` (its C grid), ``cv`` and ``scoring`` (how it chooses C)."""
        label, head, task = self.name, self.head, self.task
        if solver not in SOLVERS:
            raise ValueError(f"probe {label!r}: solver must be one of {SOLVERS}, got {solver!r}")
        if solver == "lbfgs" and (head not in ("auto", "linear") or task != "classification"):
            raise ValueError(f"probe {label!r}: solver='lbfgs' fits linear classifiers; got head={head!r}, "
                             f"task={task!r} (use solver='sgd')")
        if Cs is not None and solver == "sgd" and (head not in _SGD_LINEAR or task != "classification"):
            raise ValueError(f"probe {label!r}: Cs is the C grid of solver='lbfgs' or of the SGD linear and softmax "
                             f"classifiers; head={head!r}, task={task!r} takes alpha")
        if Cs is not None and solver == "sgd" and probe_kwargs.get("alpha", "auto") != "auto":
            raise ValueError(f"probe {label!r}: Cs gives each SGD twin its alpha = 1 / (C * rows); remove alpha="
                             f"{probe_kwargs['alpha']!r}, or Cs")
        self.solver = solver
        twins = solver == "sgd" and head in _SGD_LINEAR and task == "classification" and "alpha" not in probe_kwargs
        default = DEFAULT_CS if solver == "lbfgs" else SGD_CS if twins else ()
        self.Cs = tuple(float(c) for c in (default if Cs is None else Cs)) or None  # None: one SGD probe, its alpha
        if Cs is not None and ((not self.Cs and solver == "lbfgs") or min(self.Cs or (1,)) <= 0):
            raise ValueError(f"probe {label!r}: Cs must be positive values of C, got {Cs!r}")
        self.l2_C = DEFAULT_SGD_C  # alpha="auto"'s C (an SGD twin's own, see lm_probe.probes.twins)
        if cv is not None and solver != "lbfgs":
            raise ValueError(f"probe {label!r}: cv is how solver='lbfgs' chooses C; the SGD head stops early on "
                             "the validation split instead (remove cv, or add solver='lbfgs')")
        if cv is not None and cv != "validation" and (not isinstance(cv, (int, np.integer)) or cv < 2):
            raise ValueError(f"probe {label!r}: cv is the number of cross-validation folds of solver='lbfgs' "
                             f"(at least 2), or 'validation' to choose C on the validation split; got {cv!r}")
        self.cv = None if solver != "lbfgs" else cv if cv == "validation" else int(cv or 5)
        if scoring is not None and (solver != "lbfgs" or scoring not in SCORINGS):
            raise ValueError(f"probe {label!r}: scoring is what solver='lbfgs' chooses C by, one of {SCORINGS}; "
                             f"got scoring={scoring!r} with solver={solver!r}")
        self.scoring = None if solver != "lbfgs" else scoring or "accuracy"
        if solver == "lbfgs" and "C" in probe_kwargs:
            raise ValueError(f"probe {label!r}: solver='lbfgs' chooses C from Cs; give Cs=[{probe_kwargs['C']}] "
                             "to fix it")

    def _set_own(self, **own: int | None) -> None:
        """Check and set this probe's own :data:`PER_PROBE` settings (``None``: fit_probes')."""
        for key, least in (("patience", 1), ("warmup_steps", 0), ("max_steps", 1)):
            value = own[key]
            if value is not None and (not isinstance(value, (int, np.integer)) or value < least):
                raise ValueError(f"probe {self.name!r}: {key} must be an integer of at least {least} (or None: "
                                 f"fit_probes' value), got {value!r}")
            setattr(self, key, None if value is None else int(value))

    def _estimator_kwargs(self, probe_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The estimator's arguments: lm_probe's defaults for it, then ``probe_kwargs``, checked."""
        estimator = self.estimator
        unknown = sorted(set(probe_kwargs) - _PARAMS[estimator])
        if unknown:
            raise TypeError(
                f"probe {self.name!r}: unknown {'SGDClassifier' if estimator is OnlineSGDClassifier else estimator.__name__} "
                f"arguments {unknown}; "
                f"valid ones are {sorted(_PARAMS[estimator] - {'loss'})}"
            )
        if estimator is OnlineSGDClassifier and probe_kwargs.get("loss", "log_loss") != "log_loss":
            raise ValueError(f"probe {self.name!r}: only loss='log_loss' gives probabilities; remove 'loss'")
        if probe_kwargs.get("class_weight") == "balanced":
            raise ValueError(
                f"probe {self.name!r}: class_weight='balanced' cannot be used with partial_fit; "
                "pass a dict such as {0: 1.0, 1: 3.0}"
            )
        defaults = dict(_DEFAULTS[estimator]) if self.solver == "sgd" else dict(_LBFGS_DEFAULTS)
        if self.head == "mlp":
            defaults["hidden_layer_sizes"] = (self.hidden_size,)
        return {**defaults, **probe_kwargs}

    @property
    def estimator(self) -> type:
        """The scikit-learn estimator class of this probe."""
        return LogisticRegression if getattr(self, "solver", "sgd") == "lbfgs" else _HEADS[(self.task, self.head)]

    def resolve_head(self, n_classes: int | None) -> str:
        """The head trained for ``n_classes`` classes: ``head``, or for ``"auto"`` the
        multinomial ``"softmax"`` when a classifier has more than two classes (as an offline
        ``LogisticRegression``: one-vs-rest SGD left 0.06 of test accuracy on average below the
        offline ceiling on a 6-class task where softmax left 0.02-0.04; README), else ``"linear"``."""
        if self.head != "auto":
            return self.head
        return "softmax" if self.task == "classification" and (n_classes or 0) > 2 else "linear"

    def build_estimator(self, random_state: int | None, n_rows: int | None = None,
                        n_classes: int | None = None) -> tuple[Any, bool | int]:
        """A fresh estimator for this probe (for ``n_classes`` classes: :meth:`resolve_head`),
        and the ``average`` the probe keeps itself.

        An SGD linear head's ``average`` is taken out of the estimator's arguments (the
        probe averages the iterates: see :data:`DEFAULT_PROBE_KWARGS`); ``alpha="auto"`` is
        resolved for ``n_rows`` training rows (:func:`default_alpha`).

        Raises:
            ValueError: ``head="auto"`` trains the softmax head, and an argument given is one
                it does not take (``SGDClassifier``'s ``penalty="l1"``...).
        """
        estimator, kwargs = self.head_kwargs(n_classes)
        sgd_linear = self.head in _SGD_LINEAR and self.solver != "lbfgs"
        average = kwargs.pop("average", False) if sgd_linear else False
        if sgd_linear:
            kwargs["average"] = False  # averaged here: see DEFAULT_PROBE_KWARGS
        if kwargs.get("alpha") == "auto":
            kwargs["alpha"] = default_alpha(n_rows, getattr(self, "l2_C", DEFAULT_SGD_C))
        return estimator(random_state=random_state, **kwargs), average

    def head_kwargs(self, n_classes: int | None) -> tuple[type, dict[str, Any]]:
        """The estimator class trained for ``n_classes`` classes and its arguments
        (``alpha`` and ``average`` as given, see :meth:`build_estimator`).

        ``head="auto"`` past two classes trains the softmax head with its own defaults
        (``eta0=SOFTMAX_ETA0``) under the arguments given: a given SGDClassifier argument left
        at scikit-learn's default is dropped, one the softmax head lacks is refused.

        Raises:
            ValueError: such an argument (``penalty="l1"``, ``learning_rate="optimal"``...).
        """
        if not (self.solver == "sgd" and self.head == "auto" and self.resolve_head(n_classes) == "softmax"):
            return self.estimator, dict(self.probe_kwargs)
        given = getattr(self, "given_kwargs", self.probe_kwargs)  # a config pickled before given_kwargs
        lacking = {k: v for k, v in given.items() if k not in _SOFTMAX_PARAMS and k != "loss"}
        refused = [f"{k}={v!r}" for k, v in lacking.items() if v != _SGD_DEFAULTS.get(k)]
        if given.get("learning_rate", "constant") not in SOFTMAX_SCHEDULES:
            refused.append(f"learning_rate={given['learning_rate']!r}")
        if refused:
            raise ValueError(f"probe {self.name!r}: head='auto' trains the multinomial softmax head for {n_classes} "
                             f"classes, which does not take {', '.join(refused)}; give head='linear' for one-vs-rest "
                             "SGDClassifier with them")
        own = {k: v for k, v in given.items() if k in _SOFTMAX_PARAMS}
        return SoftmaxSGDClassifier, {**_DEFAULTS[SoftmaxSGDClassifier], **own}

    def training(self, **defaults: Any) -> dict[str, Any]:
        """``fit_probes``' training settings, with this probe's own :data:`PER_PROBE`
        values in place of the ones it sets (``config.training(patience=5, min_delta=1e-4)``)."""
        own = {key: getattr(self, key, None) for key in PER_PROBE}  # None also in configs pickled before them
        return {key: value if own.get(key) is None else own[key] for key, value in defaults.items()}

    def __repr__(self) -> str:
        own = {k: getattr(self, k, None) for k in PER_PROBE if getattr(self, k, None) is not None}
        given = getattr(self, "given_kwargs", self.probe_kwargs)  # as given: the head's defaults go under them
        extra = "".join(f", {k}={v!r}" for k, v in {**own, **given}.items())
        solver = (f", Cs={self.Cs!r}" if self.Cs else "") if self.solver == "sgd" else f", solver={self.solver!r}"
        names = "" if getattr(self, "label_names", None) is None else f", label_names={self.label_names!r}"
        return (f"ProbeConfig({self.site!r}, classes={self.classes}, pool={self.pool!r}, head={self.head!r}, "
                f"task={self.task!r}, name={self.name!r}{names}{solver}{extra})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProbeConfig) and vars(self) == vars(other)
