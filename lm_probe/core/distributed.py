"""Data parallelism on torch.distributed: each rank traces a shard, every rank sees the batch.

Under ``torchrun --nproc-per-node K`` (or any launcher that calls
``torch.distributed.init_process_group``), a runner's source is wrapped in a
:class:`DataParallelSource`. The runner's loop is unchanged: it makes the *global* batch of
``K x batch_size`` examples, in the same seeded order one process with
``batch_size = K x batch_size`` would make it, and asks the source for its pooled rows.
The source traces only this rank's contiguous shard of that batch (its rows of the padded
global batch, so padding and positions are those of the single process), then all-gathers
the pooled rows of every request, so every consumer on every rank receives exactly the
global batch of the single process. Probe updates then run identically on every rank (no
broadcast of weights is needed), and the replay cache on each rank keeps the gathered rows.

What it costs: per batch, one small ``all_gather_object`` (a digest of the batch and the
row counts) and one ``all_gather`` of ``rows x hidden`` per request. Shards may be uneven or
empty (a last batch, or a dataset smaller than ``K x batch_size``): row counts are gathered
first and each rank's rows padded to the largest before the tensor gather.

Faults: :func:`data_parallel` compares a fingerprint of each rank's setup (seed, sites,
probe configurations, consumers, model) before any forward and raises
:class:`DistributedMismatchError` on every rank if they differ; each read compares a digest
of the global batch (its token ids, labels and requests), so ranks given other data, seeds
or batch sizes fail at their first batch instead of mixing rows. A rank that raises leaves
the others waiting in a collective: ``torchrun`` ends them at once when a worker fails;
other launchers rely on the ``timeout=`` of ``init_process_group`` (default 10 minutes for
gloo and NCCL), after which the waiting ranks raise too.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from loguru import logger

from .batching import Batch
from .consumer import HostArrays, Request
from .dataset import ProbeDataset
from .sites import Site

__all__ = ["DataParallelSource", "DistributedMismatchError", "data_parallel", "fingerprint", "is_writer",
           "wait_for_writer", "world_size", "shard_rows"]


class DistributedMismatchError(ValueError):
    """Ranks of one data-parallel run disagree on their setup or on a batch."""


def shard_rows(n: int, world_size: int, rank: int) -> slice:
    """This rank's contiguous rows of a global batch of ``n``: sizes differ by at most one,
    the first ranks take the extra rows, a rank past ``n`` gets an empty slice."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def _differences(gathered: Sequence[Mapping[str, Any]]) -> list[str]:
    """``"key: rank 0 has ..., rank 1 has ..."`` for each key whose values differ across ranks."""
    lines = []
    for key in dict.fromkeys(k for g in gathered for k in g):
        values = [g.get(key) for g in gathered]
        if any(v != values[0] for v in values):
            shown = ", ".join(f"rank {r} has {str(v)[:120]}" for r, v in enumerate(values))
            lines.append(f"{key}: {shown}")
    return lines


class DataParallelSource:
    """A source that traces this rank's shard of each global batch and gathers every rank's rows.

    Args:
        inner: The source of this rank (a :class:`~lm_probe.core.sources.TraceSource`).
        group: The process group (default: the whole world).

    Attributes:
        rank, world_size: This process's rank and the number of ranks in ``group``.
    """

    replayable = False

    def __init__(self, inner: Any, group: Any = None) -> None:
        dist = _dist()
        self.inner, self.group = inner, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.backend = dist.get_backend(group)

    def _device(self) -> torch.device:
        """Where the collectives run: the current GPU for NCCL, else the host."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def agree(self, setup: Mapping[str, Any]) -> None:
        """Check that every rank has the same ``setup`` (plain, comparable values).

        Raises:
            DistributedMismatchError: on every rank, naming each differing key and its values.
        """
        gathered: list[Any] = [None] * self.world_size
        _dist().all_gather_object(gathered, dict(setup), group=self.group)
        differences = _differences(gathered)
        if differences:
            raise DistributedMismatchError(
                "the ranks of this data-parallel run were set up differently (each rank must build the same "
                "runner, with the same model, sites, probes, consumers and seed):\n  " + "\n  ".join(differences))

    def read(self, batch: Batch, data: ProbeDataset, requests: Sequence[Request]) -> HostArrays:
        """``{request: (rows, hidden)}`` of the whole global ``batch``, in its order, on every rank."""
        rows = shard_rows(len(batch.index), self.world_size, self.rank)
        mine = Batch(batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows], batch.index[rows])
        local = self.inner.read(mine, data, requests) if len(mine.index) else {}
        tensors = {r: _as_tensor(local, r) for r in requests} if len(mine.index) else {}
        shapes = {r: (tuple(t.shape), str(t.dtype)) for r, t in tensors.items()}
        gathered: list[Any] = [None] * self.world_size
        _dist().all_gather_object(gathered, {"batch": _digest(batch, requests), "shapes": shapes}, group=self.group)
        if any(g["batch"] != gathered[0]["batch"] for g in gathered):
            raise DistributedMismatchError(
                f"the ranks made different batches (digests {[g['batch'][:12] for g in gathered]}): every rank must "
                "run the same dataset, in the same order, with the same seed, batch_size and requests")
        return HostArrays({r: self._gather(tensors.get(r), [g["shapes"].get(r) for g in gathered])
                           for r in requests})

    def _gather(self, local: torch.Tensor | None, shapes: list[Any]) -> torch.Tensor:
        """Every rank's rows of one request, concatenated in rank order (padded for the gather)."""
        shape, dtype = next(s for s in shapes if s is not None)
        counts = [0 if s is None else s[0][0] for s in shapes]
        home = local.device if local is not None else (
            torch.device("cpu") if getattr(self.inner, "to_cpu", True) else self._device())
        padded = torch.zeros((max(counts), *shape[1:]), dtype=getattr(torch, dtype.split(".")[-1]),
                             device=self._device())
        if local is not None:
            padded[:len(local)] = local.to(padded.device)
        parts = [torch.empty_like(padded) for _ in counts]
        _dist().all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(home)

    def resolve(self, specs: Iterable[str]) -> dict[str, Site]:
        return self.inner.resolve(specs)

    def barrier(self) -> None:
        """Wait for every rank (after rank 0 wrote files the others may read)."""
        _dist().barrier(group=self.group)

    def __repr__(self) -> str:
        return f"DataParallelSource(rank {self.rank} of {self.world_size}, {self.backend}, {self.inner!r})"


def _as_tensor(values: Mapping[Request, Any], request: Request) -> torch.Tensor:
    if isinstance(values, HostArrays):
        return values.tensors[request]
    return torch.as_tensor(np.ascontiguousarray(values[request]))


def _digest(batch: Batch, requests: Sequence[Request]) -> str:
    """A digest of a global batch: its token ids, mask, labels and the requests read."""
    h = hashlib.sha256()
    for part in (batch.input_ids, batch.attention_mask):
        h.update(np.ascontiguousarray(part.numpy()).tobytes())
    h.update(np.ascontiguousarray(np.asarray(batch.labels)).tobytes())
    h.update(repr(sorted(requests)).encode())
    return h.hexdigest()


def data_parallel(source: Any, distributed: bool | None, setup: Mapping[str, Any]) -> Any:
    """``source`` wrapped in a :class:`DataParallelSource` when this process is one of several
    ranks of an initialized process group (``distributed=None``: detected; ``False``: never),
    after checking that every rank has the same ``setup``; otherwise ``source`` itself.
    Ranks other than 0 stop lm_probe's log messages (``logger.enable("lm_probe")`` restores them).

    Raises:
        ValueError: ``distributed=True`` without an initialized process group.
        DistributedMismatchError: the ranks' ``setup`` differ (before any forward).
    """
    dist = _dist()
    ready = dist.is_available() and dist.is_initialized()
    if distributed and not ready:
        raise ValueError("distributed=True needs torch.distributed.init_process_group(...) first "
                         "(torchrun sets the environment it reads)")
    if distributed is False or not ready or dist.get_world_size() == 1:
        return source
    wrapped = DataParallelSource(source)
    wrapped.agree(setup)
    if wrapped.rank != 0:
        logger.disable("lm_probe")
    return wrapped


def fingerprint(model: Any, configs: Sequence[Any], consumers: Sequence[Any], **values: Any) -> dict[str, Any]:
    """What every rank of one run must agree on: the model's class, size and config, each probe
    configuration, each consumer's class and sites (probes included), and ``values`` (the seed...)."""
    module = getattr(model, "_module", model)
    config = getattr(module, "config", None)
    return {"model": (type(module).__name__, sum(p.numel() for p in module.parameters()),
                      config.to_json_string() if hasattr(config, "to_json_string") else None),
            "probe configs": [repr(sorted(vars(c).items())) for c in configs],
            "sites": [(type(c).__name__, list(c.site_specs())) for c in consumers], **values}


def world_size(source: Any) -> int:
    """Processes that share each batch read from ``source`` (its ranks; 1 in one process)."""
    return getattr(source, "world_size", 1)


def is_writer(source: Any) -> bool:
    """Whether this process writes files for a runner reading ``source`` (rank 0, or no ranks)."""
    return getattr(source, "rank", 0) == 0


def wait_for_writer(source: Any) -> None:
    """Under data parallelism, wait until every rank gets here (rank 0 has written its files)."""
    if isinstance(source, DataParallelSource):
        source.barrier()

