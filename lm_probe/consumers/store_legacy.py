"""Runs in the first store format (schema 1): read them, and convert them to Arrow runs.

Before the Arrow format, a run was a folder of ``chunk_00000/`` folders (one ``.npy`` file
per site, ``labels.npy``, ``example_ids.npy``) and a ``metadata.json`` manifest with the
byte size of every file. :class:`LegacyRun` reads such a run as before (memory-mapped,
a truncated chunk reported and left out) and warns that it is in the old format;
:func:`convert_store` (``lm-probe store convert PATH``) rewrites every old run under a
folder as an Arrow run with the same rows, labels, example ids and metadata.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

from ..core.versions import check_schema_version
from .store_base import RunRows
from .store_shards import SCHEMA_VERSION, ChunkedArray, ShardWriter, finish_run

__all__ = ["LegacyRun", "is_legacy", "convert_store"]


def is_legacy(folder: Path) -> bool:
    """Whether ``folder`` is a run of the old format (a ``metadata.json`` manifest)."""
    return (Path(folder) / "metadata.json").exists() and not (Path(folder) / "state.json").exists()


class LegacyRun(RunRows):
    """A run of the old chunked ``.npy`` format, read memory-mapped (see :class:`RunRows`; it can
    be renamed and removed, but not pushed to the hub or opened as a dataset: convert it first)."""

    def __init__(self, path: str | Path, *, warn: bool = True) -> None:
        self.path = self.source = Path(path)
        self.metadata = json.loads((self.path / "metadata.json").read_text())
        check_schema_version(self.metadata, SCHEMA_VERSION, "store", self.path)
        if warn:
            logger.warning("store run {!r} at {} is in the old format (chunked .npy); it is read as before: "
                           "convert it with `lm-probe store convert {}`", self.name, self.path, self.path)
        self.bad_shards: dict[str, str] = {}
        self._good = []
        for chunk in self.metadata["chunks"]:
            problem = self._check_chunk(chunk)
            if problem:
                self.bad_shards[chunk["folder"]] = problem
                logger.warning("store run {!r}: chunk {} is unreadable ({}); its {} examples are left out, "
                               "the other chunks are fine", self.name, chunk["folder"], problem, chunk["rows"])
            else:
                self._good.append(chunk)
        mmaps = {name: [np.load(self.path / c["folder"] / f"{name}.npy", mmap_mode="r") for c in self._good]
                 for name in (self._good[0]["bytes"] if self._good else ())}
        self._arrays = [ChunkedArray(mmaps.get(f"site_{k}", [])) for k in range(len(self.metadata["sites"]))]
        self._ids = np.concatenate([np.asarray(p) for p in mmaps["example_ids"]]) if self._good else np.zeros(0, int)
        self._labels = np.concatenate([np.asarray(p) for p in mmaps["labels"]]) if self._good else np.zeros(0, int)
        self._index_rows()

    def _check_chunk(self, chunk: dict) -> str:
        for name, size in chunk["bytes"].items():
            file = self.path / chunk["folder"] / f"{name}.npy"
            if not file.exists():
                return f"{file.name} is missing"
            actual = os.path.getsize(file)
            if actual != size:
                return f"{file.name} has {actual} of {size} bytes (truncated)"
        return ""

    def _write_metadata(self, folder: Path) -> None:
        (folder / "metadata.json").write_text(json.dumps(self.metadata))

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        """Refused: an old-format run is converted first."""
        raise ValueError(self._convert_first("push it to the hub"))

    @property
    def dataset(self) -> Any:
        """Refused: an old-format run is converted first."""
        raise ValueError(self._convert_first("open it as a datasets.Dataset"))

    def _convert_first(self, what: str) -> str:
        return f"run {self.name!r} is in the old format: to {what}, convert first with `lm-probe store convert {self.path}`"

    def chunks(self) -> Any:
        """Each readable chunk's columns: ``{site spec: (rows, hidden), "example_id", "label"}``."""
        for chunk in self._good:
            folder = self.path / chunk["folder"]
            columns = {s["spec"]: np.load(folder / f"site_{k}.npy") for k, s in enumerate(self.metadata["sites"])}
            yield {**columns, "example_id": np.load(folder / "example_ids.npy").astype(np.int64),
                   "label": np.load(folder / "labels.npy")}


def convert_run(folder: Path, *, shard_rows: int = 4096, drop_unreadable: bool = False) -> Path:
    """Rewrite one old-format run folder as an Arrow run in place; returns the folder.

    A run with unreadable chunks is refused unless ``drop_unreadable`` (then the lost chunks
    and rows are recorded in the metadata: ``lost_chunks``, ``lost_rows``, ``complete``). The
    Arrow run is written to a staging folder; the old folder is renamed to a backup, the
    staging folder moved into its place, and only then is the backup deleted.
    """
    old = LegacyRun(folder, warn=False)
    if old.bad_shards and not drop_unreadable:
        raise ValueError(_refusal(old))
    staging, backup = folder.with_name(f".{folder.name}.converting"), folder.with_name(f".{folder.name}.backup")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    writer = ShardWriter(staging, shard_rows)
    for columns in old.chunks():
        writer.add(columns)
    finish_run(staging, writer.close(), writer.schema, _converted_metadata(old))
    os.replace(folder, backup)
    try:
        os.replace(staging, folder)
    except OSError:
        os.replace(backup, folder)  # put the original back
        raise
    shutil.rmtree(backup)
    return folder


def _refusal(old: LegacyRun) -> str:
    lost = sum(c["rows"] for c in old.metadata["chunks"] if c["folder"] in old.bad_shards)
    return (f"run {old.name!r} at {old.path} has {len(old.bad_shards)} unreadable chunks "
            f"({'; '.join(f'{k}: {v}' for k, v in old.bad_shards.items())}): converting it would lose their "
            f"{lost} rows, and the original with them; restore the chunks, or convert the readable rows with "
            "`lm-probe store convert --drop-unreadable PATH` (the loss is recorded in the run's metadata)")


def _converted_metadata(old: LegacyRun) -> dict[str, Any]:
    meta = {k: v for k, v in old.metadata.items() if k not in ("chunks", "n_examples")}
    sites = [{**s, "column": s["spec"], "hidden": old._arrays[k].shape[1] if len(old._arrays[k]) else None}
             for k, s in enumerate(meta["sites"])]
    meta = {**meta, "schema_version": SCHEMA_VERSION, "sites": sites, "n_examples": old.n_examples,
            "converted_from": f"store schema {old.metadata.get('schema_version', 1)}"}
    if old.bad_shards:
        logger.warning("converting run {!r}: {} unreadable chunks are left out (recorded as lost_chunks in its "
                       "metadata)", old.name, len(old.bad_shards))
        meta.update(lost_chunks=dict(old.bad_shards), complete=False,
                    lost_rows=int(sum(c["rows"] for c in old.metadata["chunks"] if c["folder"] in old.bad_shards)))
    return meta


def convert_store(path: str | Path, *, shard_rows: int = 4096, drop_unreadable: bool = False) -> list[Path]:
    """Convert every old-format run at ``path`` (a run folder, or a store folder of runs) to the
    Arrow format, in place; returns the converted run folders (none if none was old).

    Every run is checked first: if any has unreadable chunks, nothing is converted unless
    ``drop_unreadable`` (see :func:`convert_run`)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no store or run folder at {path}")
    runs = [path] if is_legacy(path) else [p for p in sorted(path.iterdir()) if p.is_dir() and is_legacy(p)]
    if not drop_unreadable:
        for folder in runs:
            old = LegacyRun(folder, warn=False)
            if old.bad_shards:
                raise ValueError(_refusal(old))
    done = []
    for folder in runs:
        done.append(convert_run(folder, shard_rows=shard_rows, drop_unreadable=drop_unreadable))
        logger.info("converted run {!r} to the Arrow format: {}", folder.name, folder)
    return done
