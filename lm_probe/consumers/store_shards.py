"""The files of a stored run: Arrow shards that ``datasets.load_from_disk`` opens.

A run folder is what ``datasets.Dataset.save_to_disk`` writes: shard files
``data-00000-of-0000N.arrow`` (Arrow IPC streams), ``dataset_info.json`` (the features:
one ``List(Value("float32"), length=hidden)`` column per site, ``example_id``, ``label``,
for pooled runs each example's ``n_tokens`` and ``token_hash`` (of its token ids, see
:func:`token_hashes`), for token runs ``position`` and ``token_id``; lm_probe's metadata as JSON in the
info's ``description``) and ``state.json`` (the shard files, in order).

:class:`ShardWriter` writes the shards during a pass, one at a time: it buffers rows until
a shard is full and writes it, so the memory it holds is at most one shard, whatever the
dataset's size. :func:`finish_run` names the shards and writes the two JSON files.
:func:`read_shards` memory-maps the shards back, each checked against the metadata (its
byte size, that pyarrow reads it, its row count, and with ``verify=True`` its SHA-256, which
:class:`ShardWriter` records at write time and which catches flipped bits inside the data
that the other checks miss): a truncated or corrupted shard is reported and left out, and
the other shards stay readable. :class:`ChunkedArray` is a
site's ``(rows, hidden)`` float32 activations over those memory-mapped shards, read
without copying them into memory until rows are asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from ..functional.hashing import file_sha256

__all__ = ["SCHEMA_VERSION", "RESERVED", "ShardWriter", "finish_run", "read_info", "read_shards", "ChunkedArray",
           "site_parts", "token_hashes", "check_run_name", "check_removable", "remove_run_folder"]

#: The run format's version (1: the chunked ``.npy`` format, read by :mod:`.store_legacy`).
SCHEMA_VERSION = 2
#: Column names that are not sites.
RESERVED = ("example_id", "label", "n_tokens", "token_hash", "position", "token_id")


def token_hashes(examples: Any) -> np.ndarray:
    """``(examples,)`` int64: a 64-bit BLAKE2b hash of each example's token ids (as int64), what a
    pooled run stores per row to recognise the texts and tokenization it was collected from."""
    digests = [hashlib.blake2b(np.asarray(ids, np.int64).tobytes(), digest_size=8).digest() for ids in examples]
    return np.frombuffer(b"".join(digests), "<i8").astype(np.int64) if digests else np.zeros(0, np.int64)


#: The files that make a folder a run: the Arrow run's state, the old format's manifest.
RUN_FILES = ("state.json", "metadata.json")
#: The files a run writes (what a staging folder of an unfinished pass may hold).
_WRITTEN = re.compile(r"data-\d{5}(-of-\d{5})?\.arrow|state\.json|dataset_info\.json")


def check_run_name(name: Any) -> str:
    """``name`` if it is a plain folder name (no path separator, not empty, not hidden)."""
    if not isinstance(name, str) or not name or Path(name).name != name or name.startswith(".") or "\\" in name:
        raise ValueError(f"a run name is a plain folder name, such as 'sentiment-l6', got {name!r}")
    return name


def check_removable(root: Path, folder: Path) -> Path:
    """The resolved ``folder`` if deleting it is safe: it lies directly inside the store ``root``
    and is a run (``state.json`` or ``metadata.json``), a staging folder holding only run files,
    or empty. Anything else raises a ValueError: lm_probe deletes nothing it did not write."""
    target = Path(folder).resolve()
    if target.parent != Path(root).resolve():
        raise ValueError(f"refusing to delete {folder}: it is not a run folder inside the store {root}")
    entries = list(target.iterdir()) if target.is_dir() else []
    staging = target.name.startswith(".") and all(p.is_file() and _WRITTEN.fullmatch(p.name) for p in entries)
    if entries and not staging and not any((target / f).is_file() for f in RUN_FILES):
        raise ValueError(f"refusing to delete {folder}: it holds files but is not a stored run (no state.json "
                         "or metadata.json); move it away or choose another run name")
    return target


def remove_run_folder(root: Path, folder: Path) -> None:
    """Delete a run folder of the store at ``root`` after :func:`check_removable`."""
    target = check_removable(root, folder)
    if target.exists():
        shutil.rmtree(target)


class ShardWriter:
    """Write columns of rows to Arrow shard files of ``shard_rows`` rows each, as they come.

    Args:
        folder: The run folder (it exists).
        shard_rows: Rows per shard file (the last one may hold fewer).
        group: A column whose runs of equal values are kept in one shard (a token run's
            ``example_id``: a lost shard then loses whole examples, never part of one). A
            shard then holds the most whole groups that fit in ``shard_rows`` (one larger
            group alone); a group's rows must come in one :meth:`add`.

    ``buffered_rows`` is the number of rows held in memory: below ``shard_rows`` after every
    :meth:`add`. ``shards`` lists the written files: ``{"file", "rows", "bytes", "sha256"}``.
    """

    def __init__(self, folder: Path, shard_rows: int, group: str | None = None) -> None:
        self.folder, self.shard_rows, self.group = Path(folder), shard_rows, group
        self.shards: list[dict[str, Any]] = []
        self.schema: pa.Schema | None = None
        self._buffer: list[dict[str, np.ndarray]] = []
        self.buffered_rows = 0

    def add(self, columns: Mapping[str, np.ndarray]) -> None:
        """Buffer rows (every column the same length; 2-D columns are ``(rows, hidden)``) and
        write each shard that fills up."""
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"every column needs the same number of rows, got {sorted(lengths)}")
        self._buffer.append({k: np.asarray(v) for k, v in columns.items()})
        self.buffered_rows += lengths.pop()
        while self.buffered_rows >= self.shard_rows:
            self._write(self._cut())

    def _cut(self) -> int:
        """Rows of the next shard: ``shard_rows``, or the whole groups that fit."""
        if self.group is None:
            return self.shard_rows
        ids = np.concatenate([b[self.group] for b in self._buffer])
        ends = np.r_[np.flatnonzero(ids[1:] != ids[:-1]) + 1, len(ids)]  # where each group ends
        fits = ends[ends <= self.shard_rows]
        return int(fits[-1]) if len(fits) else int(ends[0])

    def close(self) -> list[dict[str, Any]]:
        """Write the rows left (a last, smaller shard) and return the shards written."""
        if self.buffered_rows:
            self._write(self.buffered_rows)
        return self.shards

    def _write(self, n: int) -> None:
        rows = {k: np.concatenate([b[k] for b in self._buffer]) for k in self._buffer[0]}
        arrays = [_arrow(v[:n]) for v in rows.values()]
        if self.schema is None:
            from datasets import Features

            names = pa.schema([(k, a.type) for k, a in zip(rows, arrays)])
            self.schema = Features.from_arrow_schema(names).arrow_schema  # the features in its metadata
        file = self.folder / f"data-{len(self.shards):05d}.arrow"
        with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_stream(sink, self.schema) as writer:
            writer.write_batch(pa.record_batch(arrays, schema=self.schema))
        self.shards.append({"file": file.name, "rows": n, "bytes": os.path.getsize(file), "sha256": file_sha256(file)})
        left = {k: v[n:] for k, v in rows.items()}
        self.buffered_rows -= n
        self._buffer = [left] if self.buffered_rows else []


def _arrow(values: np.ndarray) -> pa.Array:
    if values.ndim == 2:
        flat = pa.array(np.ascontiguousarray(values, np.float32).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    return pa.array(values)


def finish_run(folder: Path, shards: list[dict[str, Any]], schema: pa.Schema | None,
               metadata: dict[str, Any]) -> dict[str, Any]:
    """Name the shards ``data-0000k-of-0000N.arrow`` and write ``dataset_info.json`` (the
    features and ``metadata`` as JSON in the description) and ``state.json``; returns the
    metadata with its ``shards``."""
    from datasets import Features

    for k, shard in enumerate(shards):
        name = f"data-{k:05d}-of-{len(shards):05d}.arrow"
        os.replace(folder / shard["file"], folder / name)
        shard["file"] = name
    metadata = {**metadata, "shards": shards, "n_rows": int(sum(s["rows"] for s in shards))}
    features = Features.from_arrow_schema(schema) if schema is not None else None
    write_info(folder, metadata, features)
    text = json.dumps(metadata, sort_keys=True, default=str)
    state = {"_data_files": [{"filename": s["file"]} for s in shards],
             "_fingerprint": hashlib.sha256(text.encode()).hexdigest()[:16], "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (folder / "state.json").write_text(json.dumps(state, indent=2))
    return metadata


def write_info(folder: Path, metadata: dict[str, Any], features: Any = None) -> None:
    """(Re)write ``dataset_info.json`` with ``metadata`` as its description (features kept)."""
    from datasets import DatasetInfo, Features

    if features is None and (folder / "dataset_info.json").exists():
        features = Features.from_dict(json.loads((folder / "dataset_info.json").read_text())["features"])
    DatasetInfo(description=json.dumps(metadata, indent=1, default=str), features=features).write_to_directory(
        str(folder), pretty_print=True)


def read_info(folder: Path) -> dict[str, Any]:
    """lm_probe's metadata of a run folder (the description of its ``dataset_info.json``)."""
    text = json.loads((Path(folder) / "dataset_info.json").read_text()).get("description") or "{}"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{folder} is a datasets folder, not an lm_probe run (its description is not "
                         "lm_probe's metadata)") from None


def read_shards(folder: Path, shards: list[dict[str, Any]], *,
                verify: bool = False) -> tuple[list[pa.Table], dict[str, str]]:
    """Memory-map each shard; ``(tables of the good shards, {bad file: why})``.

    With ``verify`` each shard that has a recorded ``sha256`` is hashed (reading every byte)
    and a mismatch makes it bad with the reason ``"checksum mismatch"``; shards without one
    (runs written before checksums) are not hashed."""
    tables, bad = [], {}
    for shard in shards:
        file = Path(folder) / shard["file"]
        try:
            size = os.path.getsize(file)
            if size != shard["bytes"]:
                raise ValueError(f"it has {size} of {shard['bytes']} bytes (truncated)")
            if verify and shard.get("sha256") and file_sha256(file) != shard["sha256"]:
                raise ValueError("checksum mismatch")
            table = pa.ipc.open_stream(pa.memory_map(str(file))).read_all()
            if table.num_rows != shard["rows"]:
                raise ValueError(f"it holds {table.num_rows} of {shard['rows']} rows")
        except (OSError, ValueError, pa.ArrowException) as err:
            bad[shard["file"]] = " ".join(str(err).split()) or type(err).__name__
            continue
        tables.append(table)
    return tables, bad


def site_parts(tables: list[pa.Table], column: str) -> list[np.ndarray]:
    """A fixed-size-list column of every table as ``(rows, hidden)`` numpy views (no copy)."""
    parts = []
    for table in tables:
        for chunk in table.column(column).chunks:
            width = chunk.type.list_size
            parts.append(chunk.flatten().to_numpy(zero_copy_only=True).reshape(-1, width))
    return parts


class ChunkedArray:
    """A read-only ``(rows, hidden)`` view over memory-mapped parts, read part by part."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.offsets[-1]), *(parts[0].shape[1:] if parts else ()))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        """Rows as numpy would index the full ``(rows, hidden)`` array (ints, negative ints,
        slices, boolean masks, index arrays, and a second index for the columns); only the
        rows asked for are read."""
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        rows = slice(None) if rows is Ellipsis else rows
        index = np.arange(self.shape[0])[rows]  # numpy's rules: bounds, negatives, masks, shapes
        wanted, where = np.unique(index, return_inverse=True)
        return self._gather(wanted)[(where.reshape(np.shape(index)), *rest)]

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), hidden)``: the given sorted row numbers, part by part."""
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.parts[0].dtype if self.parts else np.float32)
        for c in np.unique(part):
            pick = part == c
            out[pick] = self.parts[c][rows[pick] - self.offsets[c]]
        return out
