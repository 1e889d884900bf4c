"""The torch probe bank's state: probes trained as one stack of weights.

A :class:`StackedProbes` holds the linear classifiers of a :class:`~lm_probe.probes.backend.ProbeBank`
that share a row layout, hidden size, number of outputs and head: their weights as one
``(probes, outputs, hidden)`` tensor, their standardization moments, step sizes, L2
strengths and averages of the iterates. The math is in the pure functions of
:mod:`lm_probe.functional.sgd`; this class gathers each batch's targets, weights and
standardized rows for them and keeps the state between batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.linear_model import SGDClassifier

from ..functional.codelength import ovr_proba
from ..functional.sgd import asgd_weight, logistic_sgd_step, masked_moments, ovr_targets, softmax
from .probe import Probe

__all__ = ["StackedProbes", "check_kwargs"]

#: SGDClassifier arguments the bank implements; the rest must keep scikit-learn's default
#: unless they do not change what ``partial_fit`` learns (the second set).
_IMPLEMENTED = {"loss", "penalty", "alpha", "fit_intercept", "learning_rate", "eta0", "power_t",
                "class_weight", "average"}
_NO_EFFECT_ON_PARTIAL_FIT = {"shuffle", "random_state", "verbose", "n_jobs", "warm_start", "tol", "max_iter",
                             "early_stopping", "validation_fraction", "n_iter_no_change", "epsilon", "l1_ratio"}
_SKLEARN_DEFAULTS = SGDClassifier().get_params()


def check_kwargs(probe: Probe) -> dict[str, Any]:
    """The probe's SGDClassifier arguments, or a ValueError naming what the bank cannot do."""
    _, own = probe.config.head_kwargs(None if probe.classes_ is None else len(probe.classes_))
    kw = {**_SKLEARN_DEFAULTS, **own}
    unsupported = sorted(k for k, v in own.items()
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


class StackedProbes:
    """Probes that share row layout, hidden size and number of outputs: one stacked state."""

    def __init__(self, probes: list[Probe], hidden: int, device: torch.device) -> None:
        self.probes = probes
        kws = [check_kwargs(p) for p in probes]
        self.multinomial = probes[0].head_ == "softmax"  # one softmax over the classes, else one-vs-rest
        classes = probes[0].classes_
        P, K = len(probes), len(classes) if self.multinomial else ovr_targets(np.zeros(0), classes).shape[1]
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
        one-vs-rest use: positive class weight, 1 for the rest; binary: each class its own;
        multinomial: the weight of the row's class on every output)."""
        cw, classes = self.class_weight[k], self.probes[k].classes_
        if not cw:
            return np.ones_like(T)
        if self.multinomial:
            return np.repeat(np.array([cw.get(c, 1.0) for c in y.tolist()], np.float32)[:, None], T.shape[1], axis=1)
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
        """``(probes, rows, outputs)`` one-vs-rest (or one-hot) targets and row weights (0 on
        rows a probe does not train on)."""
        T_list, w_list = [], []
        for k, y, m in zip(idx, targets, masks):
            classes = self.probes[k].classes_
            y_safe = np.where(m, y, classes[0])
            T = (y_safe[:, None] == classes[None, :]).astype(np.float32) if self.multinomial else \
                ovr_targets(y_safe, classes)
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
            proba = None if probe.n_steps_ == 0 else (softmax if self.multinomial else ovr_proba)(Z[j][rows])
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
            W, b = logistic_sgd_step(W, b, Xs[:, rows], T[:, rows], weight[:, rows], eta[:, rows], alpha, fit_intercept,
                                     self.multinomial)
            W_avg = torch.lerp(W_avg, W, frac[:, j, None, None])
            b_avg = torch.lerp(b_avg, b, frac[:, j, None])
        self.W[it], self.b[it], self.W_avg[it], self.b_avg[it] = W, b, W_avg, b_avg
        self.seen[idx] = self.seen[idx] + masks.sum(1)
