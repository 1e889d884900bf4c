"""What every stored run answers, whichever files hold it: rows by example id, checks.

A run holds rows of pooled activations, one per example (``pool="mean"`` and the others)
or one per real token (``pool="none"``, an example's tokens in consecutive rows), each with
its ``example_id``. :class:`RunRows` matches examples to rows (:meth:`RunRows.read`, what
:class:`~lm_probe.core.sources.StoreSource` calls) and checks that a run suits a model, sites
and poolings. The Arrow run (:mod:`.store_run`) and the old chunked ``.npy`` run
(:mod:`.store_legacy`) fill in the metadata and the arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..core.consumer import Request
from ..core.sites import Site
from .store_shards import ChunkedArray

__all__ = ["RunRows"]


class RunRows:
    """Rows of a run matched by example id; subclasses set the attributes below.

    Attributes:
        path: The run's folder (``None`` for a run opened from the hub).
        metadata: Model, sites (``spec``, ``name``, ``layer``), pooling, tags, time...
        bad_shards: Files left out (truncated or corrupted), with the reason.
    """

    path: Path | None
    metadata: dict[str, Any]
    bad_shards: dict[str, str]
    _arrays: list[ChunkedArray]  # one per site, in the metadata's order
    _ids: np.ndarray  # (rows,) example id of every row
    _labels: np.ndarray  # (rows,)

    def _index_rows(self) -> None:
        """Where each example's rows start and how many there are (consecutive rows)."""
        ids = np.asarray(self._ids, np.int64)
        change = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, np.int64)
        self._start = change
        self._count = np.diff(np.r_[change, len(ids)])
        self._pos_of = {int(i): k for k, i in enumerate(ids[change])}
        if len(self._pos_of) != len(change):
            raise ValueError(f"run {self.name!r}: an example's rows are not consecutive")

    @property
    def name(self) -> str:
        return self.metadata["run"]

    @property
    def pool(self) -> str:
        return self.metadata["pool"]

    @property
    def site_names(self) -> list[str]:
        return [s["spec"] for s in self.metadata["sites"]]

    @property
    def example_ids(self) -> np.ndarray:
        """``(rows,)`` the example id of each row (token runs: repeated over its tokens)."""
        return np.asarray(self._ids, np.int64)

    @property
    def labels(self) -> np.ndarray:
        """``(rows,)`` the label of each row (token runs: the token labels)."""
        return np.asarray(self._labels)

    @property
    def n_examples(self) -> int:
        return len(self._pos_of)

    def array(self, site: str) -> ChunkedArray:
        """The memory-mapped ``(rows, hidden)`` activations of ``site``."""
        return self._arrays[self._site_index(site)]

    def _site_index(self, site: str) -> int:
        for k, entry in enumerate(self.metadata["sites"]):
            if site in (entry["spec"], entry["name"]):
                return k
        raise ValueError(f"run {self.name!r} has no site {site!r}; it stores {self.site_names}")

    def check(self, *, model: str | None = None, sites: Iterable[str] = (),
              requests: Iterable[Request] = ()) -> None:
        """Raise a ValueError if the run is not of ``model`` or lacks a site or pooling."""
        stored_model = self.metadata["model"]
        if model is not None and model not in (stored_model.get("name"), stored_model.get("config_hash")):
            raise ValueError(f"run {self.name!r} was collected with model {stored_model.get('name')!r} "
                             f"(config {stored_model.get('config_hash')}), not {model!r}")
        for site in sites:
            self._site_index(site)
        for site, how in requests:
            self._site_index(site)
            if how != self.pool:
                raise ValueError(f"run {self.name!r} stores pool={self.pool!r}, "
                                 f"but {site!r} is asked with pool={how!r}")

    def sites_for(self, specs: Iterable[str]) -> dict[str, Site]:
        """Site objects for specs stored in this run (rank = stored order)."""
        out = {}
        for spec in dict.fromkeys(specs):
            k = self._site_index(spec)
            entry = self.metadata["sites"][k]
            path, _, attr = entry["name"].rpartition(".")
            out[spec] = Site(k, path, attr, spec, entry["layer"])
        return out

    def rows_of(self, example_ids: Sequence[int]) -> np.ndarray:
        """The row numbers of the given examples, example by example (all tokens of each)."""
        try:
            pos = np.array([self._pos_of[int(i)] for i in example_ids], dtype=np.int64)
        except KeyError as err:
            lost = f" ({len(self.bad_shards)} shards were unreadable)" if self.bad_shards else ""
            raise KeyError(f"example id {err.args[0]} is not in run {self.name!r}{lost}; train on the data the run "
                           "was collected from (or its tt_split parts)") from None
        start, count = self._start[pos], self._count[pos]
        return np.repeat(start - np.cumsum(count) + count, count) + np.arange(int(count.sum()))

    def read(self, example_ids: Sequence[int], requests: Sequence[Request]) -> dict[Request, np.ndarray]:
        """Rows of the given examples for each ``(site, pool)`` request: ``(examples, hidden)``,
        or for a token run ``(their real tokens, hidden)``, example by example."""
        rows = self.rows_of(example_ids)
        return {(site, how): self.array(site)[rows] for site, how in requests}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, model={self.metadata['model'].get('name')!r}, "
                f"pool={self.pool!r}, sites={len(self.site_names)}, examples={self.n_examples}, "
                f"rows={len(self._ids)})")
