import math

import pytest

from lm_probe import EarlyStopping, StopReason


def run(values, **kwargs):
    """Feed values at steps 1, 2, ...; return (index of the stop or None, reason, stopper)."""
    stopper = EarlyStopping(**kwargs)
    for i, value in enumerate(values, start=1):
        stop, reason = stopper.check(value, step=i)
        if stop:
            return i, reason, stopper
    return None, StopReason.NONE, stopper


@pytest.mark.parametrize(
    "values, kwargs, stop_at, reason, best",
    [
        ([1.0, 0.9, 0.8, 0.7], dict(patience=2), None, StopReason.NONE, 0.7),
        ([1.0, 0.9, 0.95, 0.96], dict(patience=2), 4, StopReason.PATIENCE, 0.9),
        ([1.0, 0.99995, 0.99990, 0.99985], dict(patience=2, min_delta=1e-3), 3, StopReason.PATIENCE, 1.0),
        ([1.0, 1.1, 0.5, 0.6, 0.7, 0.8], dict(patience=3), 6, StopReason.PATIENCE, 0.5),
        ([1.0, float("nan"), 0.5], dict(patience=3), 2, StopReason.NON_FINITE, 1.0),
        ([1.0, float("inf")], dict(patience=3), 2, StopReason.NON_FINITE, 1.0),
        ([0.1, 0.2, 0.3], dict(patience=1, mode="max"), None, StopReason.NONE, 0.3),
        ([0.3, 0.2], dict(patience=1, mode="max"), 2, StopReason.PATIENCE, 0.3),
        # patience is met at evaluation 3, but no stop is decided before step 5
        ([1.0, 2.0, 2.0, 2.0, 2.0, 2.0], dict(patience=2, warmup_steps=5), 5, StopReason.PATIENCE, 1.0),
    ],
)
def test_stopping_table(values, kwargs, stop_at, reason, best):
    at, got, stopper = run(values, **kwargs)
    assert (at, got) == (stop_at, reason)
    assert stopper.best_ == best


def test_nan_is_ignored_without_check_finite():
    at, reason, stopper = run([1.0, float("nan"), 0.5], patience=3, check_finite=False)
    assert at is None and stopper.best_ == 0.5 and stopper.best_step_ == 3


def test_improved_flag_and_wait_counter():
    stopper = EarlyStopping(patience=5)
    stopper.check(1.0, 1)
    assert stopper.improved_ and stopper.wait_ == 0
    stopper.check(1.5, 2)
    assert not stopper.improved_ and stopper.wait_ == 1
    stopper.check(0.2, 3)
    assert stopper.improved_ and stopper.wait_ == 0 and stopper.best_step_ == 3


@pytest.mark.parametrize("kwargs", [dict(patience=0), dict(min_delta=-1.0), dict(mode="up")])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        EarlyStopping(**kwargs)


def test_initial_best_is_infinite():
    assert EarlyStopping().best_ == math.inf
    assert EarlyStopping(mode="max").best_ == -math.inf
