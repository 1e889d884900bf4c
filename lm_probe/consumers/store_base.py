"""What every stored run answers, whichever files hold it: rows by example id, checks.

A run holds rows of pooled activations, one per example (``pool="mean"`` and the others)
or one per real token (``pool="none"``, an example's tokens in consecutive rows), each with
its ``example_id``. :class:`RunRows` matches examples to rows (:meth:`RunRows.read`, what
:class:`~lm_probe.core.sources.StoreSource` calls) and checks that a run suits a model, sites
and poolings. Example ids alone do not say that the rows are of the same examples (a
dataset's ids default to ``0..n-1``), so a read also compares each example's tokens with
the run's: a pooled run's ``n_tokens`` and ``token_hash``, a token run's ``token_id`` rows. The Arrow run (:mod:`.store_run`) and the old chunked ``.npy`` run
(:mod:`.store_legacy`) fill in the metadata and the arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from loguru import logger

from ..core.consumer import Request
from ..core.sites import Site
from .store_shards import ChunkedArray, check_run_name, remove_run_folder, token_hashes

__all__ = ["RunRows"]


class RunRows:
    """Rows of a run matched by example id; subclasses set the attributes below.

    Attributes:
        path: The run's folder (``None`` for a run opened from the hub).
        metadata: Model, sites (``spec``, ``name``, ``layer``), pooling, tags, time...
        bad_shards: Files left out (truncated or corrupted), with the reason.
    """

    path: Path | None
    source: Any
    metadata: dict[str, Any]
    bad_shards: dict[str, str]
    _arrays: list[ChunkedArray]  # one per site, in the metadata's order
    _ids: np.ndarray  # (rows,) example id of every row
    _labels: np.ndarray  # (rows,)
    _n_tokens: np.ndarray | None = None  # (rows,) pooled runs: the tokens each row pooled
    _hashes: np.ndarray | None = None  # (rows,) pooled runs: token_hashes of those tokens
    _token_ids: np.ndarray | None = None  # (rows,) token runs: each row's token id

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
        """The run's name (its folder's name in the store)."""
        return self.metadata["run"]

    @property
    def pool(self) -> str:
        """The pooling the run stores (``"none"``: one row per real token)."""
        return self.metadata["pool"]

    @property
    def site_names(self) -> list[str]:
        """The stored site specs, in the run's column order."""
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
        """The examples with rows in the run (those of unreadable shards left out)."""
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

    def _positions(self, example_ids: Sequence[int]) -> np.ndarray:
        try:
            return np.array([self._pos_of[int(i)] for i in example_ids], dtype=np.int64)
        except KeyError as err:
            lost = f" ({len(self.bad_shards)} shards were unreadable)" if self.bad_shards else ""
            held = f"; it holds {len(self._pos_of)} examples"
            raise KeyError(f"example id {err.args[0]} is not in run {self.name!r}{lost}{held}; train on the data the "
                           "run was collected from (or its tt_split parts). A run written alongside fit_probes holds "
                           "its training split only, without the validation rows: to store a whole dataset, use "
                           "runner.collect(dataset, consumers=[store])") from None

    def rows_of(self, example_ids: Sequence[int]) -> np.ndarray:
        """The row numbers of the given examples, example by example (all tokens of each)."""
        return self._rows_at(self._positions(example_ids))

    def _rows_at(self, pos: np.ndarray) -> np.ndarray:
        start, count = self._start[pos], self._count[pos]
        return np.repeat(start - np.cumsum(count) + count, count) + np.arange(int(count.sum()))

    def read(self, example_ids: Sequence[int], requests: Sequence[Request],
             tokens: Sequence[np.ndarray] | None = None) -> dict[Request, np.ndarray]:
        """Rows of the given examples for each ``(site, pool)`` request: ``(examples, hidden)``,
        or for a token run ``(their real tokens, hidden)``, example by example.

        Args:
            example_ids: The examples' ids.
            requests: ``(site, pool)`` pairs.
            tokens: Each example's token ids: checked against the run's (see :meth:`check_tokens`).
        """
        pos = self._positions(example_ids)  # one id lookup serves both the rows and the check
        rows = self._rows_at(pos)
        if tokens is not None:
            self._check_tokens_at(pos, example_ids, tokens)
        return {(site, how): self.array(site)[rows] for site, how in requests}

    def check_tokens(self, example_ids: Sequence[int], tokens: Sequence[np.ndarray]) -> None:
        """Raise a ValueError unless the run's rows of these examples were collected from these
        token ids: a pooled run's ``n_tokens`` and ``token_hash``, a token run's ``token_id``
        rows (runs written before these columns existed are not checked)."""
        self._check_tokens_at(self._positions(example_ids), example_ids, tokens)

    def _check_tokens_at(self, pos: np.ndarray, example_ids: Sequence[int], tokens: Sequence[np.ndarray]) -> None:
        have = np.array([len(t) for t in tokens], np.int64)
        if self._token_ids is not None:
            stored, same = self._count[pos], np.ones(len(pos), bool)
            for k, (start, ids) in enumerate(zip(self._start[pos], tokens)):
                same[k] = stored[k] == len(ids) and np.array_equal(self._token_ids[start:start + len(ids)], ids)
        elif self._n_tokens is not None and self._hashes is not None:
            stored = self._n_tokens[self._start[pos]]
            same = (stored == have) & (self._hashes[self._start[pos]] == token_hashes(tokens))
        else:
            return
        if not same.all():
            k = int(np.flatnonzero(~same)[0])
            what = (f"{stored[k]} tokens in the run and {have[k]} in the data" if stored[k] != have[k]
                    else "other token ids in the run than in the data")
            lost = f" ({len(self.bad_shards)} shards of the run were unreadable)" if self.bad_shards else ""
            raise ValueError(f"run {self.name!r} was collected from other texts/tokenization: example id "
                             f"{int(example_ids[k])} has {what}{lost} ({int((~same).sum())} of {len(same)} examples "
                             "differ); collect again or pass the dataset it was collected from")

    def rename(self, name: str) -> "RunRows":
        """Rename the run inside its store (its folder and its metadata); returns it."""
        folder = self._local("rename")
        check_run_name(name)
        target = folder.with_name(name)
        if target.exists():
            raise FileExistsError(f"the store already has a run {name!r} at {target}; remove it or choose another name")
        folder.rename(target)
        self.path = self.source = target
        self.metadata["run"] = name
        self._write_metadata(target)
        return self

    def remove(self, *, confirm: bool = False) -> None:
        """Delete the run's folder; refused unless ``confirm=True``."""
        folder = self._local("remove")
        if not confirm:
            raise ValueError(f"run.remove() deletes run {self.name!r} ({folder}, {len(self._ids)} rows) for good: "
                             "call run.remove(confirm=True) to do it")
        self._release()
        remove_run_folder(folder.parent, folder)
        logger.info("removed store run {!r} ({})", self.name, folder)

    def _local(self, what: str) -> Path:
        if self.path is None:
            raise ValueError(f"cannot {what} run {self.name!r}: it was opened from {self.source}, not a local folder")
        return self.path

    def _write_metadata(self, folder: Path) -> None:
        """Write :attr:`metadata` to the run's files in ``folder`` (after a rename)."""
        raise NotImplementedError

    def _release(self) -> None:
        """Drop the memory maps of the run's files (before they are deleted)."""
        self._arrays = []

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, model={self.metadata['model'].get('name')!r}, "
                f"pool={self.pool!r}, sites={len(self.site_names)}, examples={self.n_examples}, "
                f"rows={len(self._ids)})")
