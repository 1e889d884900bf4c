"""When to measure: one small value object instead of several exclusive integer arguments.

A consumer that measures during training (a geometry snapshot, a diffusion gauge, a
checkpoint) needs to say *when*: every N steps, every N epochs, at given steps, on
each validation, on each checkpoint save, at the end, or before training starts. :class:`Trigger` holds those
conditions and answers one question, :meth:`Trigger.fires`, for one training event.
It holds no state, so its tests are tables of events, with no model or trainer.

The counters follow Hugging Face's ``Trainer``: ``step`` is the number of training
steps completed (``global_step``: 0 before training, 1 after the first optimizer
step) and ``epoch`` is the number of epochs completed, so the first ``"epoch_end"``
event has ``epoch=1``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass, fields

__all__ = ["Trigger", "EVENTS"]

#: The training events a trigger is asked about.
EVENTS = ("start", "step", "epoch_end", "validation", "checkpoint", "end")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


@dataclass(frozen=True, repr=False)
class Trigger:
    """A set of conditions, combined with OR, under which a measurement is taken.

    Events and when they fire (``step`` and ``epoch`` as in the module docstring):

    * ``"start"``: step 0, before any training; fires only if ``at_start``;
    * ``"step"``: after a training step; fires if ``every_n_steps`` divides ``step``
      or ``step`` is in ``at_steps``;
    * ``"epoch_end"``: fires if ``every_n_epochs`` divides ``epoch``;
    * ``"validation"``: fires if ``on_validation``;
    * ``"checkpoint"``: a checkpoint is being saved; fires if ``on_checkpoint``;
    * ``"end"``: end of training; fires if ``on_end``.

    The step and epoch conditions never fire at step 0 or epoch 0 (0 is a multiple of
    every N): a measurement before training is asked for with ``at_start=True``. The
    explicit events ``"validation"``, ``"checkpoint"`` and ``"end"`` fire whenever they happen, step 0
    included (a pass with no training, such as ``ProbeRunner.collect``, ends at step 0).
    :meth:`firings` adds the rule "at most once per step" to a sequence of events.

    Args:
        every_n_steps: Fire after every N-th training step (N >= 1).
        every_n_epochs: Fire at the end of every N-th epoch (N >= 1).
        at_steps: Fire after these training steps (any iterable of ints >= 1; stored
            as a sorted tuple without repeats).
        on_end: Fire at the end of training.
        on_validation: Fire at each validation.
        at_start: Fire at step 0, before training.
        on_checkpoint: Fire when a checkpoint is saved (a training loop that saves them,
            such as Lightning's, tells its callback).

    Raises:
        ValueError: On a non-positive interval or step, or when no condition is set.
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    at_steps: tuple[int, ...] = ()
    on_end: bool = False
    on_validation: bool = False
    at_start: bool = False
    on_checkpoint: bool = False

    def __post_init__(self) -> None:
        for name in ("every_n_steps", "every_n_epochs"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
        if isinstance(self.at_steps, (str, bytes)) or not isinstance(self.at_steps, Iterable):
            raise ValueError(f"at_steps must be an iterable of ints >= 1, got {self.at_steps!r}")
        steps = list(self.at_steps)
        if any(s == 0 and not isinstance(s, bool) for s in steps):
            raise ValueError("at_steps cannot contain 0 (no training step has completed at step 0); "
                             "use at_start=True to measure before training")
        object.__setattr__(self, "at_steps", tuple(sorted({_positive_int("at_steps entries", s) for s in steps})))
        for name in ("on_end", "on_validation", "at_start", "on_checkpoint"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not self._set_conditions():
            raise ValueError("a Trigger needs at least one condition, e.g. Trigger(on_end=True)")

    def _set_conditions(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={value!r}" for name, value in self._set_conditions().items())
        return f"Trigger({args})"

    def fires(self, step: int, epoch: int, event: str) -> bool:
        """Whether a measurement is due at this event (pure: no state is kept).

        Args:
            step: Training steps completed so far (>= 0).
            epoch: Epochs completed so far (>= 0; 1 at the first ``"epoch_end"``).
            event: One of :data:`EVENTS`.

        Returns:
            True if any set condition matches the event.
        """
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; use one of {', '.join(EVENTS)}")
        for name, value in (("step", step), ("epoch", epoch)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if event == "start":
            return self.at_start
        if event == "step":
            if step == 0:
                return False
            return (self.every_n_steps is not None and step % self.every_n_steps == 0) or step in self.at_steps
        if event == "epoch_end":
            return self.every_n_epochs is not None and epoch > 0 and epoch % self.every_n_epochs == 0
        if event == "validation":
            return self.on_validation
        if event == "checkpoint":
            return self.on_checkpoint
        return self.on_end

    def firings(self, events: Iterable[tuple[int, int, str]]) -> list[tuple[int, str]]:
        """The events that fire, at most once per step.

        Walks ``events`` in order and keeps each ``(step, event)`` that :meth:`fires`,
        skipping any event at a step that has already fired (a step-100 ``"step"``
        event and a step-100 ``"end"`` event measure once).

        Args:
            events: ``(step, epoch, event)`` triples in the order they happen.

        Returns:
            The ``(step, event)`` pairs that fire, in order.
        """
        fired: list[tuple[int, str]] = []
        done: set[int] = set()
        for step, epoch, event in events:
            if step not in done and self.fires(step, epoch, event):
                fired.append((step, event))
                done.add(step)
        return fired
