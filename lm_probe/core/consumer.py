"""The consumer protocol: everything downstream of the one trace per batch.

The runner traces the model once per batch, pools each requested site, and hands the
result to every active consumer as a :class:`PooledBatch`. Probes, the torch probe bank,
geometry accumulators, logit lenses, diffusion gauges, stores and the replay cache are
all consumers, met the same way, so adding one never changes the runner's loop. The
protocol follows torchmetrics' ``Metric``:

* ``start(context)``: called once before a pass with a :class:`RunContext`, the one
  frozen description of the pass (model, resolved sites, data, batch size; for probes
  also their training settings, ``context.training``). A consumer checks its own input
  here, before any forward pass, and keeps only what it needs from it;
* ``requests``: the ``(site spec, pooling)`` pairs the consumer reads; the runner
  reads the union of the active consumers' requests, each pair once per trace;
* ``update(batch)``: fold in one batch;
* ``compute()``: plain data (a dict or DataFrame); raises :class:`NotComputedError`
  before any data (every consumer, probes included);
* ``merge(other)``: combine state from another instance fed disjoint data, where the
  statistic allows it; the others raise ``NotImplementedError`` ("cannot be merged");
* ``reset()``: back to the empty state, as right after ``start()`` (``compute()`` raises
  again; the settings of the pass are kept, so a second pass over the same data gives the
  same result);
* ``active``: ``False`` once the consumer needs no more batches (a stopped probe), so
  the runner stops reading its sites and can end the forward earlier;
* ``finish()``: called once at the end of a pass;
* ``on_event(event, step, epoch)``: the pass's clock, for consumers that act at
  moments rather than on every batch (``"start"``, ``"step"``, ``"validation"``,
  ``"epoch_end"``, ``"end"``; ``step`` counts completed training steps);
* ``subset_due(event, step, epoch)`` and ``observe(acts, event, step, epoch)``: a
  consumer that reads a fixed set of examples of its own at moments of the pass (the
  diffusion gauge's probe subset) declares it as a :class:`SubsetRequest` when it is
  due; the runner pools it (once per pass: the model is frozen while it runs) and hands
  the rows in with ``observe``. No consumer calls back into the runner;
* ``site_specs()``: every site the consumer may read, checked against the model when
  the runner is built, and again after ``start()``, where a consumer may add sites that
  depend on the model (by default the sites of ``requests``).

Consumers written for the earlier keyword form, ``start(self, *, model=None, **_)``, still
run: :func:`start_consumer` (what the runner calls) passes them the context's fields as
keywords, as before, with a ``FutureWarning``.

Two rules hold for every consumer:

* **Each example once per pass.** ``collect`` is one pass. In ``fit_probes`` the model
  runs once per training example, in the first epoch, and every consumer sees that
  epoch; later epochs replay the pooled rows to the probes alone (see
  :mod:`lm_probe.core.replay`). So nothing but a probe's training can depend on the number
  of epochs: row counts, stored rows and samples are those of one pass.
* **One non-finite policy.** A row with a non-finite value (NaN, inf) is left out by
  whatever reads it, and counted: :func:`finite_rows` is the test, and each consumer
  reports its count (``n_nonfinite_``) and warns with the site's name. A consumer that
  pairs rows across sites leaves a row out at every site.

``tests/conformance.py`` holds the harness every consumer passes; ``tests/test_conformance.py``
runs each one through it, against an independent reference.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from .sites import Site

__all__ = ["Consumer", "FirstEpochOnly", "PooledBatch", "NotComputedError", "Request", "RunContext", "SubsetRequest", "HostArrays",
           "finite_rows", "requests_of", "start_consumer"]

Request = tuple[str, str]  #: (site spec as written, pooling name)


class NotComputedError(RuntimeError):
    """``compute()`` or a prediction was asked for before any data was seen (a probe
    raises its subclass :class:`~lm_probe.probes.probe.ProbeNotFittedError`, also scikit-learn's
    ``NotFittedError``)."""


@dataclass(frozen=True, eq=False)
class RunContext:
    """What the runner tells every consumer at ``start()``: one frozen value per pass.

    Attributes:
        model: The nnsight model (``None`` when activations come from a store or a source).
        sites: ``{site spec: Site}``, a read-only view of the runner's resolved sites
            (sites a consumer adds in ``start()`` are resolved right after it).
        data: The examples of the pass (in ``fit_probes``: the fit split, without the
            validation share).
        batch_size: Examples per forward pass (``None``: not known; a consumer keeps its own).
        training: ``{probe name: lm_probe.probes.training.Training}``, the settings ``fit_probes``
            decided for each probe (classes, cached validation rows, early stopping...);
            empty for other consumers and in ``collect``. A probe missing here trains
            with the defaults of :class:`~lm_probe.probes.training.Training`.
        writer: Whether this process writes files: ``False`` on the data-parallel ranks other
            than 0 (:mod:`lm_probe.core.distributed`), which see the same rows as rank 0.
        max_tokens: ``collect(max_tokens=...)``: the pass stops after this many real tokens
            (``None``: it runs over all of ``data``).
    """

    model: Any = None
    sites: Mapping[str, Site] = field(default_factory=dict)
    data: Any = None
    batch_size: int | None = None
    training: Mapping[str, Any] = field(default_factory=dict)
    writer: bool = True
    max_tokens: int | None = None

    def as_keywords(self) -> dict[str, Any]:
        """The keywords of the earlier ``start(**context)`` form (without ``runner``)."""
        return {"model": self.model, "sites": dict(self.sites), "data": self.data, "batch_size": self.batch_size}


@dataclass(frozen=True, eq=False)
class SubsetRequest:
    """A fixed set of examples whose pooled activations a consumer reads at moments of the
    pass, not on every batch (a diffusion gauge's probe subset).

    A consumer returns the same request from :meth:`Consumer.subset_due` whenever it is
    due; the runner pools it at most once per pass (compared by identity: keep one
    request per pass) and hands the rows in with :meth:`Consumer.observe`.

    Attributes:
        data: The examples (a :class:`~lm_probe.core.dataset.ProbeDataset`), pooled in order.
        requests: ``(site spec, pooling)`` pairs to pool; their sites must be among the
            consumer's ``site_specs()``.
        batch_size: Examples per forward pass.
    """

    data: Any
    requests: tuple[Request, ...]
    batch_size: int = 16


def finite_rows(X: Any) -> np.ndarray:
    """``(rows,)`` bool: the rows of ``X (rows, hidden)`` whose values are all finite
    (the one test of the non-finite policy; works on numpy arrays and torch tensors)."""
    if isinstance(X, torch.Tensor):
        return torch.isfinite(X).all(-1).cpu().numpy()
    X = np.asarray(X)
    return np.isfinite(X).all(-1) if X.ndim > 1 else np.isfinite(X)


class HostArrays(Mapping):
    """``{request: numpy array}`` over ``{request: torch tensor}``, each converted to a host
    array on first access (free for CPU tensors). Consumers that work in torch (the
    torch probe backend) read ``tensors`` directly, so activations left on an
    accelerator by the trace are copied to the host only if a numpy consumer asks."""

    def __init__(self, tensors: dict[Request, torch.Tensor]) -> None:
        self.tensors = tensors
        self._arrays: dict[Request, np.ndarray] = {}

    def __getitem__(self, key: Request) -> np.ndarray:
        if key not in self._arrays:
            self._arrays[key] = self.tensors[key].detach().cpu().numpy()
        return self._arrays[key]

    def __iter__(self) -> Iterator[Request]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


@dataclass
class PooledBatch:
    """What one trace gives the consumers.

    Attributes:
        acts: ``{(site spec, pool): (rows, hidden) float32 array}`` (a :class:`HostArrays`
            when the activations come from a trace; :meth:`tensor` reads them as tensors).
        labels: ``(batch,)`` integer labels, or ``None`` for unlabeled passes.
        step: Zero-based index of this training batch within the pass.
        epoch: Zero-based epoch.
        index: ``(batch,)`` dataset positions of the examples.
        n_tokens: ``(batch,)`` number of real tokens per example.
        token_labels: Token tasks: labels of the token rows (``pool="none"`` order).
        example_ids: ``(batch,)`` stable ids of the examples (``ProbeDataset.example_ids``),
            for consumers whose state must not depend on the order rows arrive in.
    """

    acts: Mapping[Request, np.ndarray]
    labels: np.ndarray | None = None
    step: int = 0
    epoch: int = 0
    index: np.ndarray | None = None
    n_tokens: np.ndarray | None = field(default=None, repr=False)
    token_labels: np.ndarray | None = field(default=None, repr=False)
    example_ids: np.ndarray | None = field(default=None, repr=False)

    def row_ids(self, token: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(example id, token position)`` of every row: one row per example
        (position 0), or every real token (``token=True``, the ``pool="none"`` order).
        Without ``example_ids`` the dataset positions (``index``) stand in."""
        ids = self.example_ids if self.example_ids is not None else self.index
        if ids is None:
            raise ValueError("this batch has neither example_ids nor index to identify its rows")
        ids = np.asarray(ids, np.int64)
        if not token:
            return ids, np.zeros(len(ids), np.int64)
        counts = np.asarray(self.n_tokens, np.int64)
        starts = np.cumsum(counts) - counts
        return np.repeat(ids, counts), np.arange(int(counts.sum())) - np.repeat(starts, counts)

    def tensor(self, key: Request, device: torch.device | str | None = None) -> torch.Tensor:
        """The activations of ``key`` as a torch tensor (on ``device`` if given), without a
        host round trip when the trace left them on the device."""
        value = self.acts.tensors[key] if isinstance(self.acts, HostArrays) else torch.from_numpy(
            np.asarray(self.acts[key]))
        return value if device is None else value.to(device)

    def first_tokens(self, budget: int) -> "PooledBatch":
        """This batch cut to its first ``budget`` real tokens, example by example.

        Token rows (``pool="none"``) are cut exactly at the budget; one-row-per-example
        activations keep only the examples whose tokens all fit.
        """
        counts = np.asarray(self.n_tokens)
        cum = np.cumsum(counts)
        whole = int(np.searchsorted(cum, budget, side="right"))
        touched = whole + int(whole < len(counts) and (cum[whole - 1] if whole else 0) < budget)
        source = self.acts.tensors if isinstance(self.acts, HostArrays) else self.acts
        cut: Any = {key: (value[:budget] if key[1] == "none" else value[:whole]) for key, value in source.items()}
        if isinstance(self.acts, HostArrays):
            cut = HostArrays(cut)
        tokens = counts[:touched].copy()
        if touched > whole:
            tokens[-1] = budget - (cum[whole - 1] if whole else 0)
        labels = None if self.labels is None else self.labels[:touched]
        index = None if self.index is None else self.index[:touched]
        token_labels = None if self.token_labels is None else self.token_labels[:budget]
        ids = None if self.example_ids is None else self.example_ids[:touched]
        return PooledBatch(cut, labels, self.step, self.epoch, index, tokens, token_labels, ids)


class Consumer:
    """Base class for anything that reads pooled activations from the runner."""

    #: (site spec, pooling) pairs this consumer reads.
    requests: tuple[Request, ...] = ()

    @property
    def active(self) -> bool:
        """Whether the consumer still wants batches."""
        return True

    def update(self, batch: PooledBatch) -> None:
        """Fold one batch of pooled activations into the state."""
        raise NotImplementedError

    def compute(self) -> Any:
        """Return the result as plain data (dict or DataFrame)."""
        raise NotImplementedError

    def merge(self, other: "Consumer") -> "Consumer":
        """Combine with another instance that saw disjoint data; returns ``self``."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot be merged: its state is not a sufficient statistic"
        )

    def reset(self) -> None:
        """Return to the empty state."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called once when a pass over the data ends."""

    def start(self, context: RunContext) -> None:
        """Called once before a pass with what the runner knows (see :class:`RunContext`)."""

    def on_event(self, event: str, step: int, epoch: int) -> None:
        """A moment of the pass: start, step, validation, epoch_end, end."""

    def subset_due(self, event: str, step: int, epoch: int) -> SubsetRequest | None:
        """The examples of its own this consumer needs pooled at this moment (default: none)."""
        return None

    def observe(self, acts: Mapping[Request, np.ndarray], event: str, step: int, epoch: int) -> None:
        """The pooled rows of the :class:`SubsetRequest` that :meth:`subset_due` gave for
        this moment: ``{request: (rows, hidden) float32 array}`` in the subset's order."""

    def site_specs(self) -> list[str]:
        """Sites to check against the model before any forward pass."""
        return [spec for spec, _ in self.requests]


class FirstEpochOnly(Consumer):
    """A consumer of what a frozen model computes: active in the first epoch only (later
    epochs would pool the same rows again); :meth:`start` or :meth:`reset` of a subclass
    sets ``_epoch_over = False`` for a new pass."""

    _epoch_over = False

    @property
    def active(self) -> bool:
        """``False`` after the first epoch."""
        return not self._epoch_over

    def on_event(self, event: str, step: int, epoch: int) -> None:
        if event == "epoch_end":
            self._epoch_over = True


class Group(Consumer):
    """A consumer that stands for others, its :attr:`members` (the replay cache for the
    probes it serves, the torch bank for its probes): active while any member is, and
    reading what the active members read."""

    @property
    def members(self) -> Sequence[Consumer]:
        """The consumers this one stands for."""
        raise NotImplementedError

    @property
    def requests(self) -> tuple[Request, ...]:  # type: ignore[override]
        return tuple(requests_of(m for m in self.members if m.active))

    @property
    def active(self) -> bool:
        return any(m.active for m in self.members)


def requests_of(consumers: Iterable[Consumer]) -> list[Request]:
    """The distinct requests of ``consumers``, in order (each pair read once per trace)."""
    return list(dict.fromkeys(r for c in consumers for r in c.requests))


def _takes_context(start: Any) -> bool:
    """Whether a bound ``start`` takes the context as its first positional argument."""
    try:
        parameters = inspect.signature(start).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): assume the current form
        return True
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters)


def start_consumer(consumer: Consumer, context: RunContext, **legacy: Any) -> None:
    """Start ``consumer`` for a pass: ``consumer.start(context)``.

    A consumer whose ``start`` takes keywords only (the form before :class:`RunContext`,
    ``start(self, *, model=None, data=None, **_)``) is called that way, with the
    context's fields and ``legacy`` (the runner passes ``runner=``) as keywords, and a
    ``FutureWarning`` naming its class.
    """
    if _takes_context(consumer.start):
        consumer.start(context)
        return
    warnings.warn(f"{type(consumer).__name__}.start(**keywords) is the consumer protocol's earlier form; define "
                  "start(self, context) and read context.model, context.sites, context.data, context.batch_size "
                  "(lm_probe.core.consumer.RunContext)", FutureWarning, stacklevel=3)
    consumer.start(**context.as_keywords(), **legacy)
