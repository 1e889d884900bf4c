"""The loop both mask probes share: run the model with masks on, read the site, step.

Unlike the frozen-model probes, a subnetwork or circuit probe trains *through* the model:
the base weights are frozen (``requires_grad`` off for the fit), masks over the chosen
weights are parametrizations (:mod:`~lm_probe.circuits.targets`), and gradients of the
probe's loss plus ``l0_lambda`` times the expected fraction of weights kept flow to the mask
logits and the probe's own parameters (Adam, one learning rate each; the mask logits' Adam
``eps`` is divided by the number of masked weights, since a penalty averaged over millions of
weights gives each logit a gradient near Adam's default ``eps`` of 1e-8, which would otherwise
damp their updates to almost nothing). The underlying
Hugging Face module runs directly, with a hook on the site's module that takes its output
(or input) and stops the forward there, so nothing after the site is computed.

Each epoch ends with an evaluation on the validation set with the binary masks; early
stopping watches the validation objective (the loss plus ``l0_lambda`` times the fraction
kept: the loss alone would favour keeping everything) and the best epoch's masks and probe
are kept. Continuous sparsification's temperature rises geometrically from 1 to
``temperature_final`` over the epochs; hard concrete has no schedule. The training labels'
online codelength (:class:`~lm_probe.probes.codelength.Codelength`, issue 17's definition) is
coded in the first epoch of the joint training, each batch under the probe before it steps
on it (the uniform code for the first): ``codelength_bits``, ``compression``... in
:meth:`MaskedProbe.score`. With ``warm_start`` the head has seen every training label first,
so there is no online code (NaN, the reason in ``codelength_.reason``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.architectures import _torch_module
from ..core.dataset import ProbeDataset
from ..core.labels import IGNORE
from ..core.pooling import check_pool, pool
from ..core.sites import resolve_sites
from ..core.trace import model_inputs, site_tensor
from ..functional.metrics import classification_metrics
from ..probes.codelength import Codelength
from ..probes.early_stopping import EarlyStopping, StopReason
from .masks import METHODS, FixedMask
from .targets import Masked, check_shapes, check_upstream, frozen, kept_fraction, parametrized, resolve_masked

__all__ = ["MaskedProbe", "NotFittedError"]


class NotFittedError(RuntimeError):
    """A mask probe used before :meth:`MaskedProbe.fit`."""


class _Stop(Exception):
    """Raised by the site hook: the rest of the forward pass is not needed."""


class MaskedProbe:
    """Base of :class:`~lm_probe.circuits.SubnetworkProbe` and :class:`~lm_probe.circuits.CircuitProbe`.

    Subclasses define the probe on the site's rows: ``_build`` (its parameters),
    ``_loss``, ``_proba``, and ``_head_arrays`` / ``_load_head`` for persistence.
    """

    _PARAMS = ("masked", "method", "l0_lambda", "pool", "epochs", "batch_size", "lr", "mask_lr", "patience",
               "temperature_final", "standardize", "warm_start", "mask_init", "seed")

    def __init__(self, model: Any, site: str, *, masked: Masked | str | None = None, method: str = "hard_concrete",
                 l0_lambda: float = 1.0, pool: str | None = None, epochs: int = 10, batch_size: int = 32,
                 lr: float = 1e-2, mask_lr: float = 0.1, patience: int = 3, temperature_final: float = 200.0,
                 standardize: bool = True, warm_start: bool = True, mask_init: float | None = None,
                 seed: int = 0) -> None:
        if method not in METHODS:
            raise ValueError(f"method {method!r} is unknown; choose one of {sorted(METHODS)}")
        if pool is not None:
            check_pool(pool)
        if l0_lambda < 0 or epochs < 1 or batch_size < 1 or patience < 1:
            raise ValueError("l0_lambda must be >= 0 and epochs, batch_size and patience >= 1; got "
                             f"{l0_lambda}, {epochs}, {batch_size}, {patience}")
        self.model, self.site = model, site
        self.masked, self.method, self.l0_lambda, self.pool = masked, method, l0_lambda, pool
        self.epochs, self.batch_size, self.lr, self.mask_lr = epochs, batch_size, lr, mask_lr
        self.patience, self.temperature_final, self.standardize, self.seed = (patience, temperature_final,
                                                                              standardize, seed)
        self.warm_start, self.mask_init = warm_start, mask_init
        module = _torch_module(model)
        self._site = resolve_sites(module, [site])[site]  # parsed once, checked before any forward
        self.targets_ = resolve_masked(module, masked)
        check_upstream(module, self._site, self.targets_)

    # ---------------------------------------------------------------- subclass hooks
    def _build(self, hidden: int, n_classes: int) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _proba(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _finish(self, train: ProbeDataset) -> None:
        """After the best epoch is restored (the circuit probe computes its centroids)."""

    def _device(self) -> torch.device:
        return next(_torch_module(self.model).parameters()).device

    # ---------------------------------------------------------------- reading the site
    def _pool_for(self, data: ProbeDataset) -> str:
        if data.is_token_level:
            if self.pool not in (None, "none"):
                raise ValueError(f"token-level labels need pool='none' (one row per token), got pool={self.pool!r}")
            return "none"
        if data.is_regression:
            raise ValueError("mask probes classify; this dataset has regression targets")
        return self.pool or "mean"

    def _rows(self, module: torch.nn.Module, batch: Any, how: str) -> tuple[torch.Tensor, np.ndarray]:
        """The site's pooled (and standardized) rows of one batch and their labels, labeled rows only."""
        captured: dict[str, torch.Tensor] = {}
        owner = module.get_submodule(self._site.path)

        def take(value: Any) -> None:
            captured["x"] = site_tensor(value)
            raise _Stop

        if self._site.attr == "output":
            handle = owner.register_forward_hook(lambda m, args, out: take(out))
        else:
            handle = owner.register_forward_pre_hook(
                lambda m, args, kwargs: take(args if args else list(kwargs.values())), with_kwargs=True)
        device = next(module.parameters()).device
        try:
            module(**model_inputs(module, batch.input_ids.to(device), batch.attention_mask.to(device)))
        except _Stop:
            pass
        finally:
            handle.remove()
        x = pool(captured["x"], batch.attention_mask, how)
        y = batch.token_labels if how == "none" else batch.labels
        keep = torch.as_tensor(y != IGNORE, device=x.device)
        if self.standardize and hasattr(self, "_mean"):
            x = (x - self._mean) / self._std
        return x[keep], np.asarray(y)[np.asarray(y != IGNORE)]

    def _moments(self, module: torch.nn.Module, data: ProbeDataset, how: str) -> None:
        """Mean and standard deviation of the unmasked site rows (float64), for standardizing."""
        rows = []
        with torch.no_grad():
            for batch in data.batches(self.batch_size):
                rows.append(self._rows(module, batch, how)[0].double())
        x = torch.cat(rows)
        self._mean, self._std = x.mean(0).float(), x.std(0).clamp_min(1e-6).float()

    # ---------------------------------------------------------------- fitting
    def fit(self, train: ProbeDataset, val: ProbeDataset) -> "MaskedProbe":
        """Learn the masks and the probe on ``train``, stopping early on ``val``.

        The model is left exactly as it was (weights, ``requires_grad`` flags, train/eval
        mode), also when the fit raises.

        Args:
            train: Examples to learn from (sequence labels, or token labels with ``pool="none"``).
            val: Examples for early stopping and the reported :attr:`metrics_`.

        Returns:
            ``self``, with ``mask_``, ``kept_``, ``kept_fraction_``, ``classes_``,
            ``history_``, ``best_epoch_``, ``stopped_reason_`` and ``metrics_``.
        """
        module, how = _torch_module(self.model), self._pool_for(train)
        self.classes_ = train.classes
        if len(self.classes_) < 2:
            raise ValueError(f"the training set has {len(self.classes_)} class; a probe needs two or more")
        self._check_labels(val, "val")
        for key in ("_mean", "_std"):
            self.__dict__.pop(key, None)
        with frozen(module), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._fit(module, train, val, how)
        self._finish(train)
        self.metrics_ = self.score(val)
        return self

    def _fit(self, module: torch.nn.Module, train: ProbeDataset, val: ProbeDataset, how: str) -> None:
        device = next(module.parameters()).device
        if self.standardize:
            self._moments(module, train, how)
        # the moments give the row width; without them one batch of one row does
        width = self._mean.numel() if self.standardize else self._rows(module, next(train.batches(1)), how)[0].shape[1]
        head = self._build(width, len(self.classes_))
        self._masks = {p: METHODS[self.method](module.get_submodule(p).weight.shape, device, self.mask_init)
                       for p in self.targets_}
        warm = self.warm_start and head and self._masks
        # the unmasked site's rows never change, so the model runs once for them
        fixed = (self._collect(module, train, how), self._collect(module, val, how)) if warm or not self._masks else None
        self._coder = None
        if warm:  # the head first learns the unmasked rows; the history records the joint training only
            self._loop(module, train, val, how, torch.optim.Adam(head, lr=self.lr), head, fixed)
        self._coder = self.codelength_ = Codelength(len(self.classes_), reason=self._code_reason(bool(warm)))
        logits = [m.logits for m in self._masks.values()]
        # Adam's eps is relative to the per-logit gradient of a penalty averaged over n weights
        eps = 1e-8 / max(sum(t.numel() for t in logits), 1)
        groups = [{"params": head, "lr": self.lr}] + ([{"params": logits, "lr": self.mask_lr, "eps": eps}] if logits else [])
        with parametrized(module, self._masks):
            self.history_, self.stopped_reason_, self.best_epoch_ = self._loop(
                module, train, val, how, torch.optim.Adam(groups), head, None if self._masks else fixed)
        self._set_masks({p: m.keep().cpu().numpy() for p, m in self._masks.items()})

    def _loop(self, module: torch.nn.Module, train: ProbeDataset, val: ProbeDataset, how: str, optimizer: Any,
              head: list[torch.nn.Parameter], fixed: Any) -> tuple[list[dict], StopReason, int]:
        """Epochs of training with early stopping; the best epoch's masks and head are put back.

        Returns:
            ``(history, stop reason, best epoch)``.
        """
        stopping, best, history, reason = EarlyStopping(patience=self.patience, min_delta=0.0), None, [], \
            StopReason.END_OF_DATA
        for epoch in range(self.epochs):
            self._set_temperature(epoch)
            train_loss = self._epoch(module, train, how, optimizer, epoch, fixed and fixed[0])
            objective, val_loss, kept = self._validate(module, val, how, fixed and fixed[1])
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "kept_fraction": kept,
                            "val_objective": objective})
            stop, why = stopping.check(objective, epoch)
            if stopping.improved_:
                best = (epoch, copy.deepcopy([m.state_dict() for m in self._masks.values()]),
                        [p.detach().clone() for p in head])
            if stop:
                reason = why
                break
        if best is None:
            raise FloatingPointError(f"the validation objective was non-finite at epoch 0 ({history[0]['val_objective']}); "
                                     "lower lr / mask_lr or check the data")
        epoch, states, params = best
        for mask, state in zip(self._masks.values(), states):
            mask.load_state_dict(state)
        with torch.no_grad():
            for p, value in zip(head, params):
                p.copy_(value)
        return history, reason, epoch

    def _check_labels(self, data: ProbeDataset, name: str) -> None:
        """Refuse labels the probe was not trained on (``searchsorted`` would map them silently)."""
        if unseen := sorted(set(data.classes.tolist()) - set(self.classes_.tolist())):
            raise ValueError(f"{name} has labels {unseen} that the training set lacks (classes {self.classes_.tolist()});"
                             " drop those examples or split stratified so every class is in train")

    def _code_reason(self, warm: bool) -> str | None:
        """Why this fit has no online codelength (``None``: it has one)."""
        return "warm_start: the head first saw every training label (warm_start=False codes them)" if warm else None

    def _set_temperature(self, epoch: int) -> None:
        """Continuous sparsification: ``temperature_final ** (epoch / (epochs - 1))``, 1 to the final value."""
        for mask in self._masks.values():
            if hasattr(mask, "temperature"):
                mask.temperature = float(self.temperature_final ** (epoch / max(self.epochs - 1, 1)))

    def _penalty(self) -> torch.Tensor:
        total = sum(m.logits.numel() for m in self._masks.values())
        return sum(m.penalty() for m in self._masks.values()) / total if total else torch.zeros(())

    def _epoch(self, module: torch.nn.Module, train: ProbeDataset, how: str, optimizer: Any, epoch: int,
               fixed: tuple[torch.Tensor, np.ndarray] | None) -> float:
        """One pass over ``train`` with stochastic (hard concrete) or soft masks, or over the
        ``fixed`` rows of an unmasked model; the mean loss."""
        for mask in self._masks.values():
            mask.train()
        if fixed is None:
            batches = (self._rows(module, b, how) for b in train.batches(self.batch_size, shuffle=True,
                                                                          seed=self.seed + epoch))
        else:
            order = np.random.default_rng(self.seed + epoch).permutation(len(fixed[1]))
            batches = ((fixed[0][i], fixed[1][i]) for i in np.array_split(order, max(len(order) // self.batch_size, 1)))
        losses = []
        for k, (x, y) in enumerate(batches):
            if len(y) == 0:
                continue
            if epoch == 0 and self._coder is not None and self._coder.reason is None:  # before the step: online
                with torch.no_grad():
                    proba = None if k == 0 else self._proba(x).double().cpu().numpy()
                self._coder.code(None if proba is None else proba / proba.sum(1, keepdims=True), y, self.classes_)
            loss = self._loss(x, self._targets(y, x.device)) + self.l0_lambda * self._penalty().to(x.device)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return float(np.mean(losses)) if losses else float("nan")

    def _validate(self, module: torch.nn.Module, val: ProbeDataset, how: str,
                  fixed: tuple[torch.Tensor, np.ndarray] | None) -> tuple[float, float, float]:
        """``(objective, loss, fraction kept)`` on ``val`` with the binary masks."""
        for mask in self._masks.values():
            mask.eval()
        x, y = fixed if fixed is not None else self._collect(module, val, how)
        with torch.no_grad():
            loss = float(self._loss(x, self._targets(y, x.device)))
        kept = kept_fraction({p: m.keep() for p, m in self._masks.items()})
        return loss + self.l0_lambda * kept, loss, kept

    def _collect(self, module: torch.nn.Module, data: ProbeDataset, how: str) -> tuple[torch.Tensor, np.ndarray]:
        rows, labels = [], []
        with torch.no_grad():
            for batch in data.batches(self.batch_size, by_length=True):
                x, y = self._rows(module, batch, how)
                rows.append(x)
                labels.append(y)
        return torch.cat(rows), np.concatenate(labels)

    def _targets(self, y: np.ndarray, device: torch.device) -> torch.Tensor:
        """Labels as column indices of ``classes_``."""
        return torch.as_tensor(np.searchsorted(self.classes_, y), device=device)

    def _set_masks(self, mask: dict[str, np.ndarray]) -> None:
        self.mask_ = mask
        self.kept_ = {p: float(k.mean()) for p, k in mask.items()}
        self.kept_fraction_ = kept_fraction(mask)

    # ---------------------------------------------------------------- using a fitted probe
    def _check_fitted(self) -> None:
        if not hasattr(self, "mask_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(train, val) or load(...)")

    def predict_proba(self, data: ProbeDataset, *, use_mask: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities of ``data``'s (labeled) rows.

        Args:
            data: Examples (token-level: one row per labeled token).
            use_mask: Read the site with the found subnetwork only (the masked weights set
                to zero); ``False`` reads the model as it is (e.g. inside :func:`ablate`).

        Returns:
            ``(proba, y)``: ``(n, n_classes)`` float64 probabilities, columns in the order of
            ``classes_``, and the ``(n,)`` labels (rows in batch order, by length).
        """
        self._check_fitted()
        module, how = _torch_module(self.model), self._pool_for(data)
        self._check_labels(data, "data")
        masks = {p: FixedMask(torch.as_tensor(k, device=module.get_submodule(p).weight.device))
                 for p, k in self.mask_.items()} if use_mask else {}
        with parametrized(module, masks):
            x, y = self._collect(module, data, how)
        with torch.no_grad():
            proba = self._proba(x).double().cpu().numpy()
        return proba / proba.sum(1, keepdims=True), y  # float32 rows summing to 1 in float64

    def score(self, data: ProbeDataset, *, use_mask: bool = True) -> dict[str, Any]:
        """Metrics of the probe on ``data``: those of
        :func:`~lm_probe.functional.metrics.classification_metrics` (``loss``,
        ``accuracy``, ``f1``...) plus ``kept_fraction`` (of all masked weights) and ``kept``
        (``{module path: fraction of its weights kept}``). ``use_mask`` as in :meth:`predict_proba`."""
        proba, y = self.predict_proba(data, use_mask=use_mask)
        return {**classification_metrics(y, proba, self.classes_), **self.codelength_.compute(),
                "kept_fraction": self.kept_fraction_, "kept": dict(self.kept_)}

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write ``probe.json`` (settings, classes, history) and ``arrays.npz`` (boolean masks,
        standardization moments, the probe's arrays) to the folder ``path``; no pickle."""
        self._check_fitted()
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        params = {name: getattr(self, name) for name in self._PARAMS if name != "masked"}
        meta = {"kind": type(self).__name__, "site": self.site, "targets": self.targets_, "params": params,
                "classes": self.classes_.tolist(), "history": self.history_, "best_epoch": self.best_epoch_,
                "stopped_reason": str(self.stopped_reason_), "codelength": self.codelength_.to_dict()}
        arrays = {f"mask/{p}": k for p, k in self.mask_.items()}
        arrays.update({f"head/{k}": v for k, v in self._head_arrays().items()})
        if self.standardize:
            arrays.update(mean=self._mean.cpu().numpy(), std=self._std.cpu().numpy())
        (folder / "probe.json").write_text(json.dumps(meta, indent=1))
        np.savez(folder / "arrays.npz", **arrays)
        return folder

    @classmethod
    def load(cls, path: str | Path, model: Any) -> "MaskedProbe":
        """A probe written by :meth:`save`, on ``model`` (the same architecture)."""
        folder = Path(path)
        meta = json.loads((folder / "probe.json").read_text())
        if meta["kind"] != cls.__name__:
            raise ValueError(f"{folder} holds a {meta['kind']}, not a {cls.__name__}; load it with that class")
        probe = cls(model, meta["site"], masked=meta["targets"], **meta["params"])
        with np.load(folder / "arrays.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        probe.classes_ = np.asarray(meta["classes"])
        probe.history_, probe.best_epoch_ = meta["history"], meta["best_epoch"]
        probe.stopped_reason_ = StopReason(meta["stopped_reason"])
        probe.codelength_ = Codelength.from_dict(meta["codelength"])
        device = next(_torch_module(model).parameters()).device
        if probe.standardize:
            probe._mean, probe._std = (torch.as_tensor(arrays[k], device=device) for k in ("mean", "std"))
        probe._load_head({k[5:]: v for k, v in arrays.items() if k.startswith("head/")}, device)
        probe._set_masks(check_shapes(model, {k[5:]: arrays[k].astype(bool) for k in arrays if k.startswith("mask/")}))
        return probe

    def _head_arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _load_head(self, arrays: dict[str, np.ndarray], device: torch.device) -> None:
        raise NotImplementedError
