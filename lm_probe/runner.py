"""ProbeRunner: one trace per batch, fanned out to every consumer.

The flow is one-way::

    dataset -> batches -> one nnsight trace per batch -> pooled activations per
    (site, pooling) -> consumers (probes, accumulators, gauges, stores) -> results

:meth:`ProbeRunner.fit_probes` carves a validation split off the training set, pools
it once, then runs the main loop in :meth:`ProbeRunner._pass`: each batch of the first
epoch is read once from the runner's source (a trace of the model, or a stored run) for
the sites that active consumers still need, the forward stops after the deepest of them,
and each consumer updates on the pooled activations. Every consumer sees that one pass;
the later epochs replay the cached pooled rows to the probes alone
(:mod:`lm_probe.core.replay`), so the model runs once per example. Probes stop themselves
early; when a probe stops its site is no longer read and its rows are no longer
replayed. Test activations are pooled the same way, one trace per batch for all probes,
to fill :attr:`metrics`.

Every consumer is met the same way (:mod:`lm_probe.core.consumer`): one
:class:`~lm_probe.core.consumer.RunContext` per pass given to ``start``, batches to
``update``, the pass's events to ``on_event``, and the rows of a
:class:`~lm_probe.core.consumer.SubsetRequest` a consumer declares when it is due, pooled by
the runner and handed in with ``observe``.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from loguru import logger
from tqdm.auto import tqdm

from .core.consumer import Consumer, PooledBatch, Request, RunContext, SubsetRequest, finite_rows, start_consumer
from .core.dataset import ProbeDataset, check_batch_size, format_labels
from .core.model import ensure_dispatched
from .core.replay import Cache, ReplayCache
from .core.sites import Site
from .core.sources import Source, StoreSource, TraceSource, read_dataset
from .core.trace import model_device
from .functional.metrics import METRIC_COLUMNS, REGRESSION_COLUMNS
from .probes.backend import ProbeBank, check_backend, supports
from .probes.control import ControlTask
from .probes.early_stopping import DecayOnPlateau, EarlyStopping
from .probes.probe import Probe, ProbeConfig, Training, _labeled

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
            activations that stay there (:mod:`lm_probe.probes.backend`); other heads stay on
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
        if not trace_kwargs.get("remote"):
            model = ensure_dispatched(model)  # a model built on meta gets its weights before any batch
        self.model, self.seed, self.progress, self.trace_kwargs = model, seed, progress, trace_kwargs
        if trace_kwargs.get("remote"):
            import nnsight

            from .core import pooling

            # the trace body pools with lm_probe.core.pooling: ship its source with each request,
            # since the server does not have lm_probe installed
            nnsight.register(pooling)
        self.configs = list(configs)
        self._check_names(self.configs)
        self.probes: dict[str, Probe] = _probes_for(self.configs, seed)
        device = device if device is not None else model_device(model, trace_kwargs.get("remote"))
        self.bank = _bank_for(self.probes, backend, device)
        self.consumers: list[Consumer] = list(consumers)
        # with the torch backend on an accelerator the traced tensors stay there
        on_device = self.bank is not None and self.bank.device.type != "cpu" and not trace_kwargs.get("remote")
        self.sites: dict[str, Site] = {}
        self.source: Source = TraceSource(model, self.sites, to_cpu=not on_device, trace_kwargs=trace_kwargs)
        self._resolve(spec for c in self.all_consumers for spec in c.site_specs())
        self.metrics: pd.DataFrame | None = None
        self.control: ControlTask | None = None
        self.cache_info_: dict[str, Any] | None = None

    # ------------------------------------------------------------------ access
    @property
    def all_consumers(self) -> list[Consumer]:
        """The probes followed by the other consumers."""
        return [*self.probes.values(), *self.consumers]

    def __getitem__(self, name: str) -> Probe:
        """The probe named ``name`` (its site, unless its config names it).

        Raises:
            KeyError: no probe has that name (the message lists the names).
        """
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
        cache: Cache | None = Cache(),
        lr_decay: float | None = None,
        decay_patience: int = 2,
    ) -> "ProbeRunner":
        """Train every probe online, with early stopping, then score them on ``test``.

        The model runs once per example: the first epoch traces each training batch once
        and feeds every consumer; epochs 2..n replay the pooled rows to the probes from
        the replay cache (:mod:`lm_probe.core.replay`), in a new seeded shuffle each epoch.
        Validation and test activations are pooled once each. Each call starts from
        fresh probe state and replaces :attr:`metrics`. A probe whose :class:`ProbeConfig`
        sets ``patience``, ``warmup_steps`` or ``max_steps`` uses its own value instead.

        Args:
            train: Training examples; a stratified ``val_size`` share is held out once
                for early stopping.
            test: Examples for :attr:`metrics` (``None`` leaves :attr:`metrics` ``None``).
            batch_size: Examples per forward pass (and per probe step).
            num_epochs: Passes of the probes over the training examples at most (the
                replayed epochs cost no forward; with ``cache=None`` every epoch traces
                again).
            val_size: Validation share (0 disables validation and early stopping).
            eval_every: Training steps between validation evaluations.
            patience: Evaluations without an improvement of ``min_delta`` in validation
                log-loss before a probe stops.
            min_delta: Smallest improvement that counts.
            warmup_steps: No early stop before this many steps.
            max_steps: Steps per probe at most.
            cache: Memory budget and spill folder of the replay cache (rows x hidden x 4
                bytes per probed (site, pooling); see :class:`~lm_probe.core.replay.Cache`).
                ``None`` traces the model again in every epoch. ``solver="lbfgs"`` probes
                hold their fit rows within its memory budget.
            lr_decay: Multiply an SGD probe's step size by this factor after
                ``decay_patience`` validations in a row without improvement
                (:class:`~lm_probe.probes.early_stopping.DecayOnPlateau`), so that the averaged
                SGD converges; ``None``: constant steps.
            decay_patience: Validations without improvement before each decay.

        Returns:
            ``self``, with :attr:`metrics` filled when ``test`` is given.
        """
        batch_size = check_batch_size(batch_size)
        if num_epochs < 1 or eval_every < 1:
            raise ValueError(f"num_epochs and eval_every must be at least 1, got {num_epochs}, {eval_every}")
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"cache must be lm_probe.Cache(...) or None, got {type(cache).__name__}")
        self._check_labels(train, "training")
        if test is not None:
            self._check_labels(test, "test", default=tuple(train.classes.tolist()))
        self.metrics, self.cache_info_ = None, None
        fit, val = train.tt_split(val_size, seed=self.seed) if val_size else (train, None)
        logger.info("training {} probes on {} examples ({} held out for validation)",
                    len(self.probes), len(fit), 0 if val is None else len(val))
        context = self._context(fit, batch_size)
        self._start(self.consumers, context)  # first: consumers check their own input before any forward
        budget = (cache or Cache()).memory_budget
        self._check_solver_memory(fit, budget)
        decay = DecayOnPlateau(lr_decay, decay_patience) if lr_decay else None
        training = self._training(train, fit, val, batch_size, eval_every=eval_every, decay=decay,
                                  max_row_bytes=budget, stopping=dict(patience=patience, min_delta=min_delta,
                                                                      warmup_steps=warmup_steps, max_steps=max_steps))
        trainers = self._trainers()
        self._start(trainers, replace(context, training=training))  # the same context, with the probes' settings
        self._train(fit, trainers, num_epochs, cache, batch_size=batch_size, shuffle=True, by_length=True,
                    validate_every=eval_every if val is not None else None)
        if test is not None:
            self.metrics = self.evaluate(test, batch_size=batch_size)
        return self

    def _check_solver_memory(self, fit: ProbeDataset, budget: int) -> None:
        """Refuse, before any forward, ``solver="lbfgs"`` probes whose fit rows cannot fit in
        the cache's memory budget (the hidden size is the model's; a wider site is caught
        at its first batch)."""
        hidden = getattr(getattr(getattr(self.model, "_module", None), "config", None), "hidden_size", None)
        if hidden is None:
            return
        for probe in self.probes.values():
            if probe.config.solver != "lbfgs":
                continue
            rows = len(fit) if probe.config.pool != "none" else int(sum(len(r) for r in fit.ids))
            need = rows * int(hidden) * 4
            if need > budget:
                raise MemoryError(f"probe {probe.name!r}: solver='lbfgs' needs its {rows} fit rows x {hidden} in "
                                  f"memory ({need / 2**20:.1f} MiB), over the cache budget of {budget / 2**20:.1f} "
                                  "MiB; raise it with fit_probes(cache=Cache(memory_budget=...)) or use solver='sgd'")

    def _training(self, train: ProbeDataset, fit: ProbeDataset, val: ProbeDataset | None, batch_size: int,
                  stopping: dict[str, Any], decay: DecayOnPlateau | None, **settings: Any) -> dict[str, Training]:
        """Every probe's :class:`~lm_probe.probes.probe.Training` for this fit: classes, the control
        task of this fit, the pooled validation rows (once, for all probes), early stopping
        and the step budget (``stopping``, with a probe's own
        :data:`~lm_probe.probes.probe.PER_PROBE` values in place)."""
        has_twin = any(_is_control(name) for name in self.probes)
        self.control = ControlTask.for_fit(fit, self.seed) if has_twin and not fit.is_regression else None
        val_acts = self.pooled(val, self._probe_requests(), batch_size, "validation") if val else {}
        control_fit = self.control.labels(fit) if self.control is not None else None
        n_rows = {False: int(_labeled(fit.labels).sum()),  # training rows per pooling, for alpha="auto"
                  True: int(_labeled(fit.flat_token_labels()).sum()) if fit.token_labels is not None else None}
        training = {}
        for name, probe in self.probes.items():
            classes = probe.config.classes or tuple(train.classes.tolist())
            validation, n_bad = None, 0
            if val is not None:
                X, y, _, n_bad = self._scored_rows(probe, val_acts[probe.requests[0]], val, classes, "validation")
                validation = (X, y)
            own = probe.config.training(**stopping)
            max_steps = own.pop("max_steps")
            training[name] = Training(classes=tuple(classes) if probe.is_classifier else None, validation=validation,
                                      n_nonfinite=n_bad, early_stopping=EarlyStopping(**own), max_steps=max_steps,
                                      decay=decay, n_rows=n_rows[probe.config.pool == "none"],
                                      relabel=control_fit if _is_control(name) else None, **settings)
        return training

    def _train(self, fit: ProbeDataset, trainers: list[Consumer], num_epochs: int, cache: Cache | None,
               **schedule: Any) -> None:
        """The training passes: the first epoch from the source, for every consumer (and
        the replay cache); the later epochs for the trainers alone, from the cache."""
        recorder = ReplayCache(fit, trainers, cache) if (
            num_epochs > 1 and cache is not None and not self.source.replayable) else None
        clock = _Clock(self.pooled)
        try:
            clock.emit([*trainers, *self.consumers], "start", 0, 0)
            first = [*trainers, *self.consumers, *([recorder] if recorder else [])]
            step = self._pass(fit, first, self.source, range(1), clock, **schedule)
            clock.end(self.consumers, step, 1)  # the consumers' one pass is over
            if num_epochs > 1:
                if recorder is not None:
                    self.cache_info_ = recorder.compute()
                    logger.info("replay cache: {} requests, {:.1f} MiB in memory, {:.1f} MiB spilled",
                                len(self.cache_info_["requests"]), recorder.nbytes_in_memory / 2**20,
                                recorder.nbytes_spilled / 2**20)
                step = self._pass(fit, trainers, recorder or self.source, range(1, num_epochs), clock, step=step,
                                  **schedule)
            clock.end(trainers, step, num_epochs)
        finally:
            if recorder is not None:
                recorder.close()

    def _trainers(self) -> list[Consumer]:
        """What trains the probes: the probe bank (torch backend) in place of its
        probes, and the other probes."""
        if self.bank is None:
            return list(self.probes.values())
        banked = {id(p) for p in self.bank.probes}
        return [self.bank, *(p for p in self.probes.values() if id(p) not in banked)]

    def _context(self, data: ProbeDataset, batch_size: int) -> RunContext:
        """The pass's :class:`~lm_probe.core.consumer.RunContext` (the sites as a read-only view)."""
        return RunContext(model=self.model, sites=MappingProxyType(self.sites), data=data, batch_size=batch_size)

    def _start(self, consumers: Sequence[Consumer], context: RunContext) -> None:
        """Start each consumer with ``context``, then check the sites ``start()`` added."""
        for consumer in consumers:
            start_consumer(consumer, context, runner=self)  # runner=: only for the earlier keyword form
        self._resolve([s for c in consumers for s in c.site_specs()])

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
        batch_size = check_batch_size(batch_size)
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
        consumers = list(self.consumers if consumers is None else consumers)
        self._resolve([s for c in consumers for s in c.site_specs()])
        self._start(consumers, self._context(dataset, batch_size))  # start() may add model-dependent sites
        clock = _Clock(self.pooled)
        clock.emit(consumers, "start", 0, 0)
        step = self._pass(dataset, consumers, self.source, range(1), clock, batch_size=batch_size, shuffle=False,
                          by_length=False, max_tokens=max_tokens)
        clock.end(consumers, step, 1 if step else 0)
        return self

    def _pass(self, data: ProbeDataset, consumers: list[Consumer], source: Source, epochs: range,
              clock: "_Clock", *, batch_size: int, shuffle: bool, by_length: bool, step: int = 0,
              max_tokens: int | None = None, validate_every: int | None = None) -> int:
        """The main loop: each batch read once from ``source``, fanned out to the active
        consumers. Returns the number of training steps taken so far."""
        per_epoch = -(-len(data) // batch_size)
        batches = ((epoch, k + 1 == per_epoch, batch) for epoch in epochs
                   for k, batch in enumerate(data.batches(batch_size, shuffle=shuffle, seed=self.seed + epoch,
                                                          by_length=by_length)))
        tokens, first = 0, step
        with tqdm(total=per_epoch * len(epochs), desc="batches", disable=not self.progress, leave=False) as bar:
            for epoch, last_of_epoch, batch in batches:
                active = [c for c in consumers if c.active]
                if not active:
                    break
                pooled = PooledBatch(source.read(batch, data, _requests(active)), batch.labels, step, epoch,
                                     batch.index, batch.attention_mask.sum(1).numpy(), batch.token_labels,
                                     data.example_ids[batch.index])
                if max_tokens is not None and tokens + pooled.n_tokens.sum() >= max_tokens:
                    pooled = pooled.first_tokens(max_tokens - tokens)
                for consumer in active:
                    consumer.update(pooled)
                tokens += int(pooled.n_tokens.sum())
                step += 1
                bar.update(1)
                clock.emit(consumers, "step", step, epoch)
                if validate_every and step % validate_every == 0:
                    clock.emit(consumers, "validation", step, epoch)
                if last_of_epoch:
                    clock.emit(consumers, "epoch_end", step, epoch + 1)
                if max_tokens is not None and tokens >= max_tokens:
                    break
        logger.info("pass done: {} batches from the {} ({} tokens), epochs {}..{}", step - first,
                    type(source).__name__, tokens, epochs.start + 1, epochs.stop)
        return step

    # ------------------------------------------------------------------ reading
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
        requests = list(requests) if requests is not None else self._probe_requests()
        self._resolve([spec for spec, _ in requests])
        return read_dataset(self.source, dataset, requests, batch_size, progress=self.progress, desc=desc)

    def get_probe_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           subset: Sequence[str] | None = None, *,
                           batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Each probe's pooled input features for a padded batch (as the original lm_probe's).

        Args:
            input_ids: ``(n, tokens)`` ids.
            attention_mask: ``(n, tokens)`` mask.
            subset: Names of the probes to compute (default, or empty: all). A probe's name
                is its site unless its config names it.
            batch_size: Trace in chunks of this many rows (default: all at once).

        Returns:
            ``{probe name: (n, hidden) float32 array}``, the rows ``runner[name].predict``
            takes.

        Raises:
            KeyError: a name in ``subset`` is no probe's.
        """
        probes = {name: self[name] for name in subset} if subset else self.probes
        batch_size = len(input_ids) if batch_size is None else batch_size  # pooled checks it
        data = ProbeDataset.from_tensors(input_ids, attention_mask, np.zeros(len(input_ids), np.int64),
                                         pad_token_id=_pad_id(self.model),
                                         padding_side=_padding_side(self.model))
        acts = self.pooled(data, _requests(probes.values()), batch_size, "features")
        return {name: acts[p.requests[0]] for name, p in probes.items()}

    @classmethod
    def from_store(cls, run: Any, configs: Iterable[ProbeConfig], *, seed: int = 0,
                   consumers: Iterable[Consumer] = (), progress: bool = True, backend: str = "sklearn",
                   device: str | torch.device | None = None) -> "ProbeRunner":
        """A runner that reads pooled activations from a stored run instead of a model.

        ``fit_probes`` / ``evaluate`` then work as with the live model (same seed, same
        splits, same batches), on the datasets the run was collected from (or their
        ``tt_split`` parts: rows are matched by ``example_ids``).

        Args:
            run: A :class:`~lm_probe.consumers.store.StoredRun` (``ActivationStore.open(path).run(name)``).
            configs: Probe configurations; their (site, pooling) must be in the run.
            backend, device: As for :class:`ProbeRunner` (the device defaults to the CPU).
        """
        configs, consumers = list(configs), list(consumers)
        run.check(requests=[(c.site, c.pool) for c in configs] + _requests(consumers))
        return cls.from_source(StoreSource(run), configs, seed=seed, consumers=consumers, progress=progress,
                               backend=backend, device=device)

    @classmethod
    def from_source(cls, source: Source, configs: Iterable[ProbeConfig], *, seed: int = 0,
                    consumers: Iterable[Consumer] = (), progress: bool = True, backend: str = "sklearn",
                    device: str | torch.device | None = None) -> "ProbeRunner":
        """A runner that reads pooled activations from any :class:`~lm_probe.core.sources.Source`
        (a :class:`~lm_probe.core.sources.ArraySource` of rows pooled once, say) instead of a model.

        Args:
            source: Where the rows come from; its sites are checked now.
            configs, seed, consumers, progress, backend, device: As for :meth:`from_store`.
        """
        runner = cls._without_model(configs, seed=seed, consumers=consumers, progress=progress, source=source,
                                    backend=backend, device=device)
        runner._resolve(spec for c in runner.all_consumers for spec in c.site_specs())
        return runner

    @classmethod
    def _without_model(cls, configs: Iterable[ProbeConfig], *, seed: int, consumers: Iterable[Consumer] = (),
                       progress: bool = False, source: Source | None = None, backend: str = "sklearn",
                       device: str | torch.device | None = None) -> "ProbeRunner":
        """A runner with probes but no model (activations come from a store, or none are read)."""
        runner = cls.__new__(cls)
        runner.model, runner.seed, runner.progress, runner.trace_kwargs = None, seed, progress, {}
        runner.source = source if source is not None else _NoSource()
        runner.configs, runner.consumers = list(configs), list(consumers)
        cls._check_names(runner.configs)
        runner.probes, runner.sites, runner.metrics = _probes_for(runner.configs, seed), {}, None
        runner.control, runner.cache_info_ = None, None
        runner.bank = _bank_for(runner.probes, backend, torch.device(device or "cpu"))
        return runner

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Save the probes, their configurations and the metrics (JSON + npz, no pickle).

        Raises:
            FileExistsError: ``path`` is not empty and ``overwrite`` is False.
        """
        from .probes.persist import save_probes

        return save_probes(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> "ProbeRunner":
        """Load probes saved with :meth:`save`; give ``model`` to trace again, or use
        ``runner[name].predict(features)`` without one.

        Raises:
            ValueError: a newer schema version, or a model of another hidden size.
        """
        from .probes.persist import SavedProbes

        saved = SavedProbes(path, model)
        if model is not None:
            runner = cls(model, saved.configs, seed=saved.seed, progress=False)
        else:
            runner = cls._without_model(saved.configs, seed=saved.seed)
        runner.probes.update(saved.probes())
        runner.metrics, runner.control = saved.metrics(), saved.control()
        return runner

    # ------------------------------------------------------------------ results
    def evaluate(self, dataset: ProbeDataset, batch_size: int = 16) -> pd.DataFrame:
        """Score every probe on ``dataset`` (one trace per batch for all probes).

        Rows whose activations are non-finite are left out and counted
        (``n_nonfinite``); a probe that cannot be scored gets NaN metrics and the reason in
        ``score_error`` (with a warning), so one bad probe never costs the others' scores.

        Returns:
            DataFrame indexed by probe name with ``loss``, ``accuracy``, ``precision``,
            ``recall``, ``f1`` (macro), ``matthews``, ``site``, ``pool``, ``layer``,
            ``n_steps``, ``stopped_early``, ``stop_reason``, ``n_scored``,
            ``n_nonfinite`` (rows of ``dataset`` left out), ``n_nonfinite_fit``
            (training and validation rows left out), the solver that produced the
            weights (``solver``, ``C`` or ``alpha``, ``n_epochs``, ``converged``: see
            :meth:`Probe.solver_summary`); ``control_accuracy`` and ``selectivity`` for
            probes with a control twin.
        """
        acts = self.pooled(dataset, self._probe_requests(), batch_size, "test")  # pooled checks batch_size
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
        X, y, unseen, nonfinite = self._scored_rows(probe, acts[probe.requests[0]], dataset, classes, "test")
        info = {"site": site.name, "pool": probe.config.pool, "layer": site.layer, "head": probe.config.head,
                "n_scored": len(y), "n_unseen_label": unseen, "n_nonfinite": nonfinite,
                "n_nonfinite_fit": probe.n_nonfinite_}
        columns = METRIC_COLUMNS if probe.is_classifier else REGRESSION_COLUMNS
        if probe.n_steps_ == 0:
            logger.warning("probe {!r} has no metrics: it never trained ({}; {} training rows had non-finite "
                           "activations)", probe.name, probe.stopped_reason_, probe.n_nonfinite_)
            return {**dict.fromkeys(columns, np.nan), **info, **probe.solver_summary(), "n_steps": 0,
                    "stopped_early": True, "stop_reason": str(probe.stopped_reason_)}
        state = probe.compute()
        summary = {key: state[key] for key in ("n_steps", "stopped_early", "stop_reason", "solver", "C", "alpha",
                                               "n_epochs", "converged")}
        if len(y) == 0:
            logger.warning("probe {!r} has no {} rows to score (all left out)", probe.name, "test")
            return {**dict.fromkeys(columns, np.nan), **info, **summary, "score_error": "no rows to score"}
        try:
            scores = probe.score(X, y)
        except (ValueError, FloatingPointError, np.linalg.LinAlgError) as err:  # keep the other probes' scores
            logger.warning("probe {!r} could not be scored: {}: {}", probe.name, type(err).__name__, err)
            return {**dict.fromkeys(columns, np.nan), **info, **summary, "score_error": f"{type(err).__name__}: {err}"}
        return {**scores, **info, **summary}

    def _targets(self, probe: Probe, data: ProbeDataset) -> np.ndarray:
        """A probe's targets on ``data`` in its row order: the control labels for a twin."""
        token = probe.config.pool == "none"
        if _is_control(probe.name):
            if self.control is None:
                raise RuntimeError(f"probe {probe.name!r} is a control twin but this runner has no control task; "
                                   "train it with fit_probes first")
            return self.control.flat_labels(data)
        return _flat(data.token_labels if token else data.labels, token)

    def _scored_rows(self, probe: Probe, X: np.ndarray, data: ProbeDataset, classes: Any,
                     what: str) -> tuple[np.ndarray, np.ndarray, int, int]:
        """The rows a probe is scored on: labeled tokens (or all examples) with finite
        activations, labels in its classes.

        Returns:
            ``(X, y, n_unseen, n_nonfinite)``: rows, targets, labeled rows left out because
            their label is not among the probe's classes (token tasks only: a new tag in
            test), and labeled rows left out because their activations are non-finite.
        """
        y = self._targets(probe, data)
        keep = _labeled(y)
        bad = keep & ~finite_rows(X)
        nonfinite = int(bad.sum())
        if nonfinite:
            logger.warning("probe {!r}: {} {} rows have non-finite activations at site {!r}; they are left out",
                           probe.name, nonfinite, what, probe.config.site)
        keep &= ~bad
        X, y = X[keep], y[keep]
        unseen = 0
        if probe.is_classifier and classes is not None:
            known = np.isin(y, np.asarray(classes))
            unseen = int((~known).sum())
            if unseen:
                logger.warning("probe {!r}: {} labeled tokens have tags never seen in training {}; they are left "
                               "out of its metrics", probe.name, unseen,
                               format_labels(sorted(set(y[~known].tolist())), self._names(data, probe)))
                X, y = X[known], y[known]
        return X, y, unseen, nonfinite

    # ------------------------------------------------------------------ checks
    def _resolve(self, specs: Iterable[str]) -> None:
        """Check sites not seen yet against the source (before any forward pass)."""
        missing = [s for s in dict.fromkeys(specs) if s not in self.sites]
        if missing:
            self.sites.update(self.source.resolve(missing))

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
            named = getattr(config, "label_names", None)
            if named is not None and data.label_names is not None and named != data.label_names:
                raise ValueError(f"probe {probe.name!r} names its labels {named} but the {what} set names them "
                                 f"{data.label_names}; give the probe label_names={data.label_names!r}")
        if data.is_regression or not any(p.is_classifier for p in self.probes.values()):
            return
        present = set(data.classes.tolist())
        if what == "training" and len(present) < 2:
            single = format_labels(sorted(present), self._names(data))
            raise ValueError(f"the training set has a single class ({single}); a probe needs examples of at least two")
        if data.is_token_level and what != "training":
            return  # a new tag in the test set is reported at scoring time, not an error
        for probe in self.probes.values():
            allowed = probe.config.classes or default
            if probe.is_classifier and allowed is not None and not present <= set(allowed):
                names = self._names(data, probe)
                raise ValueError(
                    f"the {what} set has labels {format_labels(sorted(present - set(allowed)), names)} outside the "
                    f"classes {format_labels(allowed, names)} of probe {probe.name!r}; add them to classes= or drop "
                    "those examples"
                )

    def _names(self, data: ProbeDataset | None, probe: Probe | None = None) -> list[str] | None:
        """The class names for messages: the data's, else the probe's (or any probe's) label_names."""
        if data is not None and data.label_names is not None:
            return data.label_names
        configs = [probe.config] if probe is not None else [p.config for p in self.probes.values()]
        return next((c.label_names for c in configs if getattr(c, "label_names", None) is not None), None)


def _flat(values: Any, token: bool) -> np.ndarray:
    return np.concatenate(values) if token else np.asarray(values)


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


class _Clock:
    """The events of one ``fit_probes`` or ``collect`` call, told to its consumers.

    A consumer that declares a :class:`~lm_probe.core.consumer.SubsetRequest` at an event gets
    its rows with ``observe``; each request is pooled once per pass (the model is frozen
    while it runs) by ``pooled``, the runner's reader, and its rows are let go at the end.
    """

    def __init__(self, pooled: Any) -> None:
        self.pooled = pooled
        self.rows: dict[SubsetRequest, dict[Request, np.ndarray]] = {}  # by identity: one request per pass

    def emit(self, consumers: Iterable[Consumer], event: str, step: int, epoch: int) -> None:
        for consumer in consumers:
            consumer.on_event(event, step, epoch)
            wanted = consumer.subset_due(event, step, epoch)
            if wanted is None:
                continue
            if wanted not in self.rows:
                self.rows[wanted] = self.pooled(wanted.data, list(wanted.requests), wanted.batch_size, "subset")
            consumer.observe(self.rows[wanted], event, step, epoch)

    def end(self, consumers: Iterable[Consumer], step: int, epoch: int) -> None:
        """The end of a consumer's pass: ``finish()``, then the ``"end"`` event."""
        consumers = list(consumers)
        for consumer in consumers:
            consumer.finish()
        self.emit(consumers, "end", step, epoch)
        self.rows.clear()


class _NoSource:
    """The source of a runner without a model or store: reading is an error that says why."""

    replayable = True

    def read(self, batch: Any, data: ProbeDataset, requests: Sequence[Request]) -> Mapping[Request, np.ndarray]:
        raise RuntimeError("this runner has no model to trace: load it with ProbeRunner.load(path, model=...), "
                           "or predict from features with runner[name].predict(X)")

    def resolve(self, specs: Iterable[str]) -> dict[str, Site]:
        return {}


def _requests(consumers: Iterable[Consumer]) -> list[Request]:
    return list(dict.fromkeys(r for c in consumers for r in c.requests))


def _pad_id(model: Any) -> int:
    tok = getattr(model, "tokenizer", None)
    return int(tok.pad_token_id) if tok is not None and tok.pad_token_id is not None else 0


def _padding_side(model: Any) -> str:
    tok = getattr(model, "tokenizer", None)
    return getattr(tok, "padding_side", "right") if tok is not None else "right"
