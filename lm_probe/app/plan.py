"""Planning an experiment: everything that can be checked without a forward pass.

:func:`plan_experiment` turns a parsed :class:`~lm_probe.app.schema.Experiment` into a
:class:`Plan`: it loads the model (its weights, to check sites against its modules), reads
the data (:func:`lm_probe.app.tables.read_table`), expands site ranges and kinds and resolves
each site, expands the probe sweep, and builds each seed's subset, splits,
:class:`~lm_probe.ProbeRunner` (all probes of the seed on one runner, so one trace per
batch) and consumers. Every option is tried here: scikit-learn arguments are validated,
the gauge's operator options are run on random points of the model's width, and the
output folder is checked, last. Every problem found is reported together, in one
:class:`~lm_probe.app.problems.ExperimentError`; rows are tokenized only where a seed uses
them. ``lm-probe run --dry-run`` prints :meth:`Plan.describe` and stops;
:func:`lm_probe.app.outputs.run_plan` runs the plan.

The sites and the probe sweep (the cartesian product of the list-valued settings of
``[probes]``, for every site) are :mod:`lm_probe.app.sweep`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..consumers.gauge import DiffusionGauge
from ..consumers.geometry import Geometry
from ..core.dataset import ProbeDataset
from ..core.labels import format_labels
from ..core.replay import Cache
from ..core.trigger import Trigger
from ..runner import ProbeRunner
from .braces import expand_in
from .launch import rank_device
from .problems import ExperimentError, Problems
from .schema import Experiment, GaugesSection, GeometrySection, ProbesSection
from .sweep import ProbeSpec, check_estimator, expand_sites, probe_specs
from .tables import Table, class_counts, read_table

__all__ = ["Plan", "SeedRun", "plan_experiment", "replay_cache", "RUN_FILES"]

#: The files a run writes in its folder (an existing one means the folder holds a run).
RUN_FILES = ("metrics.csv", "baselines.csv", "run.json", "report.html", "config.json", "experiment.toml")


@dataclass
class SeedRun:
    """Everything one seed runs: its splits, runner (with its probes) and consumers."""

    seed: int
    out: Path
    examples: ProbeDataset
    train: ProbeDataset
    test: ProbeDataset
    n_fit: int
    runner: ProbeRunner
    geometry: Geometry | None
    gauge: DiffusionGauge | None


@dataclass
class Plan:
    """A checked, ready-to-run experiment: nothing left to validate, no forward pass run yet."""

    experiment: Experiment
    model: Any
    table: Table
    sites: list[str]
    probes: list[ProbeSpec]
    runs: list[SeedRun]
    overwrite: bool = False

    def describe(self) -> str:
        """What would run, for ``--dry-run`` and the log."""
        exp, first = self.experiment, self.runs[0]
        config = self.model._module.config
        counts = class_counts(first.examples, self.table.label_names, exp.probes.task)
        classes = ", ".join(f"{k}: {v}" for k, v in counts.items())
        lines = [
            f"experiment: {exp.name}" + (f" ({exp.source})" if exp.source else ""),
            f"model:      {exp.model.name} ({type(self.model._module).__name__}, "
            f"{getattr(config, 'num_hidden_layers', '?')} layers, hidden size {getattr(config, 'hidden_size', '?')})",
            f"data:       {self.table.description}; using {len(first.examples)}"
            + (f" (classes {classes})" if classes else "") + f"; train {len(first.train)} "
            f"({first.n_fit} fit, {len(first.train) - first.n_fit} validation), test {len(first.test)}; "
            f"max_length {exp.data.max_length}, batch_size {exp.data.batch_size}",
            f"sites:      {len(self.sites)}: {_short_list(self.sites)}",
        ]
        lines += self._probe_lines()
        if first.geometry is not None:
            g = first.geometry
            lines.append(f"geometry:   {len(g.sites)} sites, pool {g.pool!r}, sample_limit {g.sample_limit}")
        if first.gauge is not None:
            g = first.gauge
            lines.append(f"gauges:     {len(g.sites)} sites, {g.n_samples} examples, "
                         + ", ".join(f"{k} {v}" for k, v in g.operator_kwargs.items()))
        lines.append(f"seeds:      {list(exp.seeds)}")
        lines.append(f"output:     {exp.out}" + (" (existing run files will be replaced)" if self.overwrite else ""))
        return "\n".join(lines)

    def _probe_lines(self) -> list[str]:
        if not self.probes:
            return ["probes:     none ([probes] enabled = false): one pass over the examples"]
        swept: dict[str, list] = {}
        for spec in self.probes:
            for key, value in spec.variant.items():
                swept.setdefault(key, [])
                if value not in swept[key]:
                    swept[key].append(value)
        sweep = "".join(f" x {key} {values}" for key, values in swept.items())
        control = sum(p.config.control for p in self.probes)
        p = self.experiment.probes
        return [f"probes:     {len(self.probes)} = {len(self.sites)} sites{sweep}"
                + (f", {control} with a control twin" if control else "") + ", one trace per batch",
                *(f"  {spec.name}" for spec in self.probes),
                f"training:   num_epochs {p.num_epochs}, val_size {p.val_size}, eval_every {p.eval_every}, "
                f"patience {p.patience}, min_delta {p.min_delta}, max_steps {p.max_steps}, lr_decay {p.lr_decay}, "
                f"decay_patience {p.decay_patience}, backend {p.backend}",
                "            " + (f"each training example traced once, its pooled rows replayed to the probes "
                                  f"(cache budget {p.cache_budget_mib} MiB)" if p.cache else
                                  "cache = false: every epoch traced again"),
                *(["baseline:   random_init: every probe also trained on a copy of the model with re-initialized "
                   "weights, same batches (one extra forward per example)"] if p.baseline == "random_init" else [])]


def plan_experiment(experiment: Experiment, *, model: Any = None, progress: bool = True,
                    overwrite: bool = False) -> Plan:
    """Check everything and build every seed's runner, without any forward pass.

    Every check runs, and every problem found is reported in one :class:`ExperimentError`
    (with those an experiment read with ``strict=False`` carries already); a check that
    needs what a failed one would have given (the sites need the model) is skipped. The
    output folder is checked last.

    Args:
        experiment: From :func:`lm_probe.app.experiment.load_experiment`.
        model: An nnsight model to use instead of loading ``[model] name`` (tests, notebooks).
        progress: Show progress bars when the plan runs.
        overwrite: Allow an output folder that already holds a run.

    Returns:
        The :class:`Plan`; :func:`lm_probe.app.outputs.run_plan` runs it.

    Raises:
        ExperimentError: every problem found: the file's, the data's (columns, labels,
            splits), the model's (it does not load, a site is unknown), a probe or consumer
            option, and an output folder that already holds a run.
    """
    exp, problems = experiment, Problems()
    problems.add(*exp.problems)

    def usable(table: str) -> bool:
        return table not in exp.invalid and (table == "" or getattr(exp, table) is not None)

    table = sites = probes = runs = None
    with problems.collect():  # the data first: it is quicker to read than a model
        if usable("data"):
            table = read_table(exp.data, exp.base, exp.probes.task if exp.probes is not None else "classification")
    with problems.collect():
        if model is None and usable("model"):
            model = _load_model(exp)
    with problems.collect():
        if model is not None and usable("sites"):
            sites = expand_sites(exp.sites, model)
    with problems.collect():
        if sites is not None and usable("probes"):
            probes = probe_specs(exp.probes, sites) if exp.probes.enabled else []
            for spec in probes:
                check_estimator(spec)
    with problems.collect():
        if usable("probes"):
            replay_cache(exp.probes, exp.base)
    if all(x is not None for x in (table, model, sites, probes)) and not exp.invalid:  # each seed needs them all
        with problems.collect():
            runs = _seed_runs(exp, table, model, sites, probes, progress, problems)
    if usable(""):  # last: a folder that holds a run is the easiest problem to fix
        for folder in [exp.out, *(exp.out / f"seed_{s}" for s in exp.seeds if len(exp.seeds) > 1)]:
            with problems.collect():
                _check_out(folder, overwrite)
    problems.raise_any(exp.source)
    return Plan(exp, model, table, sites, probes, runs, overwrite)


def _seed_runs(exp: Experiment, table: Table, model: Any, sites: list[str], probes: list[ProbeSpec],
               progress: bool, problems: Problems) -> list[SeedRun]:
    """Every seed's run, from one tokenization of the rows the seeds use (so that the warning
    about texts longer than max_length counts those rows, not the whole data set)."""
    n = len(table.texts)
    if exp.data.n_examples > n:
        raise ExperimentError(f"[data] n_examples = {exp.data.n_examples} but the data has {n} rows; lower it, "
                              "or use 0 for all rows")
    index = {seed: np.arange(n) if exp.data.n_examples in (0, n) else np.sort(
        np.random.default_rng(seed).permutation(n)[:exp.data.n_examples]) for seed in exp.seeds}
    used = np.unique(np.concatenate(list(index.values())))
    try:
        tokenized = ProbeDataset.from_texts([table.texts[i] for i in used], table.labels[used], model.tokenizer,
                                            max_length=exp.data.max_length, label_names=table.label_names)
    except ValueError as err:
        raise ExperimentError(f"[data] {err}") from None
    dataset = ProbeDataset(tokenized.ids, tokenized.labels, pad_token_id=tokenized.pad_token_id,
                           padding_side=tokenized.padding_side, texts=tokenized.texts,
                           label_names=tokenized.label_names, example_ids=used)  # ids: the table's rows
    runs = []
    for seed in exp.seeds:
        with problems.collect():
            examples = dataset.subset(np.searchsorted(used, index[seed]))
            runs.append(_seed_run(exp, model, examples, sites, probes, seed, progress))
    return runs


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"the output folder {out} is a file; choose another out")
    held = [f for f in RUN_FILES if (out / f).exists()] if out.is_dir() else []
    if held and not overwrite:
        raise ExperimentError(f"the output folder {out} already holds a run ({', '.join(held)}); pass --overwrite "
                              "to replace it, or choose another out (--out DIR)")


def _load_model(exp: Experiment) -> Any:
    import torch

    from ..core.embedded import EMBEDDED_MODELS
    from ..core.model import ModelNotFoundError, load_model

    name = exp.model.name
    folder = exp.base / name
    source = str(folder) if name not in EMBEDDED_MODELS and folder.exists() else name
    kwargs: dict[str, Any] = {}
    if exp.model.dtype:
        kwargs["dtype"] = getattr(torch, exp.model.dtype)
    device = rank_device(exp.model.device)  # under torchrun with CUDA: this rank's GPU
    if device:
        kwargs["device_map"] = device
    if name in EMBEDDED_MODELS:
        tried = "the embedded model"
    elif folder.exists():
        tried = f"the folder {folder}"
    else:
        tried = (f"a Hugging Face hub id (it is not an embedded model ({', '.join(EMBEDDED_MODELS)}) nor a folder "
                 f"{folder})")
    try:
        return load_model(source, **kwargs)
    except ModelNotFoundError as err:  # its message says what would work
        raise ExperimentError(f"[model] name = {name!r}: {err} (relative folders start at {exp.base})") from None
    except Exception as err:  # noqa: BLE001 (hub, file and format errors all mean: this name does not load)
        reason = " ".join(str(err).split())[:300]
        raise ExperimentError(f"[model] name = {name!r} did not load as {tried}: {reason}") from None


def replay_cache(section: ProbesSection, base: Path | None = None) -> Cache | None:
    """The ``[probes]`` cache settings as fit_probes takes them (``None``: trace every epoch)."""
    if not section.cache:
        return None
    folder = section.cache_dir and Path(section.cache_dir)
    if folder and not folder.is_absolute() and base is not None:
        folder = base / folder
    try:
        return Cache(memory_budget=section.cache_budget_mib * 2**20, spill_dir=folder or None)
    except ValueError as err:
        raise ExperimentError(f"[probes] cache_dir: {err}") from None


def _seed_run(exp: Experiment, model: Any, examples: ProbeDataset, sites: list[str], probes: list[ProbeSpec],
              seed: int, progress: bool) -> SeedRun:
    """One seed's splits, runner and consumers from its examples (every option checked here)."""
    try:
        train, test = examples.tt_split(exp.data.test_size, seed=seed)
        fit = train.tt_split(exp.probes.val_size, seed=seed)[0] if probes and exp.probes.val_size else train
    except ValueError as err:
        raise ExperimentError(f"[data] {err}") from None
    if probes and not exp.probes.task == "regression" and len(train.classes) < 2:
        single = format_labels(train.classes, train.label_names)
        raise ExperimentError(f"[data] the training set has a single class {single}; a probe needs at least two")
    problems, geometry, gauge = Problems(), None, None
    with problems.collect():
        geometry = _geometry(exp.geometry, sites, seed) if exp.geometry else None
    with problems.collect():
        gauge = _gauge(exp.gauges, sites, seed, fit if probes else examples, model) if exp.gauges else None
    problems.raise_any()
    consumers = [c for c in (geometry, gauge) if c is not None]
    if not probes and not consumers:
        raise ExperimentError("nothing to run: [probes] enabled = false and no [geometry] or [gauges] table")
    try:
        runner = ProbeRunner(model, [p.config for p in probes], consumers=consumers, seed=seed, progress=progress,
                             backend=exp.probes.backend,
                             baseline=None if exp.probes.baseline == "none" else exp.probes.baseline)
    except ValueError as err:
        raise ExperimentError(str(err)) from None
    out = exp.out if len(exp.seeds) == 1 else exp.out / f"seed_{seed}"
    return SeedRun(seed, out, examples, train, test, len(fit), runner, geometry, gauge)


def _consumer_sites(section: Any, sites: list[str], table: str) -> list[str]:
    if section.sites is None:
        return list(sites)
    return [s for p in section.sites for s in expand_in(p, f"[{table}] sites")]


def _geometry(section: GeometrySection, sites: list[str], seed: int) -> Geometry:
    try:
        return Geometry(_consumer_sites(section, sites, "geometry"), pool=section.pool,
                        sample_limit=section.sample_limit, novelty_k=section.novelty_k, seed=seed,
                        sketch_rank=section.sketch_rank)
    except ValueError as err:
        raise ExperimentError(f"[geometry] {err}") from None


def _gauge(section: GaugesSection, sites: list[str], seed: int, data: ProbeDataset, model: Any) -> DiffusionGauge:
    """The gauge, with its operator options tried on random points of the model's width (no forward)."""
    from ..functional.diffusion import diffuse

    options = dict(knn=section.knn, alpha=section.alpha, normalization=section.normalization,
                   n_eigs=section.n_eigs, bandwidth=section.bandwidth, sparse=section.sparse,
                   self_loops=section.self_loops, n_pca=section.n_pca, t=section.t)
    try:
        gauge = DiffusionGauge(_consumer_sites(section, sites, "gauges"), n_samples=section.n_samples, seed=seed,
                               pool=section.pool, trigger=Trigger(on_end=True), keep_operators=False, **options)
        if section.n_samples > len(data):
            raise ValueError(f"n_samples = {section.n_samples} but the gauge draws from {len(data)} examples (the "
                             "training examples the probes fit on, or all examples without probes); lower n_samples")
        hidden = int(getattr(model._module.config, "hidden_size", 8))
        n_try = min(section.n_samples, max(64, section.knn + 1, section.n_pca or 0))  # small, yet every check applies
        diffuse(np.random.default_rng(0).normal(size=(n_try, hidden)), **options)
    except ValueError as err:
        raise ExperimentError(f"[gauges] {err}") from None
    return gauge


def _short_list(items: list[str], head: int = 3) -> str:
    return ", ".join(items) if len(items) <= 2 * head else \
        ", ".join(items[:head]) + f", ... ({len(items) - 2 * head} more), " + ", ".join(items[-head:])
