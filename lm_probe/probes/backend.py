"""The torch probe backend: every linear classifier of a batch updated in one tensor op.

With ``ProbeRunner(..., backend="torch")`` the linear classification probes are not
stepped one by one through scikit-learn's ``partial_fit``: a :class:`ProbeBank` holds all
their weights as one ``(probes, outputs, hidden)`` tensor on the model's device and
takes one batched SGD step per training batch, reading the pooled activations where the
trace left them (no copy to the host). What is learned is the same model as
``SGDClassifier(loss="log_loss")``:

* one-vs-rest logistic regression (one output for two classes, one per class
  otherwise), probabilities as scikit-learn's ``predict_proba`` normalizes them;
* L2 penalty ``alpha`` applied as weight decay, intercept not penalized;
* ``learning_rate="constant"`` (``eta0``) or ``"invscaling"``; averaged weights
  (``average``): the mean of the iterates, each training row counted once, as the
  scikit-learn backend keeps it (:func:`lm_probe.functional.sgd.asgd_weight`);
* standardization with running float64 moments of the probe's own training rows,
  updated with each batch before the step;
* ``class_weight`` as a dict;
* the online codelength of the first epoch's labels, each probe coded with its own
  weights before its step (:mod:`lm_probe.probes.codelength`).

scikit-learn steps once per example; the bank steps once per batch with the summed
gradient of its rows (each example still moves the weights by ``eta0`` times its own
gradient, against the weights of the batch start). Weight decay is compounded over the
batch's rows. Early stopping is unchanged: when a probe's evaluation is due, the bank
loads its current weights and moments into the probe (:meth:`Probe.load_weights`,
:meth:`Probe.load_moments`: the bank uses the probes' public methods only), so validation
scoring, snapshots of the best weights, metrics, :meth:`~lm_probe.ProbeRunner.save` and
prediction all go through scikit-learn as with the default backend.

The math is in the pure functions of :mod:`lm_probe.functional.sgd` (``ovr_targets``,
``logistic_sgd_step``, ``masked_moments``); :class:`ProbeBank` only holds state.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from loguru import logger
from sklearn.linear_model import SGDClassifier

from ..core.consumer import Consumer, Group, NotComputedError, PooledBatch, RunContext
from ..core.labels import labeled
from ..functional.codelength import ovr_proba
from ..functional.sgd import asgd_weight, logistic_sgd_step, masked_moments, ovr_targets
from .probe import Probe

__all__ = ["ProbeBank", "BACKENDS", "check_backend", "supports", "bank_for", "trainers_of"]

BACKENDS = ("sklearn", "torch")

#: SGDClassifier arguments the bank implements; the rest must keep scikit-learn's default
#: unless they do not change what ``partial_fit`` learns (the second set).
_IMPLEMENTED = {"loss", "penalty", "alpha", "fit_intercept", "learning_rate", "eta0", "power_t",
                "class_weight", "average"}
_NO_EFFECT_ON_PARTIAL_FIT = {"shuffle", "random_state", "verbose", "n_jobs", "warm_start", "tol", "max_iter",
                             "early_stopping", "validation_fraction", "n_iter_no_change", "epsilon", "l1_ratio"}
_SKLEARN_DEFAULTS = SGDClassifier().get_params()


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is one of :data:`BACKENDS`, else raise a ValueError naming them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def supports(probe: Probe) -> bool:
    """Whether the torch backend trains this probe (one linear classifier; others stay on scikit-learn)."""
    c = probe.config  # a TwinProbe is not: its twins are (bank_for)
    return c.head == "linear" and c.task == "classification" and c.solver == "sgd" and not getattr(probe, "twins", 0)


def _check_kwargs(probe: Probe) -> dict[str, Any]:
    """The probe's SGDClassifier arguments, or a ValueError naming what the bank cannot do."""
    kw = {**_SKLEARN_DEFAULTS, **probe.config.probe_kwargs}
    unsupported = sorted(k for k, v in probe.config.probe_kwargs.items()
                         if k not in _IMPLEMENTED | _NO_EFFECT_ON_PARTIAL_FIT and v != _SKLEARN_DEFAULTS.get(k))
    problems = [f"{k}={kw[k]!r}" for k in unsupported]
    if kw["penalty"] not in ("l2", None):
        problems.append(f"penalty={kw['penalty']!r} (l2 or None only)")
    if kw["learning_rate"] not in ("constant", "invscaling"):
        problems.append(f"learning_rate={kw['learning_rate']!r} ('constant' or 'invscaling' only)")
    if problems:
        raise ValueError(f"probe {probe.name!r}: backend='torch' does not implement {', '.join(problems)}; "
                         "use backend='sklearn' for this probe's settings")
    return kw


@contextmanager
def _one_thread(enabled: bool) -> Iterator[None]:
    """Run the block with one intra-op torch thread (restored after)."""
    before = torch.get_num_threads()
    if enabled and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class _Group:
    """Probes that share row layout, hidden size and number of outputs: one stacked state."""

    def __init__(self, probes: list[Probe], hidden: int, device: torch.device) -> None:
        self.probes = probes
        kws = [_check_kwargs(p) for p in probes]
        P, K = len(probes), ovr_targets(np.zeros(0), probes[0].classes_).shape[1]
        f32 = dict(dtype=torch.float32, device=device)
        f64 = dict(dtype=torch.float64, device=device)
        self.W, self.b = torch.zeros(P, K, hidden, **f32), torch.zeros(P, K, **f32)
        self.W_avg, self.b_avg = torch.zeros(P, K, hidden, **f32), torch.zeros(P, K, **f32)
        self.n, self.mean, self.m2 = torch.zeros(P, **f64), torch.zeros(P, hidden, **f64), torch.zeros(P, hidden, **f64)
        self.seen = np.zeros(P, np.int64)  # training rows seen per probe (the schedule's t)
        self.eta0 = np.array([float(k["eta0"]) for k in kws])
        self.power_t = np.array([float(k["power_t"]) for k in kws])
        self.invscaling = np.array([k["learning_rate"] == "invscaling" for k in kws])
        alphas = [p.estimator_.alpha for p in probes]  # alpha="auto" resolved by the probe for this fit
        self.alpha = torch.tensor([float(a) if k["penalty"] == "l2" else 0.0 for a, k in zip(alphas, kws)], **f32)
        self.fit_intercept = torch.tensor([float(bool(k["fit_intercept"])) for k in kws], **f32)
        self.average_from = np.array([0 if not k["average"] else int(k["average"]) for k in kws])
        self.restarted_at, self.decays = np.zeros(P, np.int64), np.zeros(P, np.int64)  # the average's restarts
        self.class_weight = [k["class_weight"] or {} for k in kws]
        self.standardize = torch.tensor([p.config.standardize for p in probes], device=device)
        self.hidden, self.device = hidden, device

    def eta(self, idx: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """``(probes, rows)`` step sizes: ``eta0``, or ``eta0 / t ** power_t`` for the row's
        own count ``t`` (1-based, over the probe's training rows), times each probe's
        ``lr_scale_`` (its step-size decay on validation plateaus); 0 on skipped rows."""
        t = self.seen[idx][:, None] + np.cumsum(masks, axis=1)
        eta0 = self.eta0[idx][:, None] * np.array([self.probes[k].lr_scale_ for k in idx])[:, None]  # plateau decay
        eta = np.where(self.invscaling[idx][:, None], eta0 / t.clip(min=1) ** self.power_t[idx][:, None], eta0)
        return np.where(masks, eta, 0.0)

    def weights(self, k: int, y: np.ndarray, T: np.ndarray) -> np.ndarray:
        """Per-row, per-output weights of probe ``k``: its class weights (scikit-learn's
        one-vs-rest use: positive class weight, 1 for the rest; binary: each class its own)."""
        cw, classes = self.class_weight[k], self.probes[k].classes_
        if not cw:
            return np.ones_like(T)
        if len(classes) == 2:
            return np.where(y == classes[1], cw.get(classes[1], 1.0), cw.get(classes[0], 1.0))[:, None].astype(np.float32)
        pos = np.array([cw.get(c, 1.0) for c in classes], np.float32)
        return np.where(T > 0, pos[None, :], 1.0).astype(np.float32)

    def standardized(self, it: torch.Tensor, X: torch.Tensor, mask: torch.Tensor, masks: np.ndarray,
                     slot: np.ndarray) -> torch.Tensor:
        """Fold the batch's labeled rows into the float64 moments of probes ``it``, and
        return ``X`` standardized with them (0 where ``mask`` is false). Probes on the same
        activations and rows (a sweep, a control twin) share the batch's moments."""
        shared: dict[tuple, tuple] = {}
        for j in range(len(it)):
            key = (slot[j], masks[j].tobytes())
            if key not in shared:
                shared[key] = masked_moments(X[j], mask[j])
        moments = [shared[(slot[j], masks[j].tobytes())] for j in range(len(it))]
        n_b, mean_b, m2_b = (torch.stack(m) for m in zip(*moments))
        n_a, mean_a, m2_a = self.n[it], self.mean[it], self.m2[it]
        n = n_a + n_b
        delta = mean_b - mean_a
        self.mean[it] = mean_a + delta * (n_b / n)[:, None]
        self.m2[it] = m2_a + m2_b + delta ** 2 * (n_a * n_b / n)[:, None]
        self.n[it] = n
        scale = torch.sqrt(self.m2[it] / n[:, None])
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        std = self.standardize[it][:, None]
        mean = torch.where(std, self.mean[it], torch.zeros_like(scale)).float()
        scale = torch.where(std, scale, torch.ones_like(scale)).float()
        zero = torch.zeros((), device=X.device)
        return torch.where(mask[..., None], (X - mean[:, None, :]) / scale[:, None, :], zero)

    def targets_and_weights(self, idx: np.ndarray, targets: list[np.ndarray],
                            masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probes, rows, outputs)`` one-vs-rest targets and row weights (0 on rows a
        probe does not train on)."""
        T_list, w_list = [], []
        for k, y, m in zip(idx, targets, masks):
            y_safe = np.where(m, y, self.probes[k].classes_[0])
            T = ovr_targets(y_safe, self.probes[k].classes_)
            T_list.append(T)
            w_list.append(self.weights(k, y_safe, T) * m[:, None])
        return (torch.as_tensor(np.stack(T_list), device=self.device),
                torch.as_tensor(np.stack(w_list), device=self.device))

    def code(self, idx: np.ndarray, it: torch.Tensor, Xs: torch.Tensor, masks: np.ndarray,
             targets: list[np.ndarray]) -> None:
        """Add the batch's labels to the codelength of probes ``idx`` before their step: under
        each probe's current weights (the averaged ones once averaging has started, as the
        probe predicts), on ``Xs``, the rows standardized with the moments that include the
        batch; scores in float64 from the float32 weights; the uniform code before a probe's
        first step (see :mod:`lm_probe.probes.codelength`)."""
        averaged = torch.as_tensor((self.average_from[idx] > 0) & (self.seen[idx] >= self.average_from[idx]),
                                   device=self.device)
        W = torch.where(averaged[:, None, None], self.W_avg[it], self.W[it]).double()
        b = torch.where(averaged[:, None], self.b_avg[it], self.b[it]).double()
        Z = (torch.einsum("prd,pkd->prk", Xs.double(), W) + b[:, None, :]).cpu().numpy()
        for j, k in enumerate(idx):
            probe, rows = self.probes[k], masks[j]
            proba = None if probe.n_steps_ == 0 else ovr_proba(Z[j][rows])
            probe.codelength_.code(proba, targets[j][rows], probe.classes_)

    def descend(self, idx: np.ndarray, it: torch.Tensor, Xs: torch.Tensor, T: torch.Tensor, weight: torch.Tensor,
                masks: np.ndarray, rows_per_step: int) -> None:
        """The SGD steps of probes ``idx`` on the batch: rows in order, ``rows_per_step``
        at a time; averaged SGD keeps the mean of the iterates, each row counted once (as
        the sklearn backend)."""
        eta = torch.as_tensor(self.eta(idx, masks), dtype=torch.float32, device=self.device)
        for k in idx:  # a probe whose step decayed restarts its average here, as Probe.partial_fit does
            if self.probes[k].n_decays_ > self.decays[k]:
                self.restarted_at[k], self.decays[k] = self.seen[k], self.probes[k].n_decays_
        c = rows_per_step
        bounds = list(range(0, masks.shape[1], c))
        n = np.add.reduceat(masks, bounds, axis=1) if bounds else np.zeros((len(idx), 0), np.int64)
        before = self.seen[idx][:, None] - self.restarted_at[idx][:, None] + np.cumsum(n, axis=1) - n
        start = np.where(self.restarted_at[idx] > 0, 1, np.maximum(self.average_from[idx], 1))[:, None]
        averaging = (self.average_from[idx] > 0)[:, None]
        frac = torch.as_tensor(np.where(averaging, asgd_weight(before, n, start), 1.0), dtype=torch.float32,
                               device=self.device)
        W, b, W_avg, b_avg = self.W[it], self.b[it], self.W_avg[it], self.b_avg[it]
        alpha, fit_intercept = self.alpha[it], self.fit_intercept[it]
        for j, lo in enumerate(bounds):
            rows = slice(lo, lo + c)
            W, b = logistic_sgd_step(W, b, Xs[:, rows], T[:, rows], weight[:, rows], eta[:, rows], alpha, fit_intercept)
            W_avg = torch.lerp(W_avg, W, frac[:, j, None, None])
            b_avg = torch.lerp(b_avg, b, frac[:, j, None])
        self.W[it], self.b[it], self.W_avg[it], self.b_avg[it] = W, b, W_avg, b_avg
        self.seen[idx] = self.seen[idx] + masks.sum(1)


class ProbeBank(Group):
    """The torch backend's consumer: the linear classifiers of a runner, trained together.

    The runner feeds the bank instead of its probes, and starts it instead of them:
    :meth:`start` starts each probe with the same context. Each probe keeps its own early
    stopping, validation history and best weights (see the module docstring).

    Args:
        probes: Linear classification probes (see :func:`supports`).
        device: Where the weights live and the step runs (the model's device).
        rows_per_step: Rows of a batch stepped together against the same weights.
    """

    def __init__(self, probes: Iterable[Probe], device: str | torch.device = "cpu", rows_per_step: int = 4) -> None:
        self.probes = list(probes)
        self.rows_per_step = int(rows_per_step)
        for probe in self.probes:
            if not supports(probe):
                raise ValueError(f"probe {probe.name!r} ({probe.config.head}/{probe.config.task}) is not a linear "
                                 "classifier; the torch backend trains linear classifiers only")
            _check_kwargs(probe)
        self.device = torch.device(device)
        self.groups: list[_Group] = []
        self.n_steps_ = 0

    @property
    def members(self) -> list:
        return self.probes

    def site_specs(self) -> list[str]:
        return list(dict.fromkeys(p.config.site for p in self.probes))

    def start(self, context: RunContext) -> None:
        """Start every probe with ``context`` (each reads its own ``context.training``
        entry); the stacked weights are allocated at the first batch, which gives the
        hidden sizes."""
        for probe in self.probes:
            probe.start(context)
        self.groups, self.n_steps_ = [], 0

    def _ensure_groups(self, batch: PooledBatch) -> None:
        if self.groups:
            return
        by_key: dict[tuple, list[Probe]] = defaultdict(list)
        for probe in self.probes:
            hidden = int(batch.tensor(probe.requests[0]).shape[1])
            outputs = 1 if len(probe.classes_) == 2 else len(probe.classes_)
            by_key[(probe.config.pool == "none", hidden, outputs)].append(probe)
        self.groups = [_Group(probes, key[1], self.device) for key, probes in by_key.items()]

    def reset(self) -> None:
        """Forget the stacked state and everything the probes learned (their settings stay)."""
        for probe in self.probes:
            probe.reset()
        self.groups, self.n_steps_ = [], 0

    def update(self, batch: PooledBatch) -> None:
        """One batched SGD step for every active probe, then each probe's bookkeeping.

        On the CPU the step runs on one thread: its tensors are small, and splitting them
        over intra-op threads cost more than it saved (measured 6x slower with 2 threads
        on 2 busy cores; see benchmarks/overhead.py)."""
        self._ensure_groups(batch)
        with _one_thread(self.device.type == "cpu"):
            for group in self.groups:
                self._step(group, batch)
        self.n_steps_ += 1

    def _step(self, g: _Group, batch: PooledBatch) -> None:
        """One batched SGD step for the active probes of ``g``, then each probe's bookkeeping."""
        rows = self._rows(g, batch)
        if rows is None:
            return
        idx, X, mask, masks, slot, targets = rows
        it = torch.as_tensor(idx, device=self.device)
        Xs = g.standardized(it, X, mask, masks, slot)
        T, weight = g.targets_and_weights(idx, targets, masks)
        if batch.epoch == 0:  # online codelength: each row coded once, before the step on it
            g.code(idx, it, Xs, masks, targets)
        g.descend(idx, it, Xs, T, weight, masks, self.rows_per_step)
        for j, k in enumerate(idx):
            probe = g.probes[k]
            probe.n_epochs_ = max(probe.n_epochs_, batch.epoch + 1)
            if probe.note_step():  # its validation is scored now: on the bank's current weights
                self._sync(g, int(k))
            probe.after_step()

    def _rows(self, g: _Group, batch: PooledBatch) -> tuple | None:
        """What the active probes of ``g`` train on in ``batch``: ``(idx, X, mask, masks,
        slot, targets)``, the probes with a labeled finite row and their ``(P, rows,
        hidden)`` activations (zero where left out), or ``None``. Each probe counts the
        rows left out for non-finite activations (the non-finite policy)."""
        idx = np.array([k for k, p in enumerate(g.probes) if p.active], np.int64)
        if len(idx) == 0:
            return None
        targets = [g.probes[k].targets(batch) for k in idx]
        masks = np.stack([labeled(y) for y in targets])  # (P, rows)
        requests = list(dict.fromkeys(g.probes[k].requests[0] for k in idx))
        slot = np.array([requests.index(g.probes[k].requests[0]) for k in idx])
        which = torch.as_tensor(slot, device=self.device)
        X = torch.stack([batch.tensor(r, self.device) for r in requests])[which].float()  # (P, rows, hidden)
        finite = torch.isfinite(X).all(-1).cpu().numpy()  # (P, rows): the non-finite policy, per probe
        for j, k in enumerate(idx):
            g.probes[k].count_nonfinite(batch, masks[j] & ~finite[j])
        masks = masks & finite
        mask = torch.as_tensor(masks, device=self.device)
        keep = masks.any(1)
        if not keep.any():
            return None
        idx, X, mask, masks, slot = idx[keep], X[keep], mask[keep], masks[keep], slot[keep]
        X = torch.where(mask[..., None], X, torch.zeros((), dtype=X.dtype, device=X.device))  # no NaN in the sums
        targets = [t for t, k in zip(targets, keep) if k]
        return idx, X, mask, masks, slot, targets

    def _sync(self, g: _Group, k: int) -> None:
        """Load probe ``k``'s current weights and moments into it."""
        probe = g.probes[k]
        averaged = g.average_from[k] > 0 and g.seen[k] >= g.average_from[k]
        W, b = (g.W_avg[k], g.b_avg[k]) if averaged else (g.W[k], g.b[k])
        probe.load_weights(W.detach().double().cpu().numpy(), b.detach().double().cpu().numpy(),
                           n_seen=int(g.seen[k]))
        if probe.config.standardize:
            probe.load_moments(int(g.n[k].item()), g.mean[k].cpu().numpy(), g.m2[k].cpu().numpy())

    def finish(self) -> None:
        """Copy every probe's final state into it, then let each probe finish (restore its best)."""
        for g in self.groups:
            for k, probe in enumerate(g.probes):
                if probe.n_steps_:
                    self._sync(g, k)
        for probe in self.probes:
            probe.finish()

    def compute(self) -> dict[str, Any]:
        """Each trained probe's training summary, by name (a ``NotComputedError`` before any)."""
        trained = {p.name: p.compute() for p in self.probes if p.n_steps_}
        if not trained:
            raise NotComputedError("the probe bank has not trained yet: feed it batches (fit_probes does)")
        return trained

    def __repr__(self) -> str:
        return f"ProbeBank({len(self.probes)} probes on {self.device})"


def bank_for(probes: dict[str, Probe], backend: str, device: str | torch.device) -> ProbeBank | None:
    """The torch backend's bank of linear classifiers, SGD twins included (``None``: scikit-learn, or none)."""
    if check_backend(backend) == "sklearn":
        return None
    trainable = [q for p in probes.values() for q in getattr(p, "twins", None) or [p]]  # SGD twins: each one
    banked, others = [p for p in trainable if supports(p)], [p.name for p in trainable if not supports(p)]
    for p in (p for p in probes.values() if getattr(p, "twins", None)):  # the bank steps them, not their probe
        p.banked = all(supports(t) for t in p.twins)
    logger.info("backend='torch' trains linear classifiers; these stay on scikit-learn: {}", others or "none")
    return ProbeBank(banked, device) if banked else None


def trainers_of(probes: dict[str, Probe], bank: ProbeBank | None) -> list[Consumer]:
    """What trains the probes: the probe bank (torch backend) in place of its probes, and
    the other probes."""
    if bank is None:
        return list(probes.values())
    banked = {id(p) for p in bank.probes}
    return [bank, *(p for p in probes.values() if id(p) not in banked)]
