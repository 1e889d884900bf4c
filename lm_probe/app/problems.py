"""The problems of an experiment, all reported together.

Checking an experiment file, its data, its model and its options collects every problem
it finds (:class:`Problems`) before it stops, and reports them in one
:class:`ExperimentError`, one line per problem, so one run shows all there is to fix.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["ExperimentError", "Problems"]


class ExperimentError(ValueError):
    """An experiment file or its data that cannot run; the message says where and how to fix it.

    Checking a file collects every problem it finds before it stops (see :class:`Problems`):
    ``problems`` lists them, and the message has one line per problem when there are several.

    Args:
        problems: One message, or several.
        where: The file they are about (prefixed to the message).
    """

    def __init__(self, problems: str | Sequence[str], where: str | Path | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.where = None if where is None else str(where)
        head = f"{self.where}: " if self.where else ""
        if len(self.problems) == 1:
            message = head + self.problems[0]
        else:
            message = f"{head}{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class Problems:
    """The problems found so far by one check of an experiment, so that it reports them all.

    Each independent check runs in ``with problems.collect():``; an :class:`ExperimentError`
    raised there is recorded and the check after it runs anyway. Checks that need the result
    of a failed one are skipped, so every problem reported is a real one.
    """

    def __init__(self) -> None:
        self.found: list[str] = []

    def __len__(self) -> int:
        return len(self.found)

    def add(self, *problems: str) -> None:
        """Record problems (one found twice, by two seeds say, is recorded once)."""
        self.found += [p for p in dict.fromkeys(problems) if p not in self.found]

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        """Run a check; record the problems of an ExperimentError it raises instead of raising it."""
        try:
            yield
        except ExperimentError as err:
            self.add(*err.problems)

    def raise_any(self, where: str | Path | None = None) -> None:
        """Raise one ExperimentError listing every problem recorded, if there is any."""
        if self.found:
            raise ExperimentError(self.found, where)
