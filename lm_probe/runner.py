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
replayed. Test activations are pooled the same way, one trace per batch for all probes, to
fill :attr:`metrics`. The runner is the loop and what joins it: every consumer is met through
one protocol (:mod:`lm_probe.core.consumer`); the checks before a fit, each probe's settings,
scoring, saving and deployed use (:mod:`lm_probe.probes.deploy`) live in :mod:`lm_probe.probes`."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from loguru import logger
from tqdm.auto import tqdm

from .core.batching import check_batch_size
from .core.clock import Clock
from .core.consumer import Consumer, PooledBatch, Request, RunContext, requests_of, start_consumer
from .core.dataset import ProbeDataset
from .core.distributed import data_parallel, fingerprint, is_writer, world_size
from .core.model import ensure_dispatched
from .core.replay import Cache, ReplayCache
from .core.sites import Site
from .core.sources import Source, StoreSource, TraceSource, read_dataset
from .core.trace import model_device, ship_pooling
from .probes.backend import bank_for, trainers_of
from .probes.baselines import baselines_table
from .probes.baseline import baseline_runner, check_baseline, then_fit_baseline
from .probes.checks import check_fit, check_intervals, check_names, check_solver_memory, split_validation
from .probes.config import ProbeConfig
from .probes.control import ControlTask, probes_for
from .probes.early_stopping import DecayOnPlateau
from .probes.deploy import Deployed
from .probes.features import ProbeFeatures
from .probes.persist import Persistent
from .probes.fitting import control_task, fit_settings
from .probes.probe import Probe
from .probes.scoring import metrics_table

__all__ = ["ProbeRunner"]


class ProbeRunner(ProbeFeatures, Persistent, Deployed):
    """Train many probes (and feed other consumers) from one forward pass per batch.

    Args:
        model: An nnsight model (see :func:`lm_probe.load_model`).
        configs: One :class:`ProbeConfig` per probe, in any order.
        consumers: Other consumers (geometry accumulators, gauges...) fed from the
            same traces.
        seed: Seed for splits, batch order and the probes' SGD.
        progress: Show a progress bar over batches.
        backend: ``"sklearn"`` (default): each probe steps its own scikit-learn estimator.
            ``"torch"``: the linear classifiers train together, one batched tensor step per
            batch on ``device`` (:mod:`lm_probe.probes.backend`); other heads stay on
            scikit-learn. Same loss, penalty, schedule, averaging and early stopping.
        device: Where the torch backend computes (default: the model's device).
        baseline: ``"random_init"``: also train every probe on a copy of the model with re-initialized
            weights, on the same batches (one extra forward per example; :mod:`lm_probe.probes.baseline`):
            ``metrics`` gains ``baseline_accuracy``, ... and :attr:`baseline_runner` is that copy's runner.
        **trace_kwargs: Passed to every ``model.trace`` call; ``remote=True`` runs every
            trace through nnsight's remote execution (NDIF), ``remote="local"`` simulates
            it offline. Only the pooled ``(batch, hidden)`` tensors come back.
        distributed: After ``torch.distributed.init_process_group`` (``None``: detected; ``False``: alone), each rank
            traces a shard of every ``world x batch_size`` batch, all see its rows (:mod:`lm_probe.core.distributed`).

    Raises:
        SiteError: a site names no module of the model (before any forward pass).
        ValueError: probe names collide; an unknown ``baseline``, or one for a remote run; data-parallel
            ranks set up differently (``DistributedMismatchError``).
    """

    def __init__(self, model: Any, configs: Iterable[ProbeConfig] = (), *, consumers: Iterable[Consumer] = (),
                 seed: int = 0, progress: bool = True, backend: str = "sklearn",
                 device: str | torch.device | None = None, baseline: str | None = None,
                 distributed: bool | None = None, **trace_kwargs: Any) -> None:
        if not hasattr(model, "trace") or not hasattr(model, "_module"):
            raise TypeError(f"ProbeRunner needs an nnsight model, got {type(model).__name__}; "
                            "wrap it first: model = lm_probe.load_model(hf_model, tokenizer=tokenizer)")
        remote = trace_kwargs.get("remote")
        if not remote:
            model = ensure_dispatched(model)  # a model built on meta gets its weights before any batch
        else:
            ship_pooling()
        device = device if device is not None else model_device(model, remote)
        self._setup(model, configs, consumers, seed, progress, backend, device, trace_kwargs, baseline)
        on_device = self.bank is not None and self.bank.device.type != "cpu" and not remote  # tensors stay there
        setup = fingerprint(model, self.configs, self.all_consumers, seed=seed, backend=backend, baseline=baseline)
        self.source: Source = data_parallel(TraceSource(model, self.sites, to_cpu=not on_device,
                                                        trace_kwargs=trace_kwargs), distributed, setup)
        self.progress = progress and is_writer(self.source)
        self._resolve(spec for c in self.all_consumers for spec in c.site_specs())  # before the copy is made
        self.baseline_runner = baseline_runner(type(self), baseline, model, self.configs, seed=seed, progress=progress,
                                               trace_kwargs=trace_kwargs, backend=backend, device=device)

    def _setup(self, model: Any, configs: Iterable[ProbeConfig], consumers: Iterable[Consumer], seed: int,
               progress: bool, backend: str, device: str | torch.device, trace_kwargs: dict[str, Any],
               baseline: str | None = None) -> None:
        """The state of every runner, with a model or without: probes, bank, consumers, baseline."""
        self.model, self.seed, self.progress, self.trace_kwargs = model, seed, progress, trace_kwargs
        self.configs = list(configs)
        check_names(self.configs)
        self.probes: dict[str, Probe] = probes_for(self.configs, seed)
        self.bank = bank_for(self.probes, backend, device)
        self.consumers: list[Consumer] = list(consumers)
        self.sites: dict[str, Site] = {}
        self.metrics: pd.DataFrame | None = None
        self.baselines: pd.DataFrame | None = None  # text baselines of the last fit (probes.baselines)
        self.control: ControlTask | None = None
        self.cache_info_: dict[str, Any] | None = None
        check_baseline(baseline, has_model=model is not None, remote=bool(trace_kwargs.get("remote")))
        self.baseline_runner: ProbeRunner | None = None  #: the random-init copy's runner (``baseline="random_init"``)

    @property
    def world(self) -> int:
        """Processes that share each batch (the data-parallel ranks; 1 in one process)."""
        return world_size(self.source)

    @property
    def all_consumers(self) -> list[Consumer]:
        """The probes followed by the other consumers."""
        return [*self.probes.values(), *self.consumers]

    def __getitem__(self, name: str) -> Probe:
        """The probe named ``name`` (its site, unless its config names it); a ``KeyError``
        that lists the names if there is none."""
        if name not in self.probes:
            raise KeyError(f"no probe named {name!r}; probes are {list(self.probes)}")
        return self.probes[name]

    def __repr__(self) -> str:
        return f"ProbeRunner({len(self.probes)} probes, {len(self.consumers)} other consumers, {len(self.sites)} sites)"

    # ------------------------------------------------------------------ training
    @then_fit_baseline  # with a baseline_runner: fit it too, with the same arguments, and add its metrics
    def fit_probes(self, train: ProbeDataset, test: ProbeDataset | None = None, *, batch_size: int = 16,
                   num_epochs: int = 100, val_size: float = 0.1, eval_every: int = 10, patience: int = 15,
                   min_delta: float = 1e-4, warmup_steps: int = 0, max_steps: int | None = None,
                   cache: Cache | None = Cache(), lr_decay: float | None = 0.5,
                   decay_patience: int = 3, ci: float = 0.95, n_boot: int = 1000) -> "ProbeRunner":
        """Train every probe online, with early stopping, then score them on ``test``
        (:attr:`metrics`); returns ``self``.

        The first epoch traces each training batch once for every consumer; epochs 2..n replay
        the pooled rows to the probes (:mod:`lm_probe.core.replay`), in a new seeded plain shuffle
        each (the traced epoch groups lengths to save padding); validation and test rows are pooled
        once each. Each call starts from fresh probes and replaces :attr:`metrics`. A
        :class:`ProbeConfig`'s own ``patience``, ``warmup_steps`` or ``max_steps`` replace these.

        Args:
            train: Training examples; a stratified ``val_size`` share is held out once.
            test: Examples for :attr:`metrics` and :attr:`baselines` (``None`` leaves them ``None``).
            batch_size: Examples per forward pass (and per probe step, times :attr:`world`).
            num_epochs: Passes over the training examples at most: early stopping ends training
                first on ordinary data (replayed epochs cost no forward; ``cache=None`` traces each).
            val_size: Validation share (0 disables validation and early stopping).
            eval_every: Training steps between validation evaluations.
            patience: Evaluations without a ``min_delta`` (smallest improvement that counts)
                improvement in validation log-loss before a probe stops.
            min_delta: See ``patience``.
            warmup_steps: No early stop before this many steps.
            max_steps: Steps per probe at most.
            cache: The replay cache's memory budget and spill folder (rows x hidden x 4 bytes
                per probed (site, pooling): :class:`~lm_probe.core.replay.Cache`), which also
                bounds ``solver="lbfgs"`` fit rows; ``None`` traces again in every epoch.
            lr_decay: Multiply an SGD probe's step by this after ``decay_patience``
                validations in a row without improvement (so that the averaged SGD converges:
                :class:`~lm_probe.probes.early_stopping.DecayOnPlateau`); ``None``: constant.
            decay_patience: Validations without improvement before each decay.
            ci, n_boot: The bootstrap intervals of the test metrics (:meth:`evaluate`).
        """
        batch_size = check_fit(list(self.probes.values()), train, test, batch_size=batch_size, num_epochs=num_epochs,
                               eval_every=eval_every, cache=cache, ci=ci, n_boot=n_boot)
        self.metrics, self.baselines, self.cache_info_ = None, None, None
        fit, val = split_validation(train, val_size, self.seed)
        logger.info("training {} probes on {} examples ({} held out for validation)",
                    len(self.probes), len(fit), 0 if val is None else len(val))
        context = self._context(fit, batch_size)
        self._start(self.consumers, context)  # first: consumers check their own input before any forward
        decay = DecayOnPlateau(lr_decay, decay_patience) if lr_decay else None
        trainers = self._trainers(train, fit, val, context, (cache or Cache()).memory_budget, eval_every=eval_every,
                                  decay=decay, stopping=dict(patience=patience, min_delta=min_delta,
                                                             warmup_steps=warmup_steps, max_steps=max_steps))
        self._train(fit, trainers, num_epochs, cache, batch_size=batch_size * self.world, shuffle=True, by_length=True,
                    validate_every=eval_every if val is not None else None)
        if test is not None:
            self.metrics = self.evaluate(test, batch_size=batch_size, ci=ci, n_boot=n_boot)
            self.baselines = baselines_table(self.probes, fit, test, ci=ci, n_boot=n_boot, seed=self.seed)
        return self

    def _trainers(self, train: ProbeDataset, fit: ProbeDataset, val: ProbeDataset | None, context: RunContext,
                  budget: int, **settings: Any) -> list[Consumer]:
        """The probes' trainers, started on ``context`` with the fit's settings (control task,
        validation rows pooled once, early stopping); checks the solvers' memory first."""
        check_solver_memory(self.probes.values(), fit, self.model, budget)
        self.control = control_task(self.probes, fit, self.seed)
        val_acts = self.pooled(val, requests_of(self.probes.values()), context.batch_size, "validation") if val else {}
        training = fit_settings(self.probes, train, fit, val, val_acts, self.control, max_row_bytes=budget, **settings)
        trainers = trainers_of(self.probes, self.bank)
        self._start(trainers, replace(context, training=training))  # the same context, with the probes' settings
        return trainers

    def _train(self, fit: ProbeDataset, trainers: list[Consumer], num_epochs: int, cache: Cache | None,
               **schedule: Any) -> None:
        """The training passes: the first epoch from the source, for every consumer (and
        the replay cache); the later epochs for the trainers alone, from the cache."""
        recorder = ReplayCache(fit, trainers, cache) if (
            num_epochs > 1 and cache is not None and not self.source.replayable) else None
        clock = Clock(self.pooled)
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
                                  **{**schedule, "by_length": False})  # no padding to save: a plain shuffle
            clock.end(trainers, step, num_epochs)
        finally:
            if recorder is not None:
                recorder.close()

    def _context(self, data: ProbeDataset, batch_size: int, max_tokens: int | None = None) -> RunContext:
        """The pass's :class:`~lm_probe.core.consumer.RunContext` (the sites as a read-only view)."""
        return RunContext(model=self.model, sites=MappingProxyType(self.sites), data=data, batch_size=batch_size,
                          writer=is_writer(self.source), max_tokens=max_tokens)

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
        self._start(consumers, self._context(dataset, batch_size, max_tokens))  # start() may add sites
        clock = Clock(self.pooled)
        clock.emit(consumers, "start", 0, 0)
        step = self._pass(dataset, consumers, self.source, range(1), clock, batch_size=batch_size * self.world,
                          shuffle=False, by_length=False, max_tokens=max_tokens)
        clock.end(consumers, step, 1 if step else 0)
        return self

    def _pass(self, data: ProbeDataset, consumers: list[Consumer], source: Source, epochs: range, clock: Clock, *,
              batch_size: int, shuffle: bool, by_length: bool, step: int = 0, max_tokens: int | None = None,
              validate_every: int | None = None) -> int:
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
                pooled = PooledBatch(source.read(batch, data, requests_of(active)), batch.labels, step, epoch,
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
        """Pooled activations of a whole dataset, one trace per batch for all requests
        (``requests``: ``(site, pooling)`` pairs, default every probe's).

        Returns:
            ``{(site, pooling): (n, hidden) float32 array}`` in dataset order; for
            ``pool="none"`` the rows are every real token, example by example
            (:func:`~lm_probe.core.sources.read_dataset`).
        """
        requests = list(requests) if requests is not None else requests_of(self.probes.values())
        self._resolve([spec for spec, _ in requests])
        return read_dataset(self.source, dataset, requests, check_batch_size(batch_size) * self.world,
                            progress=self.progress, desc=desc)

    @classmethod
    def from_store(cls, run: Any, configs: Iterable[ProbeConfig], *, seed: int = 0,
                   consumers: Iterable[Consumer] = (), progress: bool = True, backend: str = "sklearn",
                   device: str | torch.device | None = None, baseline: str | None = None) -> "ProbeRunner":
        """A runner that reads pooled activations from a stored run instead of a model.

        ``fit_probes`` / ``evaluate`` then work as with the live model (same seed, splits and
        batches) on the datasets the run was collected from, or their ``tt_split`` parts (rows
        are matched by ``example_ids``).

        Args:
            run: A stored run: ``ActivationStore.open(path).run(name)``, or ``StoredRun.open(source)``.
            configs: Probe configurations; their (site, pooling) must be in the run.
            backend, device: As for :class:`ProbeRunner` (the device defaults to the CPU).
            baseline: Refused with a ``ValueError`` unless ``None`` (there are no weights to re-initialize).
        """
        configs, consumers = list(configs), list(consumers)
        run.check(requests=[(c.site, c.pool) for c in configs] + requests_of(consumers))
        return cls.from_source(StoreSource(run), configs, seed=seed, consumers=consumers, progress=progress,
                               backend=backend, device=device, baseline=baseline)

    @classmethod
    def from_source(cls, source: Source, configs: Iterable[ProbeConfig], *, seed: int = 0,
                    consumers: Iterable[Consumer] = (), progress: bool = True, backend: str = "sklearn",
                    device: str | torch.device | None = None, baseline: str | None = None) -> "ProbeRunner":
        """A runner that reads pooled activations from any :class:`~lm_probe.core.sources.Source`
        instead of a model (an ``ArraySource`` of rows pooled once, say; ``NoSource``: none);
        its sites are checked now. The arguments are as for :meth:`from_store`."""
        runner = cls.__new__(cls)
        runner.source = source
        runner._setup(None, configs, consumers, seed, progress, backend, torch.device(device or "cpu"), {}, baseline)
        runner._resolve(spec for c in runner.all_consumers for spec in c.site_specs())
        return runner

    # ------------------------------------------------------------------ results
    def evaluate(self, dataset: ProbeDataset, batch_size: int = 16, *, ci: float = 0.95,
                 n_boot: int = 1000) -> pd.DataFrame:
        """Score every probe on ``dataset`` (one trace per batch for all probes), each test
        metric with a percentile bootstrap interval at coverage ``ci`` over ``n_boot``
        resamples of the scored rows, seeded by the runner's seed (``n_boot=0``: none).

        Rows whose activations are non-finite are left out and counted
        (``n_nonfinite``); a probe that cannot be scored gets NaN metrics and the reason in
        ``score_error`` (with a warning), so one bad probe never costs the others' scores.

        Returns:
            DataFrame indexed by probe name with ``loss``, ``accuracy``, ``precision``, ``recall``,
            ``f1`` (macro), ``matthews``, ``auroc``, ``ece``, ``recall_at_fpr``
            (:mod:`lm_probe.functional.metrics`), ``<metric>_lo``/``<metric>_hi``, ``site``,
            ``pool``, ``layer``, ``n_steps``, ``stopped_early``, ``stop_reason``, ``n_scored``,
            ``n_nonfinite`` (rows of ``dataset`` left out), ``n_nonfinite_fit`` (training and
            validation rows left out), the solver that produced the weights (``solver``, ``C`` or
            ``alpha``, ``n_epochs``, ``converged``: :meth:`Probe.solver_summary`);
            ``control_accuracy`` and ``selectivity`` (with their intervals, the selectivity's
            paired) for probes with a control twin (:func:`~lm_probe.probes.scoring.metrics_table`).

        Raises:
            ValueError: ``ci`` not in (0, 1) or ``n_boot`` not a whole number >= 0 (before any forward).
        """
        check_intervals(ci, n_boot)
        acts = self.pooled(dataset, requests_of(self.probes.values()), batch_size, "test")  # checks batch_size
        return metrics_table(self.probes, acts, dataset, self.sites, self.control, ci=ci, n_boot=n_boot,
                             seed=self.seed)

    def _resolve(self, specs: Iterable[str]) -> None:
        """Check sites not seen yet against the source (before any forward pass)."""
        missing = [s for s in dict.fromkeys(specs) if s not in self.sites]
        if missing:
            self.sites.update(self.source.resolve(missing))
