"""A Lightning callback that watches a model's representations while it trains.

:class:`ProbeCallback` joins a ``lightning`` training run to lm_probe's consumers. When its
:class:`~lm_probe.core.trigger.Trigger` fires (every N optimizer steps, every N epochs, after
each validation, when a checkpoint is saved, at the start or the end of training), it:

1. puts the model in eval mode and pools one fixed, seeded probe subset of examples on the
   current weights, in one trace per batch for every site that anything below needs, with
   no gradient (each submodule's training mode is restored afterwards);
2. records each :class:`~lm_probe.DiffusionGauge` from those rows (its spectrum, and the
   diffusion operator kept for :meth:`ProbeCallback.get_trajectory`);
3. feeds each :class:`~lm_probe.Geometry` the same rows (reset first, so each measurement
   describes the weights of its step) into :attr:`ProbeCallback.geometry_metrics`;
4. fits the probes on a seeded train/test split of the subset and appends their test
   metrics to :attr:`ProbeCallback.probe_metrics`.

Steps 3 and 4 run a :class:`~lm_probe.ProbeRunner` over the pooled rows
(:class:`~lm_probe.core.sources.ArraySource`), so the model runs once per subset example per
measurement, whatever is measured. A step is measured at most once (a checkpoint saved at a
step already measured adds nothing). The measurements so far (firings, the gauges'
trajectories and operators, the metric tables) are saved in Lightning checkpoints
(:meth:`ProbeCallback.state_dict`, as tensors and plain python values that
``torch.load(weights_only=True)`` reads), so a run resumed with ``trainer.fit(...,
ckpt_path=...)`` continues them. The counters are the trigger's: ``step`` is
``trainer.global_step`` (optimizer steps completed) and ``epoch`` the epochs completed
(``trainer.current_epoch``; one more at the ``"epoch_end"`` event of the epoch just ended).

Lightning is an optional dependency: ``pip install "lm_probe[lightning]"``.
"""

from __future__ import annotations

from inspect import signature
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as err:  # pragma: no cover - exercised in a subprocess without lightning
    raise ImportError('lm_probe.integrations.lightning needs Lightning: pip install "lm_probe[lightning]"') from err

from ..consumers.gauge import N_SAMPLES, DiffusionGauge, probe_subset
from ..consumers.geometry import Geometry
from ..core.batching import check_batch_size
from ..core.dataset import ProbeDataset
from ..core.sites import Site, resolve_sites
from ..core.sources import ArraySource, TraceSource, read_dataset
from ..core.trigger import Trigger
from ..probes.checks import split_validation
from ..probes.config import ProbeConfig
from ..runner import ProbeRunner

__all__ = ["ProbeCallback"]


def _as_list(value: Any, kind: type, name: str) -> list:
    items = [value] if isinstance(value, kind) else list(value)
    bad = [type(v).__name__ for v in items if not isinstance(v, kind)]
    if bad:
        raise TypeError(f"{name} must be {kind.__name__} objects, got {bad}")
    return items


class ProbeCallback(Callback):
    """Measure gauges, geometry and probes on a fixed probe subset while Lightning trains.

    Args:
        probe_data: The examples the probe subset is drawn from (labelled, if probes are fitted).
        trigger: When to measure. ``Trigger(every_n_steps=N)``, ``every_n_epochs=N``,
            ``on_validation=True`` (after each validation, the sanity check excepted),
            ``on_checkpoint=True`` (each checkpoint save), ``at_start=True``, ``on_end=True``.
        gauges: Diffusion gauges; each is measured on the callback's subset, so its
            ``n_samples`` must equal the subset's size (its own trigger is not used).
        geometry: Geometry consumers (pooled: not ``pool="none"``).
        probes: Probe configurations, fitted anew at each measurement (pooled).
        n_samples: Examples in the probe subset (default: the gauges' ``n_samples``, else
            ``min(512, len(probe_data))``), drawn once with ``seed`` as a gauge draws them.
        seed: Seed of the subset, of the probes' train/test split and of their fit.
        model: Which module is measured: ``None``, the LightningModule's ``model`` attribute
            if it is a module, else the LightningModule itself; a dotted attribute path of the
            LightningModule (``"net.backbone"``); or a ``torch.nn.Module``.
        site: The gauge site whose operators make :attr:`trajectory` (default: the first
            gauge's first site).
        test_size: The probes' test share of the subset.
        batch_size: Examples per forward pass when pooling the subset.
        fit_kwargs: Passed to :meth:`ProbeRunner.fit_probes` (``num_epochs``, ``val_size``...;
            here ``n_boot`` defaults to 0: no bootstrap intervals at each measurement).

    Raises:
        ValueError: nothing to measure, ``n_samples`` against the gauges', ``pool="none"``, a
            subset the probes' test split or ``fit_probes``' validation split (``val_size``)
            cannot stratify (all before training); ``SiteError``: a
            site names no module of the measured model (at ``setup``, before any step).

    Attributes:
        firings: ``(step, event)`` of each measurement, in order.
        probe_metrics: The probes' test metrics, one row per (measurement, probe), with
            ``step``, ``epoch``, ``event`` and ``probe`` columns.
        geometry_metrics: Each Geometry's per-site metrics, one row per (measurement, site),
            with ``step``, ``epoch``, ``event`` and ``consumer`` (its index in ``geometry``).
    """

    def __init__(self, probe_data: ProbeDataset, *, trigger: Trigger, gauges: DiffusionGauge | Sequence[DiffusionGauge] = (),
                 geometry: Geometry | Sequence[Geometry] = (), probes: Sequence[ProbeConfig] = (),
                 n_samples: int | None = None, seed: int = 0, model: str | torch.nn.Module | None = None,
                 site: str | None = None, test_size: float = 0.25, batch_size: int = 16,
                 fit_kwargs: dict[str, Any] | None = None) -> None:
        if not isinstance(trigger, Trigger):
            raise TypeError(f"trigger must be a Trigger, e.g. Trigger(every_n_steps=100), got {trigger!r}")
        self.gauges = _as_list(gauges, DiffusionGauge, "gauges")
        self.geometry = _as_list(geometry, Geometry, "geometry")
        self.probes = _as_list(probes, ProbeConfig, "probes")
        if not (self.gauges or self.geometry or self.probes):
            raise ValueError("ProbeCallback has nothing to measure: give gauges=, geometry= or probes=")
        pooled_none = [c.site for c in self.probes if c.pool == "none"] + [
            s for g in self.geometry if g.pool == "none" for s in g.sites]
        if pooled_none:
            raise ValueError(f"pool='none' at {pooled_none}: the callback pools one row per example; "
                             "use pool='mean', 'last', 'first' or 'max'")
        self.trigger, self.seed, self.model = trigger, seed, model
        self.test_size, self.batch_size = test_size, check_batch_size(batch_size)
        self.fit_kwargs = dict(fit_kwargs or {})
        self.subset = probe_subset(probe_data, self._n_samples(probe_data, n_samples), seed)
        self._split = self.subset.tt_split(test_size, seed=seed) if self.probes else None  # fails early
        if self.probes:  # and so does the validation share fit_probes holds out of the training part
            val_size = self.fit_kwargs.get("val_size", signature(ProbeRunner.fit_probes).parameters["val_size"].default)
            split_validation(self._split[0], val_size, seed)
        self.site = site if site is not None else (self.gauges[0].sites[0] if self.gauges else None)
        if site is not None and not any(site in g.sites for g in self.gauges):
            raise ValueError(f"site {site!r} is no gauge's site; gauge sites: {[s for g in self.gauges for s in g.sites]}")
        self.firings: list[tuple[int, str]] = []
        self._probe_tables: list[pd.DataFrame] = []
        self._geometry_tables: list[pd.DataFrame] = []
        self._sites: dict[str, Site] | None = None

    def _n_samples(self, data: ProbeDataset, n_samples: int | None) -> int:
        sizes = sorted({g.n_samples for g in self.gauges})
        if n_samples is None:
            if len(sizes) > 1:
                raise ValueError(f"the gauges' n_samples differ ({sizes}); they share one probe subset")
            n_samples = sizes[0] if sizes else min(N_SAMPLES, len(data))
        if sizes and sizes != [n_samples]:
            raise ValueError(f"n_samples={n_samples} but the gauges' n_samples are {sizes}; "
                             "every gauge is measured on the callback's one probe subset")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
            raise ValueError(f"n_samples must be an integer >= 2, got {n_samples!r}")
        return n_samples

    # ------------------------------------------------------------------ which module
    def module_of(self, pl_module: Any) -> torch.nn.Module:
        """The module measured (see ``model=``)."""
        if isinstance(self.model, torch.nn.Module):
            return self.model
        if self.model is None:
            inner = getattr(pl_module, "model", None)
            return inner if isinstance(inner, torch.nn.Module) else pl_module
        found = pl_module
        for part in self.model.split("."):
            if not hasattr(found, part):
                raise AttributeError(f"model={self.model!r}: {type(found).__name__} has no attribute {part!r}")
            found = getattr(found, part)
        if not isinstance(found, torch.nn.Module):
            raise TypeError(f"model={self.model!r} is a {type(found).__name__}, not a torch.nn.Module")
        return found

    def _requests(self) -> list[tuple[str, str]]:
        requests = [(s, g.pool) for g in self.gauges for s in g.sites]
        requests += [(s, g.pool) for g in self.geometry for s in g.sites]
        requests += [(c.site, c.pool) for c in self.probes]
        return list(dict.fromkeys(requests))

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check the sites against the measured module, before any training step."""
        self._sites = resolve_sites(self.module_of(pl_module), [s for s, _ in self._requests()])

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._event(trainer, pl_module, "start")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._event(trainer, pl_module, "step")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._event(trainer, pl_module, "epoch_end", epoch=trainer.current_epoch + 1)  # this epoch is complete

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._event(trainer, pl_module, "validation")

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._event(trainer, pl_module, "checkpoint")
        if self.state_key in checkpoint.get("callbacks", {}):  # taken before this hook: add its measurement
            checkpoint["callbacks"][self.state_key] = self.state_dict()

    # ------------------------------------------------------------------ checkpoints
    @property
    def state_key(self) -> str:
        """The callback's key in a checkpoint's ``callbacks`` (one per sites, seed and trigger)."""
        return self._generate_state_key(sites=[s for s, _ in self._requests()], seed=self.seed,
                                        trigger=repr(self.trigger))

    def state_dict(self) -> dict[str, Any]:
        """The measurements so far, as tensors and plain python values (what Lightning stores in
        a checkpoint and ``torch.load(weights_only=True)`` reads back): ``firings``, each
        gauge's :meth:`~lm_probe.DiffusionGauge.state_dict`, the probe and geometry tables."""
        return _encode({"firings": [list(f) for f in self.firings], "gauges": [g.state_dict() for g in self.gauges],
                        "probe_tables": [_columns(t) for t in self._probe_tables],
                        "geometry_tables": [_columns(t) for t in self._geometry_tables]})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (Lightning calls this when ``trainer.fit`` resumes from
        ``ckpt_path``): the resumed run continues the firings, trajectories and tables."""
        state = _decode(state_dict)
        if len(state["gauges"]) != len(self.gauges):
            raise ValueError(f"the checkpoint holds {len(state['gauges'])} gauges' measurements, this callback "
                             f"has {len(self.gauges)} gauges: resume with the callback configured as before")
        self.firings = [(int(step), str(event)) for step, event in state["firings"]]
        for gauge, saved in zip(self.gauges, state["gauges"]):
            gauge.load_state_dict(saved)
        self._probe_tables = [pd.DataFrame(t) for t in state["probe_tables"]]
        self._geometry_tables = [pd.DataFrame(t) for t in state["geometry_tables"]]

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._event(trainer, pl_module, "end")

    def _event(self, trainer: Any, pl_module: Any, event: str, epoch: int | None = None) -> None:
        step = int(trainer.global_step)
        epoch = int(trainer.current_epoch) if epoch is None else epoch
        if any(s == step for s, _ in self.firings) or not self.trigger.fires(step, epoch, event):
            return
        self.measure(pl_module, step, epoch=epoch, event=event)

    # ------------------------------------------------------------------ measuring
    def measure(self, pl_module: Any, step: int, *, epoch: int = 0, event: str = "manual") -> None:
        """Measure now, on the module's current weights, and record at ``step`` (the hooks call
        this when the trigger fires; call it yourself for a measurement outside them)."""
        module = self.module_of(pl_module)
        acts = self.pool(module)
        layers = {s: site.layer for s, site in self._sites.items()}
        for gauge in self.gauges:
            gauge.record({s: acts[(s, gauge.pool)] for s in gauge.sites}, step, epoch=epoch, event=event,
                         layers=layers)
        if self.geometry or self.probes:
            runner = ProbeRunner.from_source(ArraySource(acts, self.subset.example_ids, self._sites), self.probes,
                                             seed=self.seed, progress=False)
            stamp = {"step": step, "epoch": epoch, "event": event}
            self._run_geometry(runner, stamp)
            self._fit_probes(runner, stamp)
        self.firings.append((step, event))

    def pool(self, module: torch.nn.Module) -> dict[tuple[str, str], np.ndarray]:
        """The probe subset's pooled rows on ``module``'s current weights, one trace per batch
        for all requests, in eval mode with no gradient (each submodule's training mode is
        restored afterwards).

        Returns:
            ``{(site, pool): (n_samples, hidden) float32 array}`` in subset order.
        """
        from nnsight import NNsight

        if self._sites is None:
            self._sites = resolve_sites(module, [s for s, _ in self._requests()])
        modes = [(m, m.training) for m in module.modules()]  # a frozen block may stay in eval mode
        module.eval()
        try:
            with torch.no_grad():
                source = TraceSource(NNsight(module), self._sites)
                return read_dataset(source, self.subset, self._requests(), self.batch_size, progress=False,
                                    desc="probe subset")
        finally:
            for m, training in modes:
                m.training = training

    def _run_geometry(self, runner: ProbeRunner, stamp: dict[str, Any]) -> None:
        if not self.geometry:
            return
        for geometry in self.geometry:
            geometry.reset()  # each measurement describes the weights of its step alone
        runner.collect(self.subset, consumers=self.geometry, batch_size=self.batch_size)
        for index, geometry in enumerate(self.geometry):
            table = geometry.metrics.reset_index()
            self._geometry_tables.append(table.assign(**stamp, consumer=index))

    def _fit_probes(self, runner: ProbeRunner, stamp: dict[str, Any]) -> None:
        if not self.probes:
            return
        train, test = self._split
        settings = {"batch_size": self.batch_size, "n_boot": 0, **self.fit_kwargs}
        runner.fit_probes(train, test, **settings)
        table = runner.metrics.rename_axis("probe").reset_index()
        self._probe_tables.append(table.assign(**stamp))

    # ------------------------------------------------------------------ results
    @property
    def probe_metrics(self) -> pd.DataFrame:
        """The probes' test metrics per measurement (empty before the first)."""
        return _stacked(self._probe_tables)

    @property
    def geometry_metrics(self) -> pd.DataFrame:
        """The geometry metrics per measurement and site (empty before the first)."""
        return _stacked(self._geometry_tables)

    def get_trajectory(self, site: str | None = None) -> list[tuple[int, np.ndarray]]:
        """``(step, operator)`` for each measurement of a gauge site, in order.

        Args:
            site: A gauge site (default: ``site=`` given at construction, else the first
                gauge's first site).

        Returns:
            ``[(step, (n_samples, n_samples) float64 ndarray)]``: the diffusion operator
            (the gauge's ``normalization``: Markov P or symmetric A), dense.
        """
        site = self.site if site is None else site
        gauge = next((g for g in self.gauges if site in g.sites), None)
        if gauge is None:
            raise ValueError(f"no gauge measures site {site!r}; the trajectory needs gauges=[DiffusionGauge(...)]")
        measured = {s for s, _ in self.firings}
        return [(step, _dense(op)) for step, s, op in gauge.get_trajectory() if s == site and step in measured]

    @property
    def trajectory(self) -> list[tuple[int, np.ndarray]]:
        """:meth:`get_trajectory` of the default site."""
        return self.get_trajectory()


def _dense(operator: Any) -> np.ndarray:
    if operator is None:
        raise ValueError("the gauge keeps no operators (keep_operators=False)")
    return np.asarray(operator.toarray() if hasattr(operator, "toarray") else operator, np.float64)


def _stacked(tables: list[pd.DataFrame]) -> pd.DataFrame:
    if not tables:
        return pd.DataFrame()
    stamped = ["step", "epoch", "event"]
    table = pd.concat(tables, ignore_index=True)
    return table[stamped + [c for c in table.columns if c not in stamped]]


def _columns(table: pd.DataFrame) -> dict[str, list]:
    return {str(c): table[c].tolist() for c in table.columns}


def _encode(value: Any) -> Any:
    """numpy arrays to tensors and numpy scalars to python values, through dicts, lists, tuples."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_encode(v) for v in value)
    return value


def _decode(value: Any) -> Any:
    """The inverse of :func:`_encode`: tensors back to numpy arrays."""
    if isinstance(value, torch.Tensor):
        return value.cpu().numpy()
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_decode(v) for v in value)
    return value
