"""``lm-probe run`` under ``torchrun``: the process group, each rank's device, one decision.

``torchrun --nproc-per-node K -m lm_probe run experiment.toml`` starts K processes whose
environment holds ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``. :func:`process_group` then
initializes ``torch.distributed`` before the plan is built (NCCL when CUDA is available, each
rank on the GPU ``LOCAL_RANK``; gloo on the CPU), so each seed's
:class:`~lm_probe.ProbeRunner` detects the group and runs data parallel
(:mod:`lm_probe.core.distributed`); it destroys the group at the end. :func:`agree` makes every
rank take the same decision on the plan: when planning fails on any rank (a bad file, or an
output folder that holds a run on one rank's file system), every rank fails before any
forward pass. Rank 0 alone prints and writes (:func:`lm_probe.app.outputs.run_plan`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch
from loguru import logger

from .problems import ExperimentError

__all__ = ["torchrun_env", "process_group", "rank_device", "agree", "settle"]

T = TypeVar("T")


def torchrun_env() -> tuple[int, int, int] | None:
    """``(world_size, rank, local_rank)`` from torchrun's environment, or ``None`` for one process
    (``WORLD_SIZE`` unset or 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    return world, rank, int(os.environ.get("LOCAL_RANK", rank))


def _dist() -> Any:
    import torch.distributed as dist

    return dist


@contextmanager
def process_group() -> Iterator[int]:
    """Under torchrun: initialize the default process group (NCCL and this rank's GPU when CUDA is
    available, else gloo), silence lm_probe's logs on ranks other than 0, yield this rank, and
    destroy the group at the end. Alone, or when a group exists already: yield the rank, touch nothing."""
    dist, env = _dist(), torchrun_env()
    if env is None or not dist.is_available() or dist.is_initialized():
        yield dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return
    _, rank, local_rank = env
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if rank != 0:
        logger.disable("lm_probe")
    try:
        yield rank
    finally:
        dist.destroy_process_group()


def rank_device(device: str | None) -> str | None:
    """The device map this rank loads the model with: under torchrun with CUDA, the GPU
    ``LOCAL_RANK`` (whatever GPU placement the file asks for: each rank holds a whole model),
    unless the file asks for ``"cpu"``; otherwise ``device`` itself."""
    env = torchrun_env()
    if env is None or not torch.cuda.is_available() or device == "cpu":
        return device
    return f"cuda:{env[2]}"


def agree(build: Callable[[], T]) -> T:
    """``build()`` on every rank of the process group, with one outcome for all: when it raises on
    any rank, every rank raises (its own error, or the first failing rank's). Alone: ``build()``.

    The gathered value is a one-key dict, as the runner's set-up check gathers, so that a rank whose
    ``build`` failed before building a runner meets the others' check as a named difference.
    """
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return build()
    result, error = None, None
    try:
        result = build()
    except Exception as err:  # noqa: BLE001 (re-raised below, on every rank)
        error = err
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"plan error": None if error is None else _message(error)})
    failed = [(r, g.get("plan error")) for r, g in enumerate(gathered) if g.get("plan error")]
    if failed and error is None:
        error = ExperimentError(f"rank {failed[0][0]} could not plan the run: {failed[0][1]}")
    if error is not None:
        error.every_rank = True  # type: ignore[attr-defined]  (see settle)
        raise error
    return result  # type: ignore[return-value]


def settle(err: BaseException) -> None:
    """After printing an error that every rank raised (from :func:`agree`), wait until every rank
    has printed its own: torchrun stops the other workers as soon as one exits with an error."""
    dist = _dist()
    if getattr(err, "every_rank", False) and dist.is_available() and dist.is_initialized():
        dist.barrier()


def _message(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
