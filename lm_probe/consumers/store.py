"""Activation stores: pooled activations on disk, to train probes without the model.

An :class:`ActivationStore` is a consumer: during a pass (``runner.collect(dataset,
consumers=[store])``, or alongside probes, where it sees the training split only, not the
rows ``fit_probes`` holds out for validation) it writes each batch's pooled activations per
site, the labels and the example ids to ``<root>/<run>/`` as a Hugging Face ``datasets``
Arrow dataset: one float32 column per site, ``example_id`` and ``label``, each example's
``n_tokens`` and ``token_hash`` (a 64-bit hash of its token ids), and for ``pool="none"``
one row per real token with its ``position`` and ``token_id``. Reading a run checks those
against the data it is read for (:meth:`~lm_probe.consumers.store_base.RunRows.read`): rows
are matched by example id, and the tokens make sure they are the same examples. Shards are
written as they fill (:class:`~lm_probe.consumers.store_shards.ShardWriter`), so the memory
a store holds does not grow with the dataset. They go to a hidden staging folder
``<root>/.<run>.writing/`` that replaces the run folder only when the pass finishes: a pass
that fails leaves any earlier run of that name as it was (and the staging folder, which
:attr:`StoreIndex.leftovers` lists and the next pass of that run replaces). At the end it records the metadata (model
name and config hash, sites, pooling, tokenizer, dataset fingerprint, lm_probe version,
time, user tags) in the dataset's info: ``datasets.load_from_disk(run_path)`` opens a run
as a plain dataset. :meth:`ActivationStore.open` lists and queries the runs of a store
(:class:`~lm_probe.consumers.store_index.StoreIndex`); :meth:`lm_probe.ProbeRunner.from_store`
trains probes from a stored run (:class:`~lm_probe.consumers.store_run.StoredRun`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from loguru import logger

from ..core.consumer import Consumer, NotComputedError, PooledBatch, RunContext
from ..core.labels import IGNORE
from ..core.model import model_metadata
from ..core.pooling import check_pool
from ..core.versions import __version__
from .store_index import StoreIndex, store_root, utc_now
from .store_legacy import LegacyRun, convert_store
from .store_run import StoredRun
from .store_shards import (RESERVED, SCHEMA_VERSION, ChunkedArray, ShardWriter, check_removable, check_run_name,
                           finish_run, remove_run_folder, token_hashes)

__all__ = ["ActivationStore", "StoreIndex", "StoredRun", "LegacyRun", "ChunkedArray", "SCHEMA_VERSION",
           "convert_store"]


def _config_hash(model: Any) -> str | None:
    config = getattr(getattr(model, "_module", None), "config", None)
    if config is None:
        return None
    return hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:16]


def _fingerprint(data: Any) -> str:
    digest = hashlib.sha256()
    for ids in data.ids:
        digest.update(np.asarray(ids, np.int64).tobytes())
        digest.update(b"|")
    digest.update(np.asarray(data.labels).tobytes())
    digest.update(np.asarray(data.example_ids).tobytes())
    return digest.hexdigest()[:16]


def _tags(tags: dict[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    """Tags as ``{name: value}``: a list of names becomes ``{name: True}``."""
    if tags is None:
        return {}
    if isinstance(tags, str):
        raise ValueError(f"tags is a dict or a list of tag names, got the string {tags!r}: write [{tags!r}]")
    return dict(tags) if isinstance(tags, dict) else {str(t): True for t in tags}


class ActivationStore(Consumer):
    """Write pooled activations of a pass to ``<path>/<run>/`` as an Arrow dataset, shard by shard.

    Args:
        path: The store's root folder (it may hold many runs); default: the
            ``LM_PROBE_STORE`` environment variable.
        sites: Site strings to store (one column each).
        pool: A pooling (``mean``, ``last``, ``first``, ``max``: one row per example), or
            ``none``: one row per real token, with ``position`` and ``token_id`` columns.
        run: The run's name: a plain folder name (a sub-folder of ``path``).
        tags: User tags recorded in the metadata: ``{"task": "sentiment"}`` or ``["baseline"]``.
        overwrite: Replace an existing run of the same name when the pass finishes (refused
            otherwise; a folder of that name that is not a stored run is never deleted).
        shard_rows: Rows per shard file: the most rows the store holds in memory (a token
            run cuts shards between examples: a shard holds whole examples).

    Under data parallelism rank 0 alone writes (``RunContext.writer``); on the other ranks the
    store checks and writes nothing, and :meth:`compute` refuses (open the run rank 0 wrote).
    """

    def __init__(self, path: str | Path | None = None, sites: Sequence[str] | None = None, *, pool: str = "mean",
                 run: str = "default", tags: dict[str, Any] | Sequence[str] | None = None, overwrite: bool = False,
                 shard_rows: int = 4096) -> None:
        if isinstance(sites, str) or not sites:
            raise ValueError("sites must be a non-empty list of site strings")
        clash = [s for s in sites if s in RESERVED]
        if clash:
            raise ValueError(f"sites {clash} clash with the store's own columns {list(RESERVED)}")
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be at least 1, got {shard_rows}")
        check_run_name(run)
        self.path, self.sites, self.pool = store_root(path), list(dict.fromkeys(sites)), check_pool(pool)
        self.run, self.tags, self.overwrite, self.shard_rows = run, _tags(tags), overwrite, shard_rows
        self.requests = tuple((s, pool) for s in self.sites)
        self.reset()

    @property
    def run_path(self) -> Path:
        """The run's folder, ``<path>/<run>``."""
        return self.path / self.run

    @property
    def staging_path(self) -> Path:
        """Where a pass writes until it finishes: ``<path>/.<run>.writing``."""
        return self.path / f".{self.run}.writing"

    def reset(self) -> None:
        """Forget the pass (shard files already written stay)."""
        self._shards: ShardWriter | None = None
        self._meta: dict[str, Any] = {}
        self._data: Any = None
        self._n_examples = self._n_tokens = 0
        self._written = False
        self._writer = True

    def start(self, context: RunContext) -> None:
        """Check the run folder (before any forward pass) and record the metadata."""
        model, sites, data = context.model, context.sites, context.data
        target = self.run_path
        self.reset()
        self._data, self._writer = data, context.writer
        if not self._writer:
            return
        if target.exists() and any(target.iterdir()):
            if not self.overwrite:
                raise FileExistsError(f"the store already has a run {self.run!r} at {target}; "
                                      "pass overwrite=True to replace it or choose another run=")
            check_removable(self.path, target)  # replaced at finish(), once the new run is written
        self.path.mkdir(parents=True, exist_ok=True)
        remove_run_folder(self.path, self.staging_path)  # left by a pass that failed
        self.staging_path.mkdir()
        self._shards = ShardWriter(self.staging_path, self.shard_rows,  # a lost shard loses whole examples
                                   group="example_id" if self.pool == "none" else None)
        tokenizer = getattr(model, "tokenizer", None)
        self._meta = {
            "schema_version": SCHEMA_VERSION, "run": self.run, "pool": self.pool, "tags": self.tags,
            "model": {**(model_metadata(model) or {}), "config_hash": _config_hash(model)},
            "tokenizer": getattr(tokenizer, "name_or_path", None),
            "sites": [{"spec": s, "name": sites[s].name if sites else s, "layer": sites[s].layer if sites else None,
                       "column": s} for s in self.sites],
            "dataset_fingerprint": None if data is None else _fingerprint(data), "max_tokens": context.max_tokens,
            "lm_probe": __version__, "created": utc_now(),
        }

    def update(self, batch: PooledBatch) -> None:
        """Add the batch's rows to the shard being filled (writing each shard that fills up).

        Args:
            batch: The pooled batch; its ``(site, pool)`` rows for every stored site.
        """
        if self._data is None:
            raise RuntimeError("the store was not started: run it through runner.collect(...) or fit_probes")
        if not self._writer:
            return
        columns = self._columns(batch)
        self._shards.add(columns)
        self._n_examples += len(np.unique(columns["example_id"]))
        self._n_tokens += int(columns["n_tokens"].sum()) if self.pool != "none" else len(columns["example_id"])

    def _columns(self, batch: PooledBatch) -> dict[str, np.ndarray]:
        """The batch's rows: a column per site, ``example_id``, ``label``, and ``n_tokens``,
        ``token_hash`` of the tokens pooled (token runs: ``position``, ``token_id``)."""
        acts = {s: np.asarray(batch.acts[(s, self.pool)], np.float32) for s in self.sites}
        n = len(batch.index)
        labels = np.full(n, IGNORE, np.int64) if batch.labels is None else np.asarray(batch.labels)
        if self.pool != "none":
            n = len(next(iter(acts.values())))  # a batch cut by max_tokens keeps the examples pooled whole
            index, labels = batch.index[:n], labels[:n]
            counts = np.asarray([len(self._data.ids[i]) for i in index] if batch.n_tokens is None
                                else batch.n_tokens[:n], np.int64)
            tokens = [self._data.ids[i][:k] for i, k in zip(index, counts)]
            return {**acts, "example_id": np.asarray(self._data.example_ids[index], np.int64), "label": labels,
                    "n_tokens": counts, "token_hash": token_hashes(tokens)}
        ids, position = batch.row_ids(token=True)
        token_labels = batch.token_labels if batch.token_labels is not None else np.repeat(labels, batch.n_tokens)
        token_id = np.concatenate([self._data.ids[i][:k] for i, k in zip(batch.index, batch.n_tokens)] or [[]])
        return {**acts, "example_id": ids, "position": position, "token_id": token_id.astype(np.int64),
                "label": np.asarray(token_labels)}

    def finish(self) -> None:
        """Write the last shard, then the dataset's info (features, metadata) and state."""
        if self._data is None or not self._writer:
            return
        shards = self._shards.close()
        whole = sum(len(ids) for ids in self._data.ids)
        meta = {**self._meta, "n_examples": self._n_examples, "n_tokens": self._n_tokens,
                "complete": self._n_examples == len(self._data) and self._n_tokens == whole,
                "sites": [{**s, "hidden": self._hidden(s["column"])} for s in self._meta["sites"]]}
        self._meta = finish_run(self.staging_path, shards, self._shards.schema, meta)
        self._swap_in()
        self._written = True
        logger.info("stored {} examples ({} rows) x {} sites in {}", self._n_examples, self._meta["n_rows"],
                    len(self.sites), self.run_path)
        if not meta["complete"]:
            logger.warning("run {!r} holds {} of the data's {} examples ({} of {} tokens; max_tokens={}): its "
                           "metadata says complete=False", self.run, self._n_examples, len(self._data),
                           self._n_tokens, whole, meta["max_tokens"])

    def _swap_in(self) -> None:
        """Move the finished staging folder to the run's name; an older run there is renamed
        aside first and deleted only once the new one is in place."""
        target, old = self.run_path, self.path / f".{self.run}.replaced"
        if target.exists():
            remove_run_folder(self.path, old)
            check_removable(self.path, target)
            os.replace(target, old)
        os.replace(self.staging_path, target)
        remove_run_folder(self.path, old)

    def _hidden(self, column: str) -> int | None:
        schema = self._shards.schema
        return None if schema is None else schema.field(column).type.list_size

    def compute(self) -> StoredRun:
        """The written run, opened for reading."""
        if not self._writer:
            raise NotComputedError("on data-parallel ranks other than 0 the store writes nothing: open the run "
                                   "rank 0 wrote with ActivationStore.open(path) after torch.distributed.barrier()")
        if not self._written:
            raise NotComputedError("the store has not finished a pass yet")
        return StoredRun(self.run_path)

    @staticmethod
    def open(path: str | Path | None = None) -> StoreIndex:
        """The runs in a store folder (default ``LM_PROBE_STORE``; see :class:`StoreIndex`)."""
        return StoreIndex(path)
