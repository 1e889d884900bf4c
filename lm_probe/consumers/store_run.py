"""A stored run: an Arrow dataset of pooled activations, on disk or on the Hugging Face hub.

:meth:`StoredRun.open` takes a run folder (``datasets.load_from_disk`` opens the same folder
as a plain dataset), ``"hub:org/name"`` (a dataset repository that
:meth:`StoredRun.push_to_hub` wrote, loaded with ``datasets.load_dataset``), or a folder of
the old chunked format (read with a warning, see :mod:`.store_legacy`). Shards are
memory-mapped: a run larger than memory works, and rows are read only when asked for.
:meth:`~lm_probe.consumers.store_base.RunRows.rename` and ``remove`` manage a run inside its store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

from ..core.versions import check_schema_version
from .store_base import RunRows
from .store_legacy import LegacyRun, is_legacy
from .store_shards import SCHEMA_VERSION, ChunkedArray, read_info, read_shards, site_parts, write_info

__all__ = ["StoredRun", "HUB_PREFIX", "METADATA_FILE"]

#: A source string that names a hub dataset repository: ``"hub:org/name"``.
HUB_PREFIX = "hub:"
#: The file beside a pushed run's data that holds lm_probe's metadata (the hub keeps no description).
METADATA_FILE = "lm_probe_run.json"


class StoredRun(RunRows):
    """One run of a store, read from its Arrow shards (see :class:`RunRows` for the reads).

    Args:
        path: The run folder (``state.json``, ``dataset_info.json``, ``data-*.arrow``).

    Attributes:
        metadata: Model and config hash, sites, pooling, tokenizer, dataset fingerprint,
            lm_probe version, creation time, tags, and the shards with their rows and bytes.
        bad_shards: Shard files left out (truncated, corrupted, or with ``verify=True`` a
            ``"checksum mismatch"``), with the reason.
        source: Where it was opened from (the folder, or ``"hub:org/name"``).
    """

    def __init__(self, path: str | Path, *, verify: bool = False) -> None:
        self.path = self.source = Path(path)
        if not (self.path / "state.json").exists():
            raise FileNotFoundError(f"{self.path} has no state.json: it is not a stored run, or the pass that "
                                    "wrote it did not finish")
        metadata = read_info(self.path)
        check_schema_version(metadata, SCHEMA_VERSION, "store", self.path)
        if verify and not all(s.get("sha256") for s in metadata["shards"]):
            logger.warning("store run {!r} was written without shard checksums (before lm_probe recorded "
                           "them): verify=True checks only its sizes and row counts", metadata["run"])
        tables, bad = read_shards(self.path, metadata["shards"], verify=verify)
        for file, problem in bad.items():
            rows = next(s["rows"] for s in metadata["shards"] if s["file"] == file)
            logger.warning("store run {!r}: shard {} is unreadable ({}); its {} rows are left out, the other "
                           "shards are fine", metadata["run"], file, problem, rows)
        self._load(metadata, tables, bad)

    def _load(self, metadata: dict[str, Any], tables: list, bad: dict[str, str]) -> None:
        self.metadata, self.bad_shards, self._tables = metadata, bad, tables
        self._arrays = [ChunkedArray(site_parts(tables, s.get("column", s["spec"]))) for s in metadata["sites"]]
        self._ids = _column(tables, "example_id", np.int64)
        self._labels = _column(tables, "label", None)
        names = set(tables[0].column_names) if tables else set()
        if metadata["pool"] == "none":
            self._token_ids = _column(tables, "token_id", np.int64) if "token_id" in names else None
        elif {"n_tokens", "token_hash"} <= names:  # runs written before these columns are not checked
            self._n_tokens, self._hashes = _column(tables, "n_tokens", np.int64), _column(tables, "token_hash", np.int64)
        self._index_rows()

    @classmethod
    def open(cls, source: str | Path, *, cache_dir: str | Path | None = None, token: str | None = None,
             verify: bool = False) -> "StoredRun | LegacyRun":
        """Open a run folder, an old-format run folder (with a warning), or ``"hub:org/name"``.

        Args:
            source: A folder, or ``"hub:"`` and a hub dataset id (or a local folder standing in for one).
            cache_dir, token: For ``datasets.load_dataset`` of a hub run.
            verify: Hash every shard of a run folder against the SHA-256 recorded when it was
                written (reads every byte once): a mismatch (flipped bits inside the data, which
                the default size/row checks do not see) leaves the shard out like a corrupted
                one, in ``bad_shards`` as ``"checksum mismatch"``. Old-format and hub runs carry
                no checksums: they open with a warning saying so.
        """
        text = str(source)
        if text.startswith(HUB_PREFIX):
            if verify:
                logger.warning("{} is read through datasets, not from lm_probe's shards: verify=True has no "
                               "checksums to check", text)
            return cls._from_hub(text[len(HUB_PREFIX):], cache_dir=cache_dir, token=token)
        path = Path(source)
        if is_legacy(path):
            if verify:
                logger.warning("the old-format run at {} carries no checksums: verify=True checks nothing more "
                               "(convert it with `lm-probe store convert` to record them)", path)
            return LegacyRun(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no stored run at {path} (for a hub dataset write 'hub:org/name')")
        return cls(path, verify=verify)

    @classmethod
    def _from_hub(cls, repo_id: str, *, cache_dir: str | Path | None, token: str | None) -> "StoredRun":
        import datasets

        local = Path(repo_id).is_dir()  # a folder laid out as the hub repository (offline, tests)
        if local:
            meta_file = Path(repo_id) / METADATA_FILE
        else:
            from huggingface_hub import hf_hub_download

            meta_file = Path(hf_hub_download(repo_id, METADATA_FILE, repo_type="dataset", token=token))
        if not meta_file.exists():
            raise FileNotFoundError(f"{repo_id} has no {METADATA_FILE}: it was not pushed by StoredRun.push_to_hub")
        metadata = json.loads(meta_file.read_text())
        check_schema_version(metadata, SCHEMA_VERSION, "store", repo_id)
        data = datasets.load_dataset(repo_id, split="train", cache_dir=None if cache_dir is None else str(cache_dir),
                                     token=token)
        run = cls.__new__(cls)
        run.path, run.source, run._dataset = None, f"{HUB_PREFIX}{repo_id}", data
        run._load(metadata, [data.data.table], {})
        return run

    @property
    def positions(self) -> np.ndarray:
        """``(rows,)`` each token's position in its example (token runs only)."""
        return self._token_column("position")

    @property
    def token_ids(self) -> np.ndarray:
        """``(rows,)`` each row's token id (token runs only)."""
        return self._token_column("token_id")

    def _token_column(self, name: str) -> np.ndarray:
        if self.pool != "none":
            raise ValueError(f"run {self.name!r} has one row per example (pool={self.pool!r}): no {name} column")
        return _column(self._tables, name, np.int64)

    @property
    def dataset(self) -> Any:
        """The run's readable rows as a ``datasets.Dataset`` (memory-mapped; the metadata in its info)."""
        if getattr(self, "_dataset", None) is not None:
            return self._dataset
        import datasets

        info = datasets.DatasetInfo(description=json.dumps(self.metadata, default=str),
                                    features=datasets.Features.from_arrow_schema(self._tables[0].schema)
                                    if self._tables else None)
        parts = [datasets.Dataset.from_file(str(self.path / s["file"]), info=info) for s in self.metadata["shards"]
                 if s["file"] not in self.bad_shards]
        return datasets.concatenate_datasets(parts, info=info) if parts else None

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None) -> None:
        """Upload the run as a hub dataset (``datasets.Dataset.push_to_hub``) and its metadata
        beside it (``lm_probe_run.json``); ``StoredRun.open("hub:" + repo_id)`` reads it back.
        A run with unreadable shards is refused (it would publish part of the run)."""
        if self.bad_shards:
            raise ValueError(f"run {self.name!r} has unreadable shards {sorted(self.bad_shards)}: pushing it "
                             "would publish part of the run; collect it again first")
        from huggingface_hub import HfApi

        message = commit_message or f"lm_probe run {self.name!r}"
        self.dataset.push_to_hub(repo_id, private=private, token=token, commit_message=message)
        HfApi(token=token).upload_file(path_or_fileobj=json.dumps(self.metadata, indent=1, default=str).encode(),
                                       path_in_repo=METADATA_FILE, repo_id=repo_id, repo_type="dataset",
                                       commit_message=message)

    def _write_metadata(self, folder: Path) -> None:
        write_info(folder, self.metadata)

    def _release(self) -> None:
        self._tables, self._arrays = [], []  # drop the memory maps


def _column(tables: list, name: str, dtype: Any) -> np.ndarray:
    parts = [t.column(name).to_numpy() for t in tables]
    return np.concatenate(parts).astype(dtype or parts[0].dtype, copy=False) if parts else np.zeros(0, dtype or int)
