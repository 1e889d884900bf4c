"""The replay cache: each training example traced once, its pooled rows replayed.

The model is frozen while probes train, so a second epoch that traced the training set
again would recompute activations that were already pooled. In ``fit_probes`` the first
epoch traces each batch once (stopping after the deepest site still needed), and a
:class:`ReplayCache`, riding that epoch as one more consumer, keeps the pooled rows of
the requests that still-active probes read. Epochs 2..n take seeded batches (a new plain
shuffle each epoch: only a traced batch has padding to save by grouping lengths) and read
their rows from the cache: no trace runs. Validation and test activations are pooled once
each, outside the cache.

What it costs: ``rows x hidden x 4`` bytes per cached ``(site, pooling)`` request, where
rows is the number of fit examples (one per example) or of their real tokens (for
``pool="none"``). It grows with examples, hidden size and requests, never with the tokens
of pooled requests. The demo (1,440 fit examples, 11 requests at hidden size 576) keeps
36.5 MB. Requests are held in memory while the total stays within
:attr:`Cache.memory_budget`; the rest are written to memory-mapped files in a temporary
folder (under :attr:`Cache.spill_dir`), removed when ``fit_probes`` returns. A request no
active probe reads any more (its probes stopped early) is dropped at once.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from loguru import logger

from .batching import Batch
from .consumer import Consumer, Group, NotComputedError, PooledBatch, Request
from .dataset import ProbeDataset
from .sites import Site

__all__ = ["Cache", "ReplayCache"]

GiB = 1024**3


@dataclass(frozen=True)
class Cache:
    """How ``fit_probes`` keeps the first epoch's pooled rows for the later epochs.

    Pass ``cache=None`` to ``fit_probes`` to trace every epoch instead (the model then runs
    ``num_epochs`` times per training example).

    Args:
        memory_budget: Bytes of cached rows held in memory (default 2 GiB); requests
            beyond it are spilled to memory-mapped files.
        spill_dir: Folder for the spilled files (default: the system's temporary folder).
    """

    memory_budget: int = 2 * GiB
    spill_dir: str | Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.memory_budget, (int, np.integer)) or self.memory_budget < 0:
            raise ValueError(f"memory_budget must be a number of bytes >= 0, got {self.memory_budget!r}")
        if self.spill_dir is not None and not Path(self.spill_dir).is_dir():
            raise ValueError(f"spill_dir {str(self.spill_dir)!r} is not an existing folder; create it or leave "
                             "spill_dir=None for the system's temporary folder")


class ReplayCache(Group):
    """Records the first epoch's pooled rows of a fit split; a source for the later epochs.

    As a consumer it reads the requests of the still-active ``trainers`` (so it never
    keeps a site in the forward that no probe needs); as a source (:meth:`read`) it gives
    any batch of the same split back from the cache.

    Args:
        data: The fit split (rows are kept by its positions).
        trainers: The probe consumers whose requests are cached (probes, the torch bank).
        settings: Memory budget and spill folder.

    Attributes:
        nbytes_in_memory: Bytes of rows held in memory.
        nbytes_spilled: Bytes of rows in memory-mapped files.
    """

    replayable = True

    def __init__(self, data: ProbeDataset, trainers: Sequence[Consumer], settings: Cache = Cache()) -> None:
        self.data, self.trainers, self.settings = data, list(trainers), settings
        lengths = np.array([len(r) for r in data.ids], np.int64)
        self._token_offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._rows: dict[Request, np.ndarray] = {}
        self._filled: dict[Request, int] = {}
        self._n_batches = 0
        self._n_files = 0
        self.nbytes_in_memory = self.nbytes_spilled = 0
        self._folder: Path | None = None
        self._cleanup: Any = None

    @property
    def members(self) -> list:
        return self.trainers

    def site_specs(self) -> list[str]:
        return []

    # ------------------------------------------------------------------ recording
    def _rows_of(self, request: Request, index: np.ndarray) -> np.ndarray:
        """Cache rows of the examples at dataset positions ``index``, in that order."""
        if request[1] != "none":
            return np.asarray(index, np.int64)
        off = self._token_offsets
        return np.concatenate([np.arange(off[i], off[i + 1]) for i in index]) if len(index) else np.zeros(0, int)

    def _n_rows(self, request: Request) -> int:
        """Rows of a request over the whole split: one per example, or every real token."""
        return len(self.data) if request[1] != "none" else int(self._token_offsets[-1])

    def _allocate(self, request: Request, hidden: int, dtype: np.dtype) -> np.ndarray:
        n = self._n_rows(request)
        nbytes = n * hidden * np.dtype(dtype).itemsize
        if self.nbytes_in_memory + nbytes <= self.settings.memory_budget:
            self.nbytes_in_memory += nbytes
            return np.empty((n, hidden), dtype)
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="lm_probe_cache_", dir=self.settings.spill_dir))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._folder, True)
            logger.info("replay cache: over its memory budget of {:.1f} MiB; spilling to {}",
                        self.settings.memory_budget / 2**20, self._folder)
        self.nbytes_spilled += nbytes
        self._n_files += 1
        path = self._folder / f"request_{self._n_files}.f{np.dtype(dtype).itemsize * 8}"
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, hidden))

    def update(self, batch: PooledBatch) -> None:
        wanted = self.requests
        for request in [r for r in self._rows if r not in wanted]:  # its probes stopped: not replayed
            self._drop(request)
        for request in wanted:  # (probes only stop: a dropped request is never wanted again)
            value = np.asarray(batch.acts[request])
            if request not in self._rows:
                self._rows[request] = self._allocate(request, value.shape[1], value.dtype)
                self._filled[request] = 0
            self._rows[request][self._rows_of(request, batch.index)] = value
            self._filled[request] += value.shape[0]
        self._n_batches += 1

    def _drop(self, request: Request) -> None:
        array = self._rows.pop(request)
        if isinstance(array, np.memmap):
            self.nbytes_spilled -= array.nbytes
        else:
            self.nbytes_in_memory -= array.nbytes

    def compute(self) -> dict[str, Any]:
        """What the cache holds: requests, rows, bytes in memory and spilled.

        Raises:
            NotComputedError: no batch was recorded yet.
        """
        if not self._n_batches:
            raise NotComputedError("the replay cache has recorded no batch yet")
        return {"requests": list(self._rows), "examples": len(self.data),
                "nbytes_in_memory": self.nbytes_in_memory, "nbytes_spilled": self.nbytes_spilled,
                "spill_folder": None if self._folder is None else str(self._folder)}

    def reset(self) -> None:
        """Back to the empty state: no rows, no spill folder."""
        self.close()
        self._rows, self._filled, self._n_batches = {}, {}, 0
        self.nbytes_in_memory = self.nbytes_spilled = 0

    def close(self) -> None:
        """Free the rows and remove the spill folder."""
        self._rows.clear()
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup, self._folder = None, None

    # ------------------------------------------------------------------ source
    def read(self, batch: Batch, data: ProbeDataset, requests: Sequence[Request]) -> dict[Request, np.ndarray]:
        """The cached rows of a batch of the fit split, for each request."""
        if data is not self.data:
            raise ValueError("the replay cache holds the rows of another dataset")
        out = {}
        for request in requests:
            rows = self._rows.get(request)
            if rows is None or self._filled[request] != self._n_rows(request):
                raise RuntimeError(f"the replay cache has no complete rows for {request}; "
                                   "only requests of probes active through the first epoch are cached")
            out[request] = rows[self._rows_of(request, batch.index)]
        return out

    def resolve(self, specs: Iterable[str]) -> dict[str, Site]:
        raise RuntimeError("the replay cache holds pooled rows only; sites are resolved by the runner's source")

    def __repr__(self) -> str:
        return (f"ReplayCache({len(self._rows)} requests, {self.nbytes_in_memory / 2**20:.1f} MiB in memory, "
                f"{self.nbytes_spilled / 2**20:.1f} MiB spilled)")
