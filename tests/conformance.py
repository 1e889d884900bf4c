"""One harness every consumer runs through (in the spirit of torchmetrics' MetricTester and
scikit-learn's parametrize_with_checks): compute before update raises, merge of two halves
equals one pass, reset restores the empty state, pickling round-trips, and the values
agree with an independent float64 reference."""

from __future__ import annotations

import pickle
from typing import Any, Callable, Sequence

import pytest

from lm_probe import Consumer, NotComputedError, PooledBatch


def check_consumer(
    make: Callable[[], Consumer],
    batches: Sequence[PooledBatch],
    same: Callable[[Any, Any], None],
    reference: Callable[[Any], None],
    mergeable: bool = True,
) -> Any:
    """Run the checks; ``same(a, b)`` asserts two results agree, ``reference(r)`` checks
    a result against a float64 computation on all the data. Returns the one-pass result."""
    fresh = make()
    with pytest.raises(NotComputedError):
        fresh.compute()

    one = make()
    for batch in batches:
        one.update(batch)
    result = one.compute()
    reference(result)

    if mergeable:
        half = len(batches) // 2
        a, b = make(), make()
        for batch in batches[:half]:
            a.update(batch)
        for batch in batches[half:]:
            b.update(batch)
        assert a.merge(b) is a
        same(a.compute(), result)

    clone = pickle.loads(pickle.dumps(one))
    same(clone.compute(), result)

    one.reset()
    with pytest.raises(NotComputedError):
        one.compute()
    for batch in batches:
        one.update(batch)
    same(one.compute(), result)
    return result
