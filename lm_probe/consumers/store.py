"""Activation stores: pooled activations on disk, to train probes without the model.

An :class:`ActivationStore` is a consumer: during a pass (``runner.collect(dataset,
consumers=[store])``, or alongside probes) it writes each batch's pooled activations per
site, the labels and the example ids into chunk files under ``<root>/<run>/``, and at
the end a manifest (rows and byte sizes per chunk file) and ``metadata.json`` (model name
and config hash, sites, pooling, tokenizer, dataset fingerprint, lm_probe version, time,
user tags). :meth:`ActivationStore.open` lists and queries the runs of a store; arrays
are read memory-mapped, chunk by chunk, so a store larger than memory works. A truncated
chunk is detected from the manifest, reported, and left out; the other chunks stay
readable. :meth:`lm_probe.ProbeRunner.from_store` trains probes from a stored run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from loguru import logger

from ..core.consumer import Consumer, NotComputedError, PooledBatch, Request, RunContext
from ..core.model import model_metadata
from ..core.pooling import check_pool
from ..core.sites import Site
from ..core.versions import __version__, check_schema_version

__all__ = ["ActivationStore", "StoreIndex", "StoredRun", "ChunkedArray", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


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


class ActivationStore(Consumer):
    """Write pooled activations of a pass to ``<path>/<run>/`` in chunks.

    Args:
        path: The store's root folder (it may hold many runs).
        sites: Site strings to store.
        pool: A per-example pooling (``mean``, ``last``, ``first``, ``max``).
        run: The run's name (a sub-folder).
        tags: User tags recorded in the metadata, e.g. ``{"task": "sentiment"}``.
        overwrite: Replace an existing run of the same name (refused otherwise).
        chunk_rows: Examples per chunk file.

    Under data parallelism rank 0 alone writes (``RunContext.writer``); on the other ranks the
    store checks and writes nothing, and :meth:`compute` refuses (open the run rank 0 wrote).
    """

    def __init__(self, path: str | Path, sites: Sequence[str], *, pool: str = "mean", run: str = "default",
                 tags: dict[str, Any] | None = None, overwrite: bool = False, chunk_rows: int = 4096) -> None:
        if isinstance(sites, str) or not sites:
            raise ValueError("sites must be a non-empty list of site strings")
        if check_pool(pool) == "none":
            raise ValueError("the store keeps one row per example: use pool 'mean', 'last', 'first' or 'max'")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
        self.path, self.sites, self.pool, self.run = Path(path), list(sites), pool, run
        self.tags, self.overwrite, self.chunk_rows = dict(tags or {}), overwrite, chunk_rows
        self.requests = tuple((s, pool) for s in self.sites)
        self.reset()

    @property
    def run_path(self) -> Path:
        return self.path / self.run

    def reset(self) -> None:
        """Forget the buffered rows (files already written stay)."""
        self._buffer: list[dict[str, np.ndarray]] = []
        self._chunks: list[dict[str, Any]] = []
        self._meta: dict[str, Any] = {}
        self._data: Any = None
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
            shutil.rmtree(target)
        target.mkdir(parents=True, exist_ok=True)
        tokenizer = getattr(model, "tokenizer", None)
        self._meta = {
            "schema_version": SCHEMA_VERSION, "run": self.run, "pool": self.pool, "tags": self.tags,
            "model": {**(model_metadata(model) or {}), "config_hash": _config_hash(model)},
            "tokenizer": getattr(tokenizer, "name_or_path", None),
            "sites": [{"spec": s, "name": sites[s].name if sites else s, "layer": sites[s].layer if sites else None}
                      for s in self.sites],
            "dataset_fingerprint": None if data is None else _fingerprint(data),
            "lm_probe": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def update(self, batch: PooledBatch) -> None:
        if self._data is None:
            raise RuntimeError("the store was not started: run it through runner.collect(...) or fit_probes")
        if not self._writer:
            return
        self._buffer.append({
            **{f"site_{k}": np.asarray(batch.acts[(s, self.pool)], np.float32) for k, s in enumerate(self.sites)},
            "labels": np.asarray(batch.labels), "example_ids": self._data.example_ids[batch.index],
        })
        if sum(len(b["labels"]) for b in self._buffer) >= self.chunk_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write chunks of exactly ``chunk_rows`` examples (the last one may be smaller)."""
        if not self._buffer:
            return
        rows = {name: np.concatenate([b[name] for b in self._buffer]) for name in self._buffer[0]}
        total, start = len(rows["labels"]), 0
        while total - start >= self.chunk_rows or (final and start < total):
            stop = min(start + self.chunk_rows, total)
            folder = self.run_path / f"chunk_{len(self._chunks):05d}"
            folder.mkdir(parents=True, exist_ok=True)
            files = {}
            for name, value in rows.items():
                np.save(folder / f"{name}.npy", value[start:stop])
                files[name] = os.path.getsize(folder / f"{name}.npy")
            self._chunks.append({"folder": folder.name, "rows": stop - start, "bytes": files})
            start = stop
        self._buffer = [{name: value[start:] for name, value in rows.items()}] if start < total else []

    def finish(self) -> None:
        """Flush the last chunk and write the manifest and metadata."""
        if self._data is None or not self._writer:
            return
        self._flush(final=True)
        self._meta["n_examples"] = int(sum(c["rows"] for c in self._chunks))
        self._meta["chunks"] = self._chunks
        (self.run_path / "metadata.json").write_text(json.dumps(self._meta, indent=2, default=str))
        self._written = True
        logger.info("stored {} examples x {} sites in {}", self._meta["n_examples"], len(self.sites), self.run_path)

    def compute(self) -> "StoredRun":
        """The written run, opened for reading."""
        if not self._writer:
            raise NotComputedError("on data-parallel ranks other than 0 the store writes nothing: open the run "
                                   "rank 0 wrote with ActivationStore.open(path) after torch.distributed.barrier()")
        if not self._written:
            raise NotComputedError("the store has not finished a pass yet")
        return StoredRun(self.run_path)

    @staticmethod
    def open(path: str | Path) -> "StoreIndex":
        """The runs in a store folder (see :class:`StoreIndex`)."""
        return StoreIndex(path)


class ChunkedArray:
    """A read-only ``(n_examples, hidden)`` view over memory-mapped chunk files."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.offsets[-1]), *(parts[0].shape[1:] if parts else ()))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        rows = np.arange(self.shape[0])[rows] if not isinstance(rows, np.ndarray) else rows
        rows = np.atleast_1d(rows)
        chunk = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.parts[0].dtype)
        for c in np.unique(chunk):
            pick = chunk == c
            out[pick] = self.parts[c][rows[pick] - self.offsets[c]]
        return out


class StoredRun:
    """One run of a store: its metadata, and memory-mapped arrays of its valid chunks.

    Attributes:
        metadata: The run's ``metadata.json``.
        bad_chunks: Chunk folders left out (truncated or missing files), with the reason.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_file = self.path / "metadata.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{self.path} has no metadata.json: the pass that wrote it did not finish")
        self.metadata = json.loads(meta_file.read_text())
        check_schema_version(self.metadata, SCHEMA_VERSION, "store", self.path)
        self.bad_chunks: dict[str, str] = {}
        self._good = []
        for chunk in self.metadata["chunks"]:
            problem = self._check_chunk(chunk)
            if problem:
                self.bad_chunks[chunk["folder"]] = problem
                logger.warning("store run {!r}: chunk {} is unreadable ({}); its {} examples are left out, "
                               "the other chunks are fine", self.name, chunk["folder"], problem, chunk["rows"])
            else:
                self._good.append(chunk)
        self._mmaps = {name: [np.load(self.path / c["folder"] / f"{name}.npy", mmap_mode="r") for c in self._good]
                       for name in self._good[0]["bytes"]} if self._good else {}
        ids = (np.concatenate([np.asarray(p) for p in self._mmaps.get("example_ids", [])]) if self._good
               else np.array([], int))
        self._row_of = {int(i): r for r, i in enumerate(ids)}

    def _check_chunk(self, chunk: dict) -> str:
        for name, size in chunk["bytes"].items():
            file = self.path / chunk["folder"] / f"{name}.npy"
            if not file.exists():
                return f"{file.name} is missing"
            actual = os.path.getsize(file)
            if actual != size:
                return f"{file.name} has {actual} of {size} bytes (truncated)"
        return ""

    @property
    def name(self) -> str:
        return self.metadata["run"]

    @property
    def site_names(self) -> list[str]:
        return [s["spec"] for s in self.metadata["sites"]]

    @property
    def example_ids(self) -> np.ndarray:
        return np.fromiter(self._row_of, dtype=np.int64, count=len(self._row_of))

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([np.asarray(p) for p in self._mmaps["labels"]])

    def array(self, site: str) -> ChunkedArray:
        """The memory-mapped ``(n_examples, hidden)`` activations of ``site``."""
        return ChunkedArray(self._mmaps[f"site_{self._site_index(site)}"])

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
            if how != self.metadata["pool"]:
                raise ValueError(f"run {self.name!r} stores pool={self.metadata['pool']!r}, "
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

    def read(self, example_ids: Sequence[int], requests: Sequence[Request]) -> dict[Request, np.ndarray]:
        """Rows of the given examples for each ``(site, pool)`` request."""
        try:
            rows = np.array([self._row_of[int(i)] for i in example_ids], dtype=np.int64)
        except KeyError as err:
            lost = f" ({len(self.bad_chunks)} chunks were unreadable)" if self.bad_chunks else ""
            raise KeyError(f"example id {err.args[0]} is not in run {self.name!r}{lost}; train on the data the run "
                           "was collected from (or its tt_split parts)") from None
        return {(site, how): self.array(site)[rows] for site, how in requests}

    def __repr__(self) -> str:
        return (f"StoredRun({self.name!r}, model={self.metadata['model'].get('name')!r}, "
                f"sites={len(self.site_names)}, examples={len(self._row_of)})")


class StoreIndex:
    """The runs of a store folder; query them by model, site and tag."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no activation store at {self.path}")
        self._runs = {p.name: p for p in sorted(self.path.iterdir()) if (p / "metadata.json").exists()}

    @property
    def table(self) -> pd.DataFrame:
        """One row per run: name, model, pool, sites, examples, tags, created."""
        rows = []
        for name, p in self._runs.items():
            meta = json.loads((p / "metadata.json").read_text())
            rows.append({"run": name, "model": meta["model"].get("name"), "pool": meta["pool"],
                         "sites": [s["spec"] for s in meta["sites"]], "n_examples": meta.get("n_examples"),
                         "tags": meta["tags"], "created": meta["created"]})
        return pd.DataFrame(rows)

    def runs(self, *, model: str | None = None, site: str | None = None,
             tag: dict[str, Any] | None = None) -> list[StoredRun]:
        """Runs matching a model name (or config hash), holding a site, with these tags."""
        out = []
        for p in self._runs.values():
            run = StoredRun(p)
            meta = run.metadata
            if model is not None and model not in (meta["model"].get("name"), meta["model"].get("config_hash")):
                continue
            if site is not None and not any(site in (s["spec"], s["name"]) for s in meta["sites"]):
                continue
            if tag and any(meta["tags"].get(k) != v for k, v in tag.items()):
                continue
            out.append(run)
        return out

    def run(self, name: str, *, model: str | None = None, sites: Iterable[str] = ()) -> StoredRun:
        """Open one run, checking it is of ``model`` and has ``sites`` (ValueError otherwise)."""
        if name not in self._runs:
            raise KeyError(f"no run {name!r} in {self.path}; runs are {list(self._runs)}")
        run = StoredRun(self._runs[name])
        run.check(model=model, sites=sites)
        return run
