import pytest

from lm_probe.core.trigger import Trigger


def steps(*numbers, epoch=0):
    """A "step" event for each step number, all in the same epoch."""
    return [(s, epoch, "step") for s in numbers]


# A short run: start, steps 1..6 in two epochs of 3 steps, a validation after each
# epoch, then the end at step 6.
RUN = (
    [(0, 0, "start")]
    + steps(1, 2, 3, epoch=0) + [(3, 1, "epoch_end"), (3, 1, "validation")]
    + steps(4, 5, 6, epoch=1) + [(6, 2, "epoch_end"), (6, 2, "validation"), (6, 2, "end")]
)


@pytest.mark.parametrize(
    "kwargs, events, expected",
    [
        # every N steps; an end at a multiple of N fires once for that step
        (dict(every_n_steps=100, on_end=True), steps(99, 100) + [(100, 1, "end")], [(100, "step")]),
        (dict(every_n_steps=100, on_end=True), steps(100, 150) + [(150, 1, "end")], [(100, "step"), (150, "end")]),
        (dict(every_n_steps=2), RUN, [(2, "step"), (4, "step"), (6, "step")]),
        # step 0 never fires unless at_start
        (dict(every_n_steps=1), [(0, 0, "start"), (0, 0, "step"), (1, 0, "step")], [(1, "step")]),
        (dict(every_n_steps=1, at_start=True), [(0, 0, "start"), (0, 0, "step"), (1, 0, "step")],
         [(0, "start"), (1, "step")]),
        # ... but the explicit events fire at step 0 (a pass with no training ends there)
        (dict(on_end=True), [(0, 0, "end")], [(0, "end")]),
        (dict(on_validation=True), [(0, 0, "validation")], [(0, "validation")]),
        (dict(on_end=True, at_start=True), [(0, 0, "start"), (0, 0, "end")], [(0, "start")]),
        (dict(every_n_epochs=1), [(0, 0, "epoch_end")], []),
        (dict(at_start=True), RUN, [(0, "start")]),
        # at_steps, given in any order and any iterable
        (dict(at_steps=[5, 2]), RUN, [(2, "step"), (5, "step")]),
        (dict(at_steps=range(1, 3)), RUN, [(1, "step"), (2, "step")]),
        # epochs are counted as completed epochs, 1 at the first epoch end
        (dict(every_n_epochs=1), RUN, [(3, "epoch_end"), (6, "epoch_end")]),
        (dict(every_n_epochs=2), RUN, [(6, "epoch_end")]),
        # validation and end
        (dict(on_validation=True), RUN, [(3, "validation"), (6, "validation")]),
        (dict(on_end=True), RUN, [(6, "end")]),
        # OR-combination, at most once per step
        (dict(every_n_steps=4, every_n_epochs=1, on_end=True), RUN, [(3, "epoch_end"), (4, "step"), (6, "epoch_end")]),
        (dict(at_steps=(5,), on_validation=True, at_start=True), RUN,
         [(0, "start"), (3, "validation"), (5, "step"), (6, "validation")]),
        (dict(every_n_steps=3, on_end=True, on_validation=True), RUN, [(3, "step"), (6, "step")]),
        # checkpoint saves fire only with on_checkpoint, at any step (step 0 included)
        (dict(on_checkpoint=True), RUN + [(6, 2, "checkpoint")], [(6, "checkpoint")]),
        (dict(on_checkpoint=True), [(0, 0, "checkpoint"), (2, 0, "checkpoint")], [(0, "checkpoint"), (2, "checkpoint")]),
        (dict(every_n_steps=2), [(2, 0, "checkpoint")], []),
        (dict(every_n_steps=2, on_checkpoint=True), steps(2) + [(2, 0, "checkpoint")], [(2, "step")]),
    ],
)
def test_firings_table(kwargs, events, expected):
    assert Trigger(**kwargs).firings(events) == expected


@pytest.mark.parametrize(
    "kwargs, step, epoch, event, expected",
    [
        (dict(every_n_steps=10), 10, 0, "step", True),
        (dict(every_n_steps=10), 10, 0, "end", False),  # "end" fires only with on_end
        (dict(every_n_steps=10), 0, 0, "step", False),
        (dict(every_n_steps=10), 0, 0, "start", False),
        (dict(every_n_epochs=3), 30, 3, "epoch_end", True),
        (dict(every_n_epochs=3), 30, 3, "step", False),
        (dict(every_n_epochs=3), 30, 0, "epoch_end", False),
        (dict(at_steps=[7]), 7, 0, "step", True),
        (dict(at_steps=[7]), 7, 0, "validation", False),
        (dict(at_start=True), 0, 0, "start", True),
    ],
)
def test_fires_table(kwargs, step, epoch, event, expected):
    trigger = Trigger(**kwargs)
    assert trigger.fires(step, epoch, event) is expected
    assert trigger.fires(step, epoch, event) is expected  # pure: asking again changes nothing


def test_firings_is_repeatable():
    trigger = Trigger(every_n_steps=2, on_end=True)
    assert trigger.firings(RUN) == trigger.firings(iter(RUN)) == [(2, "step"), (4, "step"), (6, "step")]


def test_at_steps_is_stored_sorted_without_repeats():
    trigger = Trigger(at_steps=[30, 10, 20, 10])
    assert trigger.at_steps == (10, 20, 30)
    assert trigger == Trigger(at_steps=(10, 20, 30)) and hash(trigger) == hash(Trigger(at_steps=(10, 20, 30)))


def test_repr_shows_only_set_conditions():
    assert repr(Trigger(every_n_steps=100, on_end=True)) == "Trigger(every_n_steps=100, on_end=True)"
    assert repr(Trigger(at_steps=[5, 1])) == "Trigger(at_steps=(1, 5))"


def test_frozen():
    with pytest.raises(AttributeError):
        Trigger(on_end=True).on_end = False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "at least one condition"),
        (dict(every_n_steps=0), "every_n_steps"),
        (dict(every_n_steps=-5), "every_n_steps"),
        (dict(every_n_steps=2.5), "every_n_steps"),
        (dict(every_n_steps=True), "every_n_steps"),
        (dict(every_n_epochs=0), "every_n_epochs"),
        (dict(at_steps=[0, 5]), "at_start=True"),
        (dict(at_steps=[-1]), "at_steps"),
        (dict(at_steps=[1.5]), "at_steps"),
        (dict(at_steps=5), "iterable"),
        (dict(on_end=1), "on_end"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Trigger(**kwargs)


@pytest.mark.parametrize(
    "step, epoch, event, message",
    [(1, 0, "epoch", "unknown event"), (-1, 0, "step", "step"), (1, -1, "step", "epoch"), (1.0, 0, "step", "step")],
)
def test_bad_events(step, epoch, event, message):
    with pytest.raises(ValueError, match=message):
        Trigger(every_n_steps=1).fires(step, epoch, event)
