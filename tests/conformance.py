"""One harness every consumer runs through (in the spirit of torchmetrics' MetricTester and
scikit-learn's parametrize_with_checks): compute before any data raises, the same seed
gives the same result, two instances fed disjoint halves and merged equal one pass (or
merge raises the documented error), pickling round-trips, reset restores the empty
state, and the values agree with an independent float64 reference.

A pass is fed as the runner feeds it (:func:`run_pass`): ``start(context)``, the
``"start"`` event, ``update`` on each batch while the consumer is active, a ``"step"``
event after each, ``"epoch_end"``, ``finish()``, ``"end"``; a consumer that declares a
:class:`~lm_probe.core.consumer.SubsetRequest` at an event gets ``subset_rows(request)`` through
``observe``. ``tests/test_conformance.py`` runs every consumer of lm_probe through it.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pytest

from lm_probe import Consumer, NotComputedError, PooledBatch
from lm_probe.core.consumer import Request, RunContext, SubsetRequest

Rows = Callable[[SubsetRequest], Mapping[Request, np.ndarray]]


def run_pass(consumer: Consumer, batches: Sequence[PooledBatch], context: RunContext,
             subset_rows: Rows | None = None) -> Consumer:
    """Feed ``consumer`` one pass over ``batches``, as the runner does; returns it."""

    def emit(event: str, step: int, epoch: int) -> None:
        consumer.on_event(event, step, epoch)
        wanted = consumer.subset_due(event, step, epoch)
        if wanted is not None:
            assert subset_rows is not None, f"{type(consumer).__name__} asks for a subset: give subset_rows"
            consumer.observe(subset_rows(wanted), event, step, epoch)

    consumer.start(context)
    emit("start", 0, 0)
    for step, batch in enumerate(batches, 1):
        if consumer.active:
            consumer.update(batch)
        emit("step", step, 0)
    emit("epoch_end", len(batches), 1)
    consumer.finish()
    emit("end", len(batches), 1)
    return consumer


def check_consumer(
    make: Callable[[], Consumer],
    batches: Sequence[PooledBatch],
    same: Callable[[Any, Any], None],
    reference: Callable[[Any], None],
    *,
    mergeable: bool = True,
    context: RunContext | None = None,
    read: Callable[[Consumer], Any] | None = None,
    subset_rows: Rows | None = None,
) -> Any:
    """Run the checks.

    Args:
        make: A fresh, unstarted consumer (the same seed every call).
        batches: One pass of data.
        same: ``same(a, b)`` asserts that two results agree.
        reference: Checks a one-pass result against a float64 computation on all the data.
        mergeable: Whether the consumer merges; if not, ``merge`` must raise
            ``NotImplementedError`` ("cannot be merged").
        context: What ``start`` gets (default: an empty :class:`RunContext`).
        read: The result of a consumer that has seen a pass (default: ``compute()``);
            probes add their weights, which ``compute()`` does not return.
        subset_rows: Pooled rows of the subsets a consumer declares.

    Returns:
        The one-pass result.
    """
    context = context if context is not None else RunContext()
    read = read if read is not None else (lambda consumer: consumer.compute())
    feed = lambda consumer, part: run_pass(consumer, part, context, subset_rows)  # noqa: E731

    fresh = make()
    with pytest.raises(NotComputedError):
        fresh.compute()
    fresh.start(context)
    with pytest.raises(NotComputedError):
        fresh.compute()

    one = feed(make(), batches)
    result = read(one)
    reference(result)
    same(read(feed(make(), batches)), result)  # the same seed gives the same result

    if mergeable:
        half = len(batches) // 2
        a, b = feed(make(), batches[:half]), feed(make(), batches[half:])
        assert a.merge(b) is a
        same(read(a), result)
    else:
        with pytest.raises(NotImplementedError, match="cannot be merged"):
            make().merge(make())

    clone = pickle.loads(pickle.dumps(one))
    same(read(clone), result)

    one.reset()
    with pytest.raises(NotComputedError):
        one.compute()
    same(read(feed(one, batches)), result)
    return result
