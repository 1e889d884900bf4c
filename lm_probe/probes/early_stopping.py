"""Early stopping as a small pure object.

scikit-learn's own early stopping cannot be used with ``partial_fit`` (its docs: early
stopping "should be handled by the user"), so the runner asks this object after each
validation evaluation. It sees plain floats, never a model, so its tests are lists of
floats. Patience is counted in *evaluations*, not batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

__all__ = ["DecayOnPlateau", "EarlyStopping", "StopReason"]


class StopReason(str, Enum):
    """Why a probe stopped training."""

    NONE = "none"  #: still training
    PATIENCE = "patience"  #: no improvement for `patience` evaluations
    NON_FINITE = "non-finite"  #: a non-finite loss or activation
    MAX_STEPS = "max_steps"  #: the step budget was reached
    END_OF_DATA = "end_of_data"  #: the epochs ran out first
    SOLVED = "solved"  #: a full-batch solver fit the probe (``solver="lbfgs"``)

    def __str__(self) -> str:
        return self.value


@dataclass
class EarlyStopping:
    """Stop when the monitored value stops improving.

    Args:
        patience: Evaluations without an improvement of at least ``min_delta`` after
            which to stop.
        min_delta: Smallest change that counts as an improvement.
        mode: ``"min"`` (a loss) or ``"max"`` (a score).
        warmup_steps: No stop is decided before this training step (improvements are
            still recorded).
        check_finite: Stop at once with ``StopReason.NON_FINITE`` on NaN or inf.

    Attributes:
        best_: Best value seen so far (``inf`` for mode min before any value).
        best_step_: Step of the best value, or ``None``.
        improved_: Whether the last value checked was an improvement.
        wait_: Evaluations since the last improvement.
    """

    patience: int = 5
    min_delta: float = 1e-4
    mode: str = "min"
    warmup_steps: int = 0
    check_finite: bool = True
    best_: float = field(init=False)
    best_step_: int | None = field(init=False, default=None)
    improved_: bool = field(init=False, default=False)
    wait_: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1 evaluation, got {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")
        self.best_ = math.inf if self.mode == "min" else -math.inf

    def check(self, value: float, step: int) -> tuple[bool, StopReason]:
        """Record one evaluation and decide whether to stop.

        Args:
            value: The monitored value at this evaluation.
            step: The training step it was measured at.

        Returns:
            ``(should_stop, reason)``; ``reason`` is ``StopReason.NONE`` when not stopping.
        """
        self.improved_ = False
        if not math.isfinite(value):
            if self.check_finite:
                return True, StopReason.NON_FINITE
            return False, StopReason.NONE
        sign = 1.0 if self.mode == "min" else -1.0
        if sign * (self.best_ - value) > self.min_delta or self.best_step_ is None:
            self.best_, self.best_step_, self.improved_, self.wait_ = value, step, True, 0
            return False, StopReason.NONE
        self.wait_ += 1
        if self.wait_ >= self.patience and step >= self.warmup_steps:
            return True, StopReason.PATIENCE
        return False, StopReason.NONE


@dataclass
class DecayOnPlateau:
    """Shrink the step size when the monitored value stops improving.

    As in Lightning's and PyTorch's ``ReduceLROnPlateau``: after ``patience`` evaluations
    in a row without an improvement the step-size multiplier is multiplied by ``factor``
    (down to ``min_scale``), and the count starts again. A constant SGD step stalls at a
    noise floor around the optimum; shrinking it when the validation loss stalls lets the
    iterates settle.

    Args:
        factor: Multiplier applied at each decay, in ``(0, 1)``.
        patience: Evaluations without improvement before each decay.
        min_scale: Smallest multiplier.

    Attributes:
        scale_: The current multiplier (1.0 at the start).
        n_decays_: Decays so far.
    """

    factor: float = 0.5
    patience: int = 2
    min_scale: float = 1e-3
    scale_: float = field(init=False, default=1.0)
    n_decays_: int = field(init=False, default=0)
    _wait: int = field(init=False, default=0, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {self.factor}")
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1 evaluation, got {self.patience}")

    def check(self, improved: bool) -> float:
        """Record one evaluation (``improved``: it beat the best so far) and return the multiplier."""
        if improved:
            self._wait = 0
            return self.scale_
        self._wait += 1
        if self._wait >= self.patience and self.scale_ > self.min_scale:
            self.scale_, self._wait = max(self.scale_ * self.factor, self.min_scale), 0
            self.n_decays_ += 1
        return self.scale_
