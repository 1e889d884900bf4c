"""Diffusion gauges: the spectrum of a diffusion operator on a fixed probe subset.

A gauge turns the pooled activations ``X (n_samples, hidden)`` of a fixed, seeded subset
of examples into a k-NN graph, a kernel, and a diffusion operator (see
:mod:`lm_probe.functional.diffusion`), and records its top eigenvalues, spectral gap and entropy
whenever its :class:`~lm_probe.core.trigger.Trigger` fires. The same examples are used for
every site and every step, so rows of :attr:`DiffusionGauge.trajectory` compare across
layers (a frozen model) and across training steps (a model being trained).

* Inside ``fit_probes`` / ``collect`` the model is frozen. The gauge reads nothing on
  training batches (so it never keeps the forward deeper); it declares its subset as a
  :class:`~lm_probe.core.consumer.SubsetRequest` whenever its trigger fires
  (:meth:`DiffusionGauge.subset_due`), and the runner pools it, once per pass in one
  trace per batch for all sites, and hands the rows in
  (:meth:`DiffusionGauge.observe`). The operators are built at the first firing of a
  pass; later firings record them again.
* For a model being trained, :meth:`DiffusionGauge.measure` pools the subset on the
  model's current weights (``lm_probe.integrations.GaugeCallback`` calls it from a
  ``transformers.Trainer``). Under data parallelism (an initialized process group of K ranks,
  every rank calling ``measure``) each rank traces its share of each batch of K x
  ``batch_size`` subset examples and the rows are gathered
  (:mod:`lm_probe.core.distributed`), as one process with ``batch_size`` K times larger.

Custom gauges add trajectory columns by overriding :meth:`DiffusionGauge.extra_metrics`
or passing ``extra_metrics=fn`` (``fn(result) -> dict``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from loguru import logger

from ..core.batching import check_batch_size
from ..core.consumer import Consumer, NotComputedError, Request, RunContext, SubsetRequest
from ..core.dataset import ProbeDataset
from ..core.distributed import data_parallel, world_size
from ..core.model import ensure_dispatched
from ..core.pooling import check_pool
from ..core.sites import resolve_sites
from ..core.sources import TraceSource, read_dataset
from ..core.trigger import Trigger

if TYPE_CHECKING:
    from ..functional.diffusion import DiffusionResult

__all__ = ["DiffusionGauge", "N_SAMPLES", "probe_subset"]

#: Examples in a gauge's probe subset unless told otherwise (the API's and the experiment file's default).
N_SAMPLES = 512


def probe_subset(data: ProbeDataset | None, n_samples: int, seed: int) -> ProbeDataset:
    """The fixed probe subset: ``n_samples`` examples of ``data`` drawn without replacement
    with ``seed``, in dataset order (the same examples for the same data, size and seed)."""
    if data is None:
        raise ValueError("the gauge has no data to draw its probe subset from: pass data=... "
                         "to DiffusionGauge or to measure()")
    if n_samples > len(data):
        raise ValueError(f"n_samples={n_samples} is larger than the {len(data)} examples available; "
                         f"lower n_samples or give more data")
    return data.subset(np.sort(np.random.default_rng(seed).choice(len(data), n_samples, replace=False)))


class DiffusionGauge(Consumer):
    """Diffusion-operator spectra of a fixed probe subset, per site, when a trigger fires.

    Args:
        sites: Site strings.
        n_samples: Examples in the probe subset (drawn once with ``seed``).
        seed: Seed of the subset.
        knn, alpha, normalization, n_eigs, bandwidth, sparse, self_loops, n_pca, t:
            The operator's definition (see :func:`lm_probe.functional.diffusion.diffuse`).
        trigger: When to measure (default: at the end of a pass).
        pool: Pooling of each example's activations.
        data: The examples to draw the subset from (default: the data of the pass
            the gauge first runs in).
        batch_size: Examples per forward pass when pooling the subset (in a runner's
            pass: the pass's batch size).
        keep_operators: Keep each operator for :meth:`operator` / :meth:`get_trajectory`.
        extra_metrics: ``fn(result: DiffusionResult) -> dict`` of extra columns.
        wandb_run: A Weights & Biases run (``wandb.init(...)``, optional extra
            ``pip install lm_probe[wandb]``): each measurement logs
            ``gauge/{site}/spectral_gap``, ``.../entropy`` and ``.../eig_{i}`` at its step.
    """

    def __init__(self, sites: Sequence[str], *, n_samples: int = N_SAMPLES, seed: int = 0, knn: int = 15,
                 alpha: float = 0.0, normalization: str = "markov", n_eigs: int = 32,
                 trigger: Trigger | None = None, pool: str = "mean", bandwidth: str | float = "adaptive",
                 sparse: bool = True, self_loops: bool = True, n_pca: int | None = None, t: int = 1,
                 data: ProbeDataset | None = None, batch_size: int = 16, keep_operators: bool = True,
                 extra_metrics: Callable[[DiffusionResult], dict] | None = None, wandb_run: Any = None) -> None:
        if isinstance(sites, str) or not sites:
            raise ValueError("sites must be a non-empty list of site strings")
        if n_samples < 2:
            raise ValueError(f"n_samples must be at least 2, got {n_samples}")
        batch_size = check_batch_size(batch_size)
        if not 1 <= knn < n_samples:
            raise ValueError(f"knn={knn} must be at least 1 and below n_samples={n_samples}")
        if check_pool(pool) == "none":
            raise ValueError("a gauge needs one row per example: use pool 'mean', 'last', 'first' or 'max'")
        self.sites, self.pool, self.n_samples, self.seed = list(sites), pool, n_samples, seed
        self.operator_kwargs = dict(knn=knn, alpha=alpha, normalization=normalization, n_eigs=n_eigs,
                                    bandwidth=bandwidth, sparse=sparse, self_loops=self_loops, n_pca=n_pca, t=t)
        self.trigger = trigger if trigger is not None else Trigger(on_end=True)
        self.data, self.batch_size, self.keep_operators = data, batch_size, keep_operators
        self._extra, self.wandb_run = extra_metrics, wandb_run
        self.requests: tuple[Request, ...] = ()  # nothing per batch: the subset is pooled on its own
        self.reset()

    # ------------------------------------------------------------------ protocol
    def reset(self) -> None:
        """Forget all measurements and the subset (drawn again, the same, at the next start)."""
        self._rows: list[dict[str, Any]] = []
        self._operators: dict[tuple[str, int], Any] = {}
        self._measured_steps: set[int] = set()
        self._request: SubsetRequest | None = None  # the subset of the pass under way
        self._layers: dict[str, int | None] = {}
        self._frozen: dict[str, DiffusionResult] | None = None
        self._subset: ProbeDataset | None = None

    def site_specs(self) -> list[str]:
        return list(self.sites)

    @property
    def active(self) -> bool:
        return False  # reads no training batch

    def update(self, batch: Any) -> None:
        """Unused: a gauge pools its own subset when it fires."""

    def start(self, context: RunContext) -> None:
        """Start a pass over a frozen model: choose the subset now (checks sizes, before any
        forward pass) and declare it for :meth:`subset_due`."""
        self._frozen = None
        if self._subset is None:
            self._subset = self._choose(self.data if self.data is not None else context.data)
        if context.batch_size is not None:
            self.batch_size = check_batch_size(context.batch_size)
        self._layers = {s: getattr(context.sites.get(s), "layer", None) for s in self.sites}
        self._request = SubsetRequest(self._subset, tuple((s, self.pool) for s in self.sites), self.batch_size)

    def subset_due(self, event: str, step: int, epoch: int) -> SubsetRequest | None:
        """The probe subset, when the trigger fires at a step not measured yet."""
        if self._request is None or step in self._measured_steps or not self.trigger.fires(step, epoch, event):
            return None
        return self._request

    def observe(self, acts: Any, event: str, step: int, epoch: int) -> None:
        """Record a measurement from the subset's pooled rows (the model is frozen during a
        pass: the operators are built at its first firing and recorded again after)."""
        if self._frozen is None:
            self._frozen = {s: self._diffuse(acts[(s, self.pool)], s) for s in self.sites}
        self._record(step, epoch, event, self._frozen, self._layers)

    def compute(self) -> pd.DataFrame:
        """The trajectory (see :attr:`trajectory`)."""
        if not self._rows:
            raise NotComputedError("the gauge has not measured yet: its trigger has not fired")
        return pd.DataFrame(self._rows)

    # ------------------------------------------------------------------ measuring a model in training
    def measure(self, model: Any, step: int, *, epoch: int = 0, event: str = "manual",
                data: ProbeDataset | None = None, distributed: bool | None = None) -> pd.DataFrame:
        """Measure on ``model``'s current weights (a model being trained) and record at ``step``.

        Args:
            model: A transformers model or an nnsight model.
            step: The training step to record.
            epoch: The epoch to record.
            event: A label for the trajectory.
            data: Examples to draw the subset from, the first time (default: ``data=``
                given at construction).
            distributed: After ``torch.distributed.init_process_group`` (``None``: detected;
                ``False``: alone), every rank must call ``measure`` with the same model, step
                and subset: each traces its share of every ``world x batch_size`` batch.

        Returns:
            The rows recorded for this step.

        Raises:
            DistributedMismatchError: the ranks' sites, subset or step differ (before any forward).
        """
        from nnsight import NNsight

        if self._subset is None:
            self._subset = self._choose(data if data is not None else self.data)
        wrapped = model if isinstance(model, NNsight) else NNsight(model)
        module = wrapped._module
        was_training = module.training
        module.eval()
        try:
            traced = ensure_dispatched(wrapped)
            sites = resolve_sites(traced._module, self.sites)
            requests = [(s, self.pool) for s in self.sites]
            setup = {"gauge sites": list(self.sites), "pool": self.pool, "step": step,
                     "subset": self._subset.example_ids.tolist()}
            source = data_parallel(TraceSource(traced, sites), distributed, setup)
            acts = read_dataset(source, self._subset, requests, self.batch_size * world_size(source),
                                progress=False, desc="gauge")
        finally:
            module.train(was_training)
        layers = {s: sites[s].layer for s in self.sites}
        return self.record({s: acts[(s, self.pool)] for s in self.sites}, step, epoch=epoch, event=event, layers=layers)

    def record(self, rows: dict[str, np.ndarray], step: int, *, epoch: int = 0, event: str = "manual",
               layers: dict[str, int | None] | None = None) -> pd.DataFrame:
        """Record a measurement from the probe subset's rows pooled elsewhere (a training-loop
        callback that pools them once for several consumers, say).

        Args:
            rows: ``{site: (n_samples, hidden) array}`` for every site of the gauge, pooled
                with the gauge's ``pool``.
            step, epoch, event: As for :meth:`measure`.
            layers: ``{site: layer index}`` for the trajectory's ``layer`` column.

        Returns:
            The rows recorded for this step.
        """
        missing = [s for s in self.sites if s not in rows]
        if missing:
            raise ValueError(f"no rows for the gauge's sites {missing}")
        wrong = {s: len(rows[s]) for s in self.sites if len(rows[s]) != self.n_samples}
        if wrong:
            raise ValueError(f"the gauge's n_samples is {self.n_samples}, got rows per site {wrong}")
        results = {s: self._diffuse(rows[s], s) for s in self.sites}
        start = len(self._rows)
        self._record(step, epoch, event, results, layers or {})
        return pd.DataFrame(self._rows[start:])

    def maybe_measure(self, model: Any, event: str, step: int, epoch: int) -> bool:
        """Measure if the trigger fires for this event and the step was not measured yet."""
        if step in self._measured_steps or not self.trigger.fires(step, epoch, event):
            return False
        self.measure(model, step, epoch=epoch, event=event)
        return True

    # ------------------------------------------------------------------ results
    @property
    def trajectory(self) -> pd.DataFrame:
        """One row per (measurement, site): ``step``, ``epoch``, ``event``, ``site``, ``layer``,
        ``n_samples``, ``spectral_gap``, ``entropy``, ``eigenvalues`` (top n_eigs), extra columns."""
        return self.compute()

    def operator(self, site: str, step: int) -> Any:
        """The operator measured at ``site`` and ``step`` (sparse where the graph is)."""
        key = (site, step)
        if key not in self._operators:
            known = sorted({s for _, s in self._operators})
            raise KeyError(f"no operator for site {site!r} at step {step}; measured steps: {known}"
                           + ("" if self.keep_operators else " (keep_operators=False)"))
        return self._operators[key]

    def get_trajectory(self) -> list[tuple[int, str, Any]]:
        """``(step, site, operator)`` in measurement order."""
        return [(row["step"], row["site"], self._operators.get((row["site"], row["step"]))) for row in self._rows]

    def state_dict(self) -> dict[str, Any]:
        """The measurements as plain data (numpy arrays, python values) for a checkpoint:
        ``rows`` (the trajectory's), ``operators`` (``[site, step, operator]``; a sparse one as
        ``{"csr": (data, indices, indptr), "shape": ...}``), ``measured_steps``."""
        def plain(op: Any) -> Any:
            if hasattr(op, "tocsr"):
                op = op.tocsr()
                return {"csr": (op.data, op.indices, op.indptr), "shape": tuple(op.shape)}
            return op if op is None else np.asarray(op)

        return {"rows": [dict(r) for r in self._rows], "measured_steps": sorted(self._measured_steps),
                "operators": [[site, step, plain(op)] for (site, step), op in self._operators.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the measurements of :meth:`state_dict` (the subset is drawn again, the same)."""
        from scipy.sparse import csr_matrix

        self._rows = [dict(r) for r in state["rows"]]
        self._measured_steps = {int(s) for s in state["measured_steps"]}
        self._operators = {(site, int(step)): csr_matrix(tuple(op["csr"]), shape=tuple(op["shape"]))
                           if isinstance(op, dict) else op for site, step, op in state["operators"]}

    def extra_metrics(self, result: DiffusionResult) -> dict[str, Any]:
        """Extra trajectory columns for one site's result; override in a subclass."""
        return self._extra(result) if self._extra is not None else {}

    # ------------------------------------------------------------------ internals
    def _choose(self, data: ProbeDataset | None) -> ProbeDataset:
        return probe_subset(data, self.n_samples, self.seed)

    def _diffuse(self, X: np.ndarray, site: str) -> DiffusionResult:
        bad = ~np.isfinite(X).all(1)
        if bad.any():
            raise ValueError(f"gauge: {int(bad.sum())} of {len(X)} probe-subset rows at site {site!r} have "
                             "non-finite activations; a diffusion operator needs finite points")
        from ..functional.diffusion import diffuse  # scipy and scikit-learn's neighbours: at the first measurement

        return diffuse(np.asarray(X, np.float64), **self.operator_kwargs)

    def _record(self, step: int, epoch: int, event: str, results: dict[str, DiffusionResult],
                layers: dict[str, int | None]) -> None:
        self._measured_steps.add(step)
        for s in self.sites:
            result = results[s]
            self._rows.append({
                "step": step, "epoch": epoch, "event": event, "site": s,
                "layer": layers.get(s), "n_samples": self.n_samples,
                "spectral_gap": result.spectral_gap, "entropy": result.entropy,
                "eigenvalues": np.asarray(result.eigenvalues), **self.extra_metrics(result),
            })
            if self.keep_operators:
                self._operators[(s, step)] = result.operator
        if self.wandb_run is not None:
            self.wandb_run.log(self._wandb_payload(results), step=step)
        logger.trace("gauge measured {} sites at step {} ({})", len(self.sites), step, event)

    def _wandb_payload(self, results: dict[str, DiffusionResult]) -> dict[str, float]:
        """Eigenvalues (from the symmetric solver), gap and entropy per site, as flat scalars."""
        payload: dict[str, float] = {}
        for s, result in results.items():
            payload[f"gauge/{s}/spectral_gap"] = float(result.spectral_gap)
            payload[f"gauge/{s}/entropy"] = float(result.entropy)
            payload.update({f"gauge/{s}/eig_{i}": float(v) for i, v in enumerate(result.eigenvalues)})
        return payload
