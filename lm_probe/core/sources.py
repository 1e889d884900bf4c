"""Where a pass's pooled activations come from: one small interface, chosen once.

The runner's loop asks its source for the pooled activations of each batch and never
asks which source it is:

* :class:`TraceSource`: one nnsight trace of the live model per batch (the only place
  the model runs; see :mod:`lm_probe.core.trace`);
* :class:`StoreSource`: the rows of a stored run (:mod:`lm_probe.consumers.store_run`), matched by
  example id;
* :class:`ArraySource`: pooled rows held in memory, matched by example id (rows pooled
  once, e.g. with ``runner.pooled``, then probed with several label sets);
* :class:`~lm_probe.core.replay.ReplayCache`: the rows pooled in the first epoch of
  ``fit_probes``, replayed to the probes in the later epochs.

A source says whether reading the same batch again is free (``replayable``): the runner
caches a first epoch only when it is not. :func:`read_dataset` reads a whole dataset from
any source, one read per batch for all requests, rows back in dataset order.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from .batching import Batch, check_batch_size
from .consumer import HostArrays, Request
from .dataset import ProbeDataset
from .sites import Site, resolve_sites
from .trace import read_pooled

__all__ = ["Source", "TraceSource", "StoreSource", "ArraySource", "NoSource", "read_dataset"]


class Source(Protocol):
    """What the runner reads pooled activations from."""

    #: Whether reading a batch again costs no forward pass.
    replayable: bool

    def read(self, batch: Batch, data: ProbeDataset, requests: Sequence[Request]) -> Mapping[Request, Any]:
        """``{(site, pool): (rows, hidden)}`` for one batch of ``data``."""
        ...

    def resolve(self, specs: Iterable[str]) -> dict[str, Site]:
        """Check site strings (before any forward pass) and return their sites."""
        ...


class TraceSource:
    """One trace of the live model per batch.

    Args:
        model: The nnsight model.
        sites: The runner's resolved sites (read as the runner adds to them).
        to_cpu: Bring pooled tensors to the host inside the trace (``False`` leaves them on
            the model's device, for the torch probe backend).
        trace_kwargs: Passed to every ``model.trace`` (``remote=...``).
    """

    replayable = False

    def __init__(self, model: Any, sites: dict[str, Site], *, to_cpu: bool = True,
                 trace_kwargs: dict[str, Any] | None = None) -> None:
        self.model, self.sites, self.to_cpu = model, sites, to_cpu
        self.trace_kwargs = dict(trace_kwargs or {})

    def read(self, batch: Batch, data: ProbeDataset, requests: Sequence[Request]) -> HostArrays:
        return HostArrays(read_pooled(self.model, self.sites, requests, batch.input_ids, batch.attention_mask,
                                      to_cpu=self.to_cpu, **self.trace_kwargs))

    def resolve(self, specs: Iterable[str]) -> dict[str, Site]:
        return resolve_sites(self.model._module, list(specs))


class StoreSource:
    """Rows of a stored run, matched by ``example_ids`` (no model). Each batch's token ids are
    checked against the run's (a pooled run's per-example token count and hash, a token run's
    token ids): a dataset other than the one collected is refused, though its ids match."""

    replayable = True

    def __init__(self, run: Any) -> None:
        self.run = run

    def read(self, batch: Batch, data: ProbeDataset, requests: Sequence[Request]) -> dict[Request, np.ndarray]:
        rows = self.run.read(data.example_ids[batch.index], requests, tokens=[data.ids[i] for i in batch.index])
        tokens = int(batch.attention_mask.sum())
        for (spec, how), value in rows.items():
            if how == "none" and len(value) != tokens:
                raise ValueError(f"run {self.run.name!r} holds {len(value)} token rows of {spec!r} for a batch with "
                                 f"{tokens} real tokens: the data is not tokenized as the collected data was")
        return rows

    def resolve(self, specs: Iterable[str]) -> dict[str, Site]:
        specs = list(specs)
        self.run.check(sites=specs)
        return self.run.sites_for(specs)


class ArraySource:
    """Pooled rows in memory, one per example, matched by ``example_ids``.

    Args:
        rows: ``{(site spec, pool): (n, hidden) array}``; row ``i`` belongs to ``example_ids[i]``.
        example_ids: ``(n,)`` distinct ids (``ProbeDataset.example_ids`` of the pooled data).
        sites: ``{spec: Site}`` for the specs in ``rows`` (e.g. the live runner's ``sites``).
    """

    replayable = True

    def __init__(self, rows: Mapping[Request, Any], example_ids: Any, sites: Mapping[str, Site]) -> None:
        self.rows = {key: np.asarray(value) for key, value in rows.items()}
        if any(how == "none" for _, how in self.rows):
            raise ValueError("ArraySource holds one row per example; token rows (pool='none') are not supported")
        ids = np.asarray(example_ids, np.int64)
        if any(len(v) != len(ids) for v in self.rows.values()):
            raise ValueError(f"every array needs one row per example id ({len(ids)})")
        self._row_of = {int(e): i for i, e in enumerate(ids)}
        self.sites = dict(sites)

    def read(self, batch: Batch, data: ProbeDataset, requests: Sequence[Request]) -> dict[Request, np.ndarray]:
        try:
            rows = np.array([self._row_of[int(i)] for i in data.example_ids[batch.index]], np.int64)
        except KeyError as err:
            raise KeyError(f"example id {err.args[0]} has no pooled row in this ArraySource") from None
        missing = [r for r in requests if r not in self.rows]
        if missing:
            raise KeyError(f"no pooled rows for {missing}; the source holds {sorted(self.rows)}")
        return {r: self.rows[r][rows] for r in requests}

    def resolve(self, specs: Iterable[str]) -> dict[str, Site]:
        specs = list(specs)
        unknown = [s for s in specs if s not in self.sites]
        if unknown:
            raise ValueError(f"sites {unknown} are not in this ArraySource; it has {sorted(self.sites)}")
        return {s: self.sites[s] for s in specs}


class NoSource:
    """The source of a runner without a model or store: reading is an error that says why."""

    replayable = True

    def read(self, batch: Any, data: ProbeDataset, requests: Sequence[Request]) -> Mapping[Request, np.ndarray]:
        raise RuntimeError("this runner has no model to trace: load it with ProbeRunner.load(path, model=...), "
                           "or predict from features with runner[name].predict(X)")

    def resolve(self, specs: Iterable[str]) -> dict[str, Site]:
        return {}


def read_dataset(source: Source, dataset: ProbeDataset, requests: Sequence[Request], batch_size: int = 16, *,
                 progress: bool = True, desc: str = "pooling") -> dict[Request, np.ndarray]:
    """Pooled activations of a whole dataset from ``source``, one read per batch for all requests.

    Args:
        source: Where the rows come from; the requests' sites must be resolved for it.
        dataset: Examples, in order.
        requests: ``(site, pooling)`` pairs (a repeated pair is read once).
        batch_size: Examples per read (per forward pass, for a trace).
        progress: Show a progress bar over batches.
        desc: The progress bar's label.

    Returns:
        ``{(site, pooling): (n, hidden) float32 array}`` in dataset order; for
        ``pool="none"`` the rows are every real token, example by example.
    """
    batch_size = check_batch_size(batch_size)
    requests = list(dict.fromkeys(requests))
    rows: dict[Request, list] = {key: [None] * len(dataset) for key in requests}
    batches = dataset.batches(batch_size, by_length=True)  # least padding; rows put back in order
    for batch in tqdm(batches, total=-(-len(dataset) // batch_size), desc=desc, disable=not progress, leave=False):
        n_tokens = batch.attention_mask.sum(1).numpy()
        for (spec, how), value in source.read(batch, dataset, requests).items():
            parts = np.split(value, np.cumsum(n_tokens)[:-1]) if how == "none" else value[:, None]
            for i, part in zip(batch.index, parts):
                rows[(spec, how)][i] = part
    return {key: np.concatenate(parts) for key, parts in rows.items()}
