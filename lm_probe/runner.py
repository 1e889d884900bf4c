"""ProbeRunner: one trace per batch, fanned out to every consumer.

The flow is one-way::

    dataset -> batches -> one nnsight trace per batch -> pooled activations per
    (site, pooling) -> consumers (probes, accumulators, gauges, stores) -> results

:meth:`ProbeRunner.fit_probes` carves a validation split off the training set, pools
it once (cached), then runs the main loop in :meth:`ProbeRunner._pass`: each batch is
traced once for the sites that active consumers still need, the forward stops after
the deepest of them, and each consumer updates on the pooled activations. Probes stop
themselves early; when a probe stops its site is no longer read. Test activations are
pooled the same way, one trace per batch for all probes, to fill :attr:`metrics`.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from loguru import logger
from tqdm.auto import tqdm

from .backend import ProbeBank, check_backend, supports
from .consumer import Consumer, HostArrays, PooledBatch, Request
from .dataset import ProbeDataset
from .early_stopping import EarlyStopping
from .metrics import METRIC_COLUMNS, REGRESSION_COLUMNS
from .control import control_targets, label_distribution
from .dataset import IGNORE
from .probe import Probe, ProbeConfig
from .sites import Site, resolve_sites
from .trace import model_device, read_pooled

__all__ = ["ProbeRunner"]


class ProbeRunner:
    """Train many probes (and feed other consumers) from one forward pass per batch.

    Args:
        model: An nnsight model (see :func:`lm_probe.load_model`).
        configs: One :class:`ProbeConfig` per probe, in any order.
        consumers: Other consumers (geometry accumulators, gauges...) fed from the
            same traces.
        seed: Seed for splits, batch order and the probes' SGD.
        progress: Show a progress bar over batches.
        backend: ``"sklearn"`` (default): each probe steps its own scikit-learn estimator
            with ``partial_fit``. ``"torch"``: the linear classification probes are
            trained together, one batched tensor step per batch on ``device``, from
            activations that stay there (:mod:`lm_probe.backend`); other heads stay on
            scikit-learn. Same loss, L2 penalty, step schedule, averaging,
            standardization and early stopping.
        device: Where the torch backend computes (default: the model's device).
        **trace_kwargs: Passed to every ``model.trace`` call; ``remote=True`` runs every
            trace through nnsight's remote execution (NDIF), ``remote="local"`` simulates
            it offline. Only the pooled ``(batch, hidden)`` tensors come back.

    Raises:
        SiteError: a site names no module of the model (before any forward pass).
        ValueError: probe names collide.
    """

    def __init__(
        self,
        model: Any,
        configs: Iterable[ProbeConfig] = (),
        *,
        consumers: Iterable[Consumer] = (),
        seed: int = 0,
        progress: bool = True,
        backend: str = "sklearn",
        device: str | torch.device | None = None,
        **trace_kwargs: Any,
    ) -> None:
        if not hasattr(model, "trace") or not hasattr(model, "_module"):
            raise TypeError(
                f"ProbeRunner needs an nnsight model, got {type(model).__name__}; "
                "wrap it first: model = lm_probe.load_model(hf_model, tokenizer=tokenizer)"
            )
        self.model, self.seed, self.progress, self.trace_kwargs = model, seed, progress, trace_kwargs
        self.store: Any = None  # a StoredRun when built with from_store
        if trace_kwargs.get("remote"):
            import nnsight

            from . import pooling

            # the trace body pools with lm_probe.pooling: ship its source with each request,
            # since the server does not have lm_probe installed
            nnsight.register(pooling)
        self.configs = list(configs)
        self._check_names(self.configs)
        self.probes: dict[str, Probe] = _probes_for(self.configs, seed)
        device = device if device is not None else model_device(model, trace_kwargs.get("remote"))
        self.bank = _bank_for(self.probes, backend, device)
        self.consumers: list[Consumer] = list(consumers)
        specs = [spec for c in self.all_consumers for spec in c.site_specs()]
        self.sites: dict[str, Site] = resolve_sites(model._module, dict.fromkeys(specs))
        self.metrics: pd.DataFrame | None = None

    # ------------------------------------------------------------------ access
    @property
    def all_consumers(self) -> list[Consumer]:
        """The probes followed by the other consumers."""
        return [*self.probes.values(), *self.consumers]

    def __getitem__(self, name: str) -> Probe:
        if name not in self.probes:
            raise KeyError(f"no probe named {name!r}; probes are {list(self.probes)}")
        return self.probes[name]

    def __repr__(self) -> str:
        return f"ProbeRunner({len(self.probes)} probes, {len(self.consumers)} other consumers, {len(self.sites)} sites)"

    # ------------------------------------------------------------------ training
    def fit_probes(
        self,
        train: ProbeDataset,
        test: ProbeDataset | None = None,
        *,
        batch_size: int = 16,
        num_epochs: int = 3,
        val_size: float = 0.1,
        eval_every: int = 10,
        patience: int = 5,
        min_delta: float = 1e-4,
        warmup_steps: int = 0,
        max_steps: int | None = None,
    ) -> "ProbeRunner":
        """Train every probe online, with early stopping, then score them on ``test``.

        Args:
            train: Training examples; a stratified ``val_size`` share is held out once
                for early stopping.
            test: Examples for :attr:`metrics` (skipped when ``None``).
            batch_size: Examples per forward pass.
            num_epochs: Passes over the training examples at most.
            val_size: Validation share (0 disables validation and early stopping).
            eval_every: Training steps between validation evaluations.
            patience: Evaluations without an improvement of ``min_delta`` in validation
                log-loss before a probe stops.
            min_delta: Smallest improvement that counts.
            warmup_steps: No early stop before this many steps.
            max_steps: Steps per probe at most.

        Returns:
            ``self``, with :attr:`metrics` filled when ``test`` is given.
        """
        self._check_labels(train, "training")
        if test is not None:
            self._check_labels(test, "test", default=tuple(train.classes.tolist()))
        if num_epochs < 1 or eval_every < 1:
            raise ValueError(f"num_epochs and eval_every must be at least 1, got {num_epochs}, {eval_every}")
        fit, val = train.tt_split(val_size, seed=self.seed) if val_size else (train, None)
        logger.info("training {} probes on {} examples ({} held out for validation)",
                    len(self.probes), len(fit), 0 if val is None else len(val))
        for consumer in self.consumers:  # first: consumers check their own input before any forward
            consumer.start(model=self.model, sites=self.sites, runner=self, data=fit, batch_size=batch_size)
        self._resolve([s for c in self.consumers for s in c.site_specs()])
        val_acts = self.pooled(val, self._probe_requests(), batch_size, "validation") if val else {}
        self._control = self._control_labels(fit, train)
        for probe in self.probes.values():
            classes = probe.config.classes or tuple(train.classes.tolist())
            validation = None
            if val is not None:
                validation = self._scored_rows(probe, val_acts[probe.requests[0]], val, classes)[:2]
            probe.start(
                classes=classes if probe.is_classifier else None, validation=validation,
                early_stopping=EarlyStopping(patience, min_delta, warmup_steps=warmup_steps),
                eval_every=eval_every, max_steps=max_steps,
                relabel=self._control[1](fit) if _is_control(probe.name) else None,
            )
        self._pass(fit, self._training_consumers(), batch_size, num_epochs, shuffle=True, by_length=True,
                   validate_every=eval_every if val is not None else None)
        if test is not None:
            self.metrics = self.evaluate(test, batch_size=batch_size)
        return self

    def _training_consumers(self) -> list[Consumer]:
        """What the training pass feeds: the probe bank (torch backend) in place of its
        probes, the other probes, then the other consumers."""
        if self.bank is None:
            return self.all_consumers
        self.bank.start()
        banked = {id(p) for p in self.bank.probes}
        return [self.bank, *(p for p in self.probes.values() if id(p) not in banked), *self.consumers]

    def collect(self, dataset: ProbeDataset, consumers: Sequence[Consumer] | None = None,
                *, batch_size: int = 16, max_tokens: int | None = None) -> "ProbeRunner":
        """One pass over ``dataset``, in order, feeding consumers only (no probe training).

        Args:
            dataset: Examples to run.
            consumers: Consumers to feed (default: the runner's non-probe consumers).
            batch_size: Examples per forward pass.
            max_tokens: Stop after exactly this many real tokens: the last batch is cut
                (see :meth:`PooledBatch.first_tokens`), never overshot.
        """
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
        consumers = list(self.consumers if consumers is None else consumers)
        self._resolve([s for c in consumers for s in c.site_specs()])
        for consumer in consumers:
            consumer.start(model=self.model, sites=self.sites, runner=self, data=dataset, batch_size=batch_size)
        self._resolve([s for c in consumers for s in c.site_specs()])  # start() may add model-dependent sites
        self._pass(dataset, consumers, batch_size, 1, shuffle=False, by_length=False, max_tokens=max_tokens)
        return self

    def _pass(self, data: ProbeDataset, consumers: list[Consumer], batch_size: int, num_epochs: int,
              shuffle: bool, by_length: bool, max_tokens: int | None = None,
              validate_every: int | None = None) -> None:
        """The main loop: one trace per batch, fanned out to the active consumers."""
        per_epoch = -(-len(data) // batch_size)
        batches = ((epoch, k + 1 == per_epoch, batch) for epoch in range(num_epochs)
                   for k, batch in enumerate(data.batches(batch_size, shuffle=shuffle, seed=self.seed + epoch,
                                                          by_length=by_length)))
        step = tokens = epoch = 0
        _emit(consumers, "start", 0, 0)
        with tqdm(total=per_epoch * num_epochs, desc="batches", disable=not self.progress, leave=False) as bar:
            for epoch, last_of_epoch, batch in batches:
                active = [c for c in consumers if c.active]
                if not active:
                    break
                acts = self._read(batch, data, _requests(active))
                pooled = PooledBatch(acts, batch.labels, step, epoch, batch.index,
                                     batch.attention_mask.sum(1).numpy(), batch.token_labels)
                if max_tokens is not None and tokens + pooled.n_tokens.sum() >= max_tokens:
                    pooled = pooled.first_tokens(max_tokens - tokens)
                for consumer in active:
                    consumer.update(pooled)
                tokens += int(pooled.n_tokens.sum())
                step += 1
                bar.update(1)
                _emit(consumers, "step", step, epoch)
                if validate_every and step % validate_every == 0:
                    _emit(consumers, "validation", step, epoch)
                if last_of_epoch:
                    _emit(consumers, "epoch_end", step, epoch + 1)
                if max_tokens is not None and tokens >= max_tokens:
                    break
        for consumer in consumers:
            consumer.finish()
        _emit(consumers, "end", step, epoch + 1 if step else 0)
        logger.info("pass done: {} batches, {} tokens traced", step, tokens)

    # ------------------------------------------------------------------ reading
    def _read(self, batch: Any, data: ProbeDataset, requests: Sequence[Request]) -> Mapping[Request, np.ndarray]:
        """Pooled activations of one batch: one trace of the model, or rows of a store.

        With the torch backend on an accelerator the traced tensors stay there
        (:class:`HostArrays` copies one to the host only when a numpy consumer reads it)."""
        if self.store is not None:
            return self.store.read(data.example_ids[batch.index], requests)
        on_device = self.bank is not None and self.bank.device.type != "cpu" and not self.trace_kwargs.get("remote")
        return HostArrays(read_pooled(self.model, self.sites, requests, batch.input_ids, batch.attention_mask,
                                      to_cpu=not on_device, **self.trace_kwargs))

    def pooled(self, dataset: ProbeDataset, requests: Sequence[Request] | None = None,
               batch_size: int = 16, desc: str = "pooling") -> dict[Request, np.ndarray]:
        """Pooled activations of a whole dataset, one trace per batch for all requests.

        Args:
            dataset: Examples, in order.
            requests: ``(site, pooling)`` pairs (default: every probe's).
            batch_size: Examples per forward pass.

        Returns:
            ``{(site, pooling): (n, hidden) float32 array}`` in dataset order; for
            ``pool="none"`` the rows are every real token, example by example.
        """
        requests = list(dict.fromkeys(requests if requests is not None else self._probe_requests()))
        self._resolve([spec for spec, _ in requests])
        rows: dict[Request, list] = {key: [None] * len(dataset) for key in requests}
        batches = dataset.batches(batch_size, by_length=True)  # least padding; rows put back in order
        for batch in tqdm(batches, total=-(-len(dataset) // batch_size), desc=desc,
                          disable=not self.progress, leave=False):
            n_tokens = batch.attention_mask.sum(1).numpy()
            for (spec, how), value in self._read(batch, dataset, requests).items():
                parts = np.split(value, np.cumsum(n_tokens)[:-1]) if how == "none" else value[:, None]
                for i, part in zip(batch.index, parts):
                    rows[(spec, how)][i] = part
        return {key: np.concatenate(parts) for key, parts in rows.items()}

    def get_probe_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Each probe's pooled input features for a padded batch.

        Args:
            input_ids: ``(n, tokens)`` ids.
            attention_mask: ``(n, tokens)`` mask.
            batch_size: Trace in chunks of this many rows (default: all at once).

        Returns:
            ``{probe name: (n, hidden) float32 array}``.
        """
        data = ProbeDataset.from_tensors(input_ids, attention_mask, np.zeros(len(input_ids), np.int64),
                                         pad_token_id=_pad_id(self.model),
                                         padding_side=_padding_side(self.model))
        acts = self.pooled(data, None, batch_size or len(data), "features")
        return {name: acts[p.requests[0]] for name, p in self.probes.items()}

    @classmethod
    def from_store(cls, run: Any, configs: Iterable[ProbeConfig], *, seed: int = 0,
                   consumers: Iterable[Consumer] = (), progress: bool = True, backend: str = "sklearn",
                   device: str | torch.device | None = None) -> "ProbeRunner":
        """A runner that reads pooled activations from a stored run instead of a model.

        ``fit_probes`` / ``evaluate`` then work as with the live model (same seed, same
        splits, same batches), on the datasets the run was collected from (or their
        ``tt_split`` parts: rows are matched by ``example_ids``).

        Args:
            run: A :class:`~lm_probe.store.StoredRun` (``ActivationStore.open(path).run(name)``).
            configs: Probe configurations; their (site, pooling) must be in the run.
            backend, device: As for :class:`ProbeRunner` (the device defaults to the CPU).
        """
        runner = cls._without_model(configs, seed=seed, consumers=consumers, progress=progress, store=run,
                                    backend=backend, device=device)
        run.check(requests=_requests(runner.all_consumers))
        runner.sites = run.sites_for([spec for c in runner.all_consumers for spec in c.site_specs()])
        return runner

    @classmethod
    def _without_model(cls, configs: Iterable[ProbeConfig], *, seed: int, consumers: Iterable[Consumer] = (),
                       progress: bool = False, store: Any = None, backend: str = "sklearn",
                       device: str | torch.device | None = None) -> "ProbeRunner":
        """A runner with probes but no model (activations come from a store, or none are read)."""
        runner = cls.__new__(cls)
        runner.model, runner.seed, runner.progress, runner.trace_kwargs = None, seed, progress, {}
        runner.store, runner.configs, runner.consumers = store, list(configs), list(consumers)
        cls._check_names(runner.configs)
        runner.probes, runner.sites, runner.metrics = _probes_for(runner.configs, seed), {}, None
        runner.bank = _bank_for(runner.probes, backend, torch.device(device or "cpu"))
        return runner

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Save the probes, their configurations and the metrics (JSON + npz, no pickle).

        Raises:
            FileExistsError: ``path`` is not empty and ``overwrite`` is False.
        """
        from .persist import save_probes

        return save_probes(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> "ProbeRunner":
        """Load probes saved with :meth:`save`; give ``model`` to trace again, or use
        ``runner[name].predict(features)`` without one.

        Raises:
            ValueError: a newer schema version, or a model of another hidden size.
        """
        from .persist import load_probes

        return load_probes(path, model=model)

    # ------------------------------------------------------------------ results
    def evaluate(self, dataset: ProbeDataset, batch_size: int = 16) -> pd.DataFrame:
        """Score every probe on ``dataset`` (one trace per batch for all probes).

        Returns:
            DataFrame indexed by probe name with ``loss``, ``accuracy``, ``precision``,
            ``recall``, ``f1`` (macro), ``matthews``, ``site``, ``pool``, ``layer``,
            ``n_steps``, ``stopped_early``, ``stop_reason``.
        """
        acts = self.pooled(dataset, self._probe_requests(), batch_size, "test")
        rows = []
        for name, probe in self.probes.items():
            if _is_control(name):
                continue
            rows.append({**self._score(probe, acts, dataset), "probe": name})
            twin = self.probes.get(name + CONTROL_SUFFIX)
            if twin is not None:
                control = self._score(twin, acts, dataset)
                rows[-1]["control_accuracy"] = control["accuracy"]
                rows[-1]["selectivity"] = rows[-1]["accuracy"] - control["accuracy"]
        frame = pd.DataFrame(rows).set_index("probe")
        frame["layer"] = frame["layer"].astype("Int64")
        return frame

    def _score(self, probe: Probe, acts: dict[Request, np.ndarray], dataset: ProbeDataset) -> dict[str, Any]:
        """One probe's metrics row on a dataset's pooled activations."""
        site = self.sites[probe.config.site]
        classes = probe.classes_ if probe.is_classifier else None
        X, y, unseen = self._scored_rows(probe, acts[probe.requests[0]], dataset, classes)
        if _is_control(probe.name):
            y = _flat(self._control[1](dataset), probe.config.pool == "none")
            y = y[_labeled_mask(dataset, probe)]
        info = {"site": site.name, "pool": probe.config.pool, "layer": site.layer, "head": probe.config.head,
                "n_scored": len(y), "n_unseen_label": unseen}
        if probe.n_steps_ == 0:
            logger.warning("probe {!r} has no metrics: it never trained ({})", probe.name, probe.stopped_reason_)
            columns = METRIC_COLUMNS if probe.is_classifier else REGRESSION_COLUMNS
            return {**dict.fromkeys(columns, np.nan), **info, "n_steps": 0, "stopped_early": True,
                    "stop_reason": str(probe.stopped_reason_)}
        state = probe.compute()
        return {**probe.score(X, y), **info, "n_steps": state["n_steps"], "stopped_early": state["stopped_early"],
                "stop_reason": state["stop_reason"]}

    def _scored_rows(self, probe: Probe, X: np.ndarray, data: ProbeDataset,
                     classes: Any) -> tuple[np.ndarray, np.ndarray, int]:
        """The rows a probe is scored on: labeled tokens (or all examples), labels in its classes.

        Returns:
            ``(X, y, n_unseen)``: rows, targets, and labeled rows left out because their
            label is not among the probe's classes (token tasks only: a new tag in test).
        """
        keep = _labeled_mask(data, probe)
        y = _flat(data.token_labels if probe.config.pool == "none" else data.labels, probe.config.pool == "none")
        X, y = X[keep], y[keep]
        unseen = 0
        if probe.is_classifier and classes is not None:
            known = np.isin(y, np.asarray(classes))
            unseen = int((~known).sum())
            if unseen:
                logger.warning("probe {!r}: {} labeled tokens have tags never seen in training ({}); "
                               "they are left out of its metrics", probe.name, unseen, sorted(set(y[~known].tolist())))
                X, y = X[known], y[known]
        return X, y, unseen

    def _control_labels(self, fit: ProbeDataset, train: ProbeDataset) -> tuple[Any, Any]:
        """(distribution, fn(split) -> control targets) for this fit; seeded, per word type."""
        token = fit.is_token_level
        labels = fit.flat_token_labels() if token else fit.labels
        classes, probs = label_distribution(labels) if not fit.is_regression else (np.array([]), np.array([]))
        return self._control_from(token, classes, probs)

    def _control_from(self, token: bool, classes: np.ndarray, probs: np.ndarray) -> tuple[Any, Any]:
        cache: dict[int, Any] = {}

        def targets(split: ProbeDataset) -> Any:
            if id(split) not in cache:
                cache[id(split)] = control_targets(split, token, classes, probs, self.seed)
            return cache[id(split)]

        return (token, classes, probs), targets

    # ------------------------------------------------------------------ checks
    def _resolve(self, specs: Iterable[str]) -> None:
        """Check sites not seen yet against the model (before any forward pass)."""
        missing = [s for s in dict.fromkeys(specs) if s not in self.sites]
        if missing and self.store is not None:
            self.store.check(sites=missing)
        elif missing:
            self.sites.update(resolve_sites(self.model._module, missing))

    def _probe_requests(self) -> list[Request]:
        return _requests(self.probes.values())

    @staticmethod
    def _check_names(configs: list[ProbeConfig]) -> None:
        seen: dict[str, ProbeConfig] = {}
        for config in configs:
            if not isinstance(config, ProbeConfig):
                raise TypeError(f"configs must be ProbeConfig objects, got {type(config).__name__}")
            if config.name in seen:
                raise ValueError(
                    f"two probes are named {config.name!r} ({seen[config.name]!r} and {config!r}); "
                    "give each a unique name=..., e.g. ProbeConfig(site, pool='last', name='l9-last')"
                )
            seen[config.name] = config

    def _check_labels(self, data: ProbeDataset, what: str, default: tuple[int, ...] | None = None) -> None:
        if not isinstance(data, ProbeDataset):
            raise TypeError(f"the {what} set must be a ProbeDataset, got {type(data).__name__}")
        for probe in self.probes.values():
            token, config = probe.config.pool == "none", probe.config
            if token and not data.is_token_level:
                raise ValueError(f"probe {probe.name!r} uses pool='none' (token-level) but the {what} set has one "
                                 "label per example; build it with ProbeDataset.from_tagged(...)")
            if not token and data.is_token_level:
                raise ValueError(f"probe {probe.name!r} pools to one row per example but the {what} set has token "
                                 "labels; use pool='none' for token-level probes")
            if probe.is_classifier and data.is_regression:
                raise ValueError(f"probe {probe.name!r} is a classifier but the {what} labels are floats; "
                                 "use ProbeConfig(..., task='regression') for continuous targets")
        if data.is_regression or not any(p.is_classifier for p in self.probes.values()):
            return
        present = set(data.classes.tolist())
        if what == "training" and len(present) < 2:
            raise ValueError(
                f"the training set has a single class ({sorted(present)}); a probe needs examples of at least two"
            )
        if data.is_token_level and what != "training":
            return  # a new tag in the test set is reported at scoring time, not an error
        for probe in self.probes.values():
            allowed = probe.config.classes or default
            if probe.is_classifier and allowed is not None and not present <= set(allowed):
                raise ValueError(
                    f"the {what} set has labels {sorted(present - set(allowed))} outside the classes "
                    f"{list(allowed)} of probe {probe.name!r}; add them to classes= or drop those examples"
                )


def _flat(values: Any, token: bool) -> np.ndarray:
    return np.concatenate(values) if token else np.asarray(values)


def _labeled_mask(data: ProbeDataset, probe: Probe) -> np.ndarray:
    if probe.config.pool == "none":
        return data.flat_token_labels() != IGNORE
    return np.ones(len(data), bool)


CONTROL_SUFFIX = " [control]"  #: name suffix of a probe's control-task twin


def _is_control(name: str) -> bool:
    return name.endswith(CONTROL_SUFFIX)


def _probes_for(configs: Iterable[ProbeConfig], seed: int) -> dict[str, Probe]:
    """One probe per config, plus its control twin where asked; seeds depend on the name only."""
    probes = {}
    for c in configs:
        for name in [c.name] + ([c.name + CONTROL_SUFFIX] if c.control else []):
            probes[name] = Probe(c, random_state=(seed + zlib.crc32(name.encode())) % 2**32, name=name)
    return probes


def _bank_for(probes: dict[str, Probe], backend: str, device: torch.device) -> ProbeBank | None:
    """The torch backend's bank of linear classifiers (``None`` for scikit-learn, or no such probe)."""
    if check_backend(backend) == "sklearn":
        return None
    banked = [p for p in probes.values() if supports(p)]
    others = [p.name for p in probes.values() if not supports(p)]
    if others:
        logger.info("backend='torch' trains linear classifiers; {} stay on scikit-learn: {}", len(others), others)
    return ProbeBank(banked, device) if banked else None


def _emit(consumers: Iterable[Consumer], event: str, step: int, epoch: int) -> None:
    for consumer in consumers:
        consumer.on_event(event, step, epoch)


def _requests(consumers: Iterable[Consumer]) -> list[Request]:
    return list(dict.fromkeys(r for c in consumers for r in c.requests))


def _pad_id(model: Any) -> int:
    tok = getattr(model, "tokenizer", None)
    return int(tok.pad_token_id) if tok is not None and tok.pad_token_id is not None else 0


def _padding_side(model: Any) -> str:
    tok = getattr(model, "tokenizer", None)
    return getattr(tok, "padding_side", "right") if tok is not None else "right"
