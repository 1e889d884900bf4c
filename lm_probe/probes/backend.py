"""The torch probe backend: every linear classifier of a batch updated in one tensor op.

With ``ProbeRunner(..., backend="torch")`` the linear classification probes are not
stepped one by one through scikit-learn's ``partial_fit``: a :class:`ProbeBank` holds all
their weights as stacked ``(probes, outputs, hidden)`` tensors on the model's device
(:class:`~lm_probe.probes.stacked.StackedProbes`) and takes one batched SGD step per
training batch, reading the pooled activations where the trace left them (no copy to the
host). What is learned is the same model as the scikit-learn backend's:

* ``head="linear"``: ``SGDClassifier(loss="log_loss")``'s one-vs-rest logistic regression
  (one output for two classes, one per class otherwise), probabilities as scikit-learn's
  ``predict_proba`` normalizes them; ``head="softmax"`` (and ``"auto"`` past two classes):
  the multinomial logistic regression of :mod:`lm_probe.probes.softmax`;
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
gradient, against the weights of the batch start; the softmax head steps so on either
backend). Weight decay is compounded over the batch's rows. Early stopping is unchanged:
when a probe's evaluation is due, the bank loads its current weights and moments into the
probe (:meth:`Probe.load_weights`, :meth:`Probe.load_moments`: the bank uses the probes'
public methods only), so validation scoring, snapshots of the best weights, metrics,
:meth:`~lm_probe.ProbeRunner.save` and prediction all go through the probe's estimator as
with the default backend.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from loguru import logger

from ..core.consumer import Consumer, Group, NotComputedError, PooledBatch, RunContext
from ..core.labels import labeled
from .probe import Probe
from .stacked import StackedProbes, check_kwargs

__all__ = ["ProbeBank", "BACKENDS", "check_backend", "supports", "bank_for", "trainers_of"]

BACKENDS = ("sklearn", "torch")


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is one of :data:`BACKENDS`, else raise a ValueError naming them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def supports(probe: Probe) -> bool:
    """Whether the torch backend trains this probe (one linear or softmax classifier; others
    stay on scikit-learn)."""
    c = probe.config  # a TwinProbe is not: its twins are (bank_for)
    return (c.head in ("auto", "linear", "softmax") and c.task == "classification" and c.solver == "sgd"
            and not getattr(probe, "twins", 0))


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
                                 "or softmax classifier; the torch backend trains those only")
            check_kwargs(probe)
        self.device = torch.device(device)
        self.groups: list[StackedProbes] = []
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
            outputs = 1 if len(probe.classes_) == 2 and probe.head_ != "softmax" else len(probe.classes_)
            by_key[(probe.config.pool == "none", hidden, outputs, probe.head_)].append(probe)
        self.groups = [StackedProbes(probes, key[1], self.device) for key, probes in by_key.items()]

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

    def _step(self, g: StackedProbes, batch: PooledBatch) -> None:
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

    def _rows(self, g: StackedProbes, batch: PooledBatch) -> tuple | None:
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

    def _sync(self, g: StackedProbes, k: int) -> None:
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
    logger.info("backend='torch' trains linear and softmax classifiers; these stay on scikit-learn: {}",
                others or "none")
    return ProbeBank(banked, device) if banked else None


def trainers_of(probes: dict[str, Probe], bank: ProbeBank | None) -> list[Consumer]:
    """What trains the probes: the probe bank (torch backend) in place of its probes, and
    the other probes."""
    if bank is None:
        return list(probes.values())
    banked = {id(p) for p in bank.probes}
    return [bank, *(p for p in probes.values() if id(p) not in banked)]
