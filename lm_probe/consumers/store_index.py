"""The runs of a store folder, listed and queried.

A store is a folder of run folders. :class:`StoreIndex` lists them (:attr:`StoreIndex.table`
reads only their metadata) and finds runs by model, site, tag and creation time, as
easyroutine's activation store does. The folder defaults to the ``LM_PROBE_STORE``
environment variable (:func:`store_root`). Runs of the old format are listed and read
too, each with a warning that says how to convert it.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from loguru import logger

from .store_legacy import LegacyRun, is_legacy
from .store_run import StoredRun
from .store_shards import read_info

__all__ = ["StoreIndex", "store_root", "STORE_ENV"]

#: The environment variable naming the default store folder.
STORE_ENV = "LM_PROBE_STORE"


def store_root(path: str | Path | None) -> Path:
    """``path``, or the folder the ``LM_PROBE_STORE`` environment variable names."""
    if path is not None:
        return Path(path)
    env = os.environ.get(STORE_ENV)
    if not env:
        raise ValueError(f"no store folder: pass path=... or set the {STORE_ENV} environment variable "
                         f"(e.g. export {STORE_ENV}=~/lm_probe_store)")
    return Path(env).expanduser()


def _instant(value: datetime | str) -> datetime:
    """An aware datetime (a naive one, or an ISO string without offset, is local time)."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.astimezone() if moment.tzinfo is None else moment


def _has_tag(tags: dict[str, Any], tag: str | dict[str, Any]) -> bool:
    if isinstance(tag, str):
        return tag in tags
    return all(k in tags and tags[k] == v for k, v in tag.items())


class StoreIndex:
    """The runs of a store folder; query them by model, site, tag and creation time.

    Args:
        path: The store folder (default: the ``LM_PROBE_STORE`` environment variable).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = store_root(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no activation store at {self.path}")
        self._runs = {p.name: p for p in sorted(self.path.iterdir())
                      if p.is_dir() and not p.name.startswith(".") and ((p / "state.json").exists() or is_legacy(p))}

    @property
    def leftovers(self) -> list[Path]:
        """Hidden staging folders of passes or conversions that did not finish (``.<run>.writing``,
        ``.<run>.converting``...): not runs; the next pass of that run replaces its own."""
        return [p for p in sorted(self.path.iterdir()) if p.is_dir() and p.name.startswith(".")
                and p.suffix in (".writing", ".converting", ".replaced", ".backup")]

    def _metadata(self, folder: Path) -> dict[str, Any] | None:
        """A run's metadata, or ``None`` (with a warning) when it cannot be read."""
        try:
            meta = json.loads((folder / "metadata.json").read_text()) if is_legacy(folder) else read_info(folder)
            missing = [k for k in ("run", "model", "pool", "sites", "tags", "created") if k not in meta]
            if missing:
                raise KeyError(f"it has no {missing}")
            return meta
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("store {}: run {!r} is skipped, its metadata is unreadable ({}: {}); remove the folder "
                           "or collect the run again", self.path, folder.name, type(err).__name__, err)
            return None

    def _readable(self) -> dict[str, tuple[Path, dict[str, Any]]]:
        """``{name: (folder, metadata)}`` of the runs whose metadata can be read."""
        found = {name: (folder, self._metadata(folder)) for name, folder in self._runs.items()}
        return {name: (folder, meta) for name, (folder, meta) in found.items() if meta is not None}

    @property
    def table(self) -> pd.DataFrame:
        """One row per run: name, model, pool, sites, examples, rows, whether the run holds all
        of the data it was collected from (``complete``; ``False`` after ``max_tokens=`` or a
        conversion that lost rows, ``None`` for runs that do not say) and ``max_tokens``, tags,
        created, format."""
        rows = []
        for name, (folder, meta) in self._readable().items():
            rows.append({"run": name, "model": meta["model"].get("name"), "pool": meta["pool"],
                         "sites": [s["spec"] for s in meta["sites"]], "n_examples": meta.get("n_examples"),
                         "n_rows": meta.get("n_rows", meta.get("n_examples")), "complete": meta.get("complete"),
                         "max_tokens": meta.get("max_tokens"), "tags": meta["tags"],
                         "created": meta["created"], "format": "old (npy)" if is_legacy(folder) else "arrow"})
        table = pd.DataFrame(rows, columns=["run", "model", "pool", "sites", "n_examples", "n_rows", "complete",
                                            "max_tokens", "tags", "created", "format"])
        return table.astype({"max_tokens": "Int64"})

    def runs(self, *, model: str | None = None, site: str | None = None, tag: str | dict[str, Any] | None = None,
             created_after: datetime | str | None = None,
             created_before: datetime | str | None = None) -> list[StoredRun | LegacyRun]:
        """The runs matching every filter given, opened, in name order.

        Args:
            model: A model name or config hash.
            site: A site spec or module path the run holds.
            tag: A tag name the run has, or ``{name: value}`` pairs it has.
            created_after, created_before: A datetime or ISO string (naive: local time).
        """
        after = None if created_after is None else _instant(created_after)
        before = None if created_before is None else _instant(created_before)
        out = []
        for folder, meta in self._readable().values():
            created = _instant(meta["created"])
            if model is not None and model not in (meta["model"].get("name"), meta["model"].get("config_hash")):
                continue
            if site is not None and not any(site in (s["spec"], s["name"]) for s in meta["sites"]):
                continue
            if tag is not None and not _has_tag(meta["tags"], tag):
                continue
            if (after is not None and created <= after) or (before is not None and created >= before):
                continue
            out.append(StoredRun.open(folder))
        return out

    def run(self, name: str, *, model: str | None = None, sites: Iterable[str] = (),
            verify: bool = False) -> StoredRun | LegacyRun:
        """Open one run, checking it is of ``model`` and has ``sites`` (ValueError otherwise);
        ``verify=True`` hashes its shards against their recorded SHA-256 (see :meth:`StoredRun.open`)."""
        if name not in self._runs:
            raise KeyError(f"no run {name!r} in {self.path}; runs are {list(self._runs)}")
        run = StoredRun.open(self._runs[name], verify=verify)
        run.check(model=model, sites=sites)
        return run

    def __len__(self) -> int:
        return len(self._runs)

    def __repr__(self) -> str:
        return f"StoreIndex({str(self.path)!r}, runs={list(self._runs)})"


def utc_now() -> str:
    """The current time as an ISO string with its UTC offset (what runs record as ``created``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
