"""Brace ranges in site strings and layer lists: ``{0..29}``, ``{0..29..3}``, ``{a,b}``.

:func:`expand_braces` expands every brace of a string into the cartesian product of its
choices, left to right; :func:`parse_layers` reads ``[sites] layers``. Both raise an
:class:`~lm_probe.app.problems.ExperimentError` that quotes the input.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from .problems import ExperimentError

__all__ = ["expand_braces", "expand_in", "parse_layers"]

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*(?:\.\.\s*(\d+)\s*)?$")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{first..last}``, ``{first..last..step}`` (inclusive) and ``{a,b,c}`` in a string.

    Several braces give their cartesian product, left to right::

        expand_braces("model.layers.{0..2}.output")   # ['model.layers.0.output', ..., 'model.layers.2.output']
        expand_braces("h.{0..4..2}.{attn,mlp}.output") # 6 strings

    Raises:
        ExperimentError: an unbalanced brace, an empty or descending range, a zero step,
            or braces holding neither a range nor a comma list.
    """
    if pattern.count("{") != pattern.count("}") or _BRACE.sub("", pattern).count("{"):
        raise ExperimentError(f"unbalanced braces in {pattern!r}")
    parts = _BRACE.split(pattern)  # text, brace, text, brace, ..., text
    choices = [[p] if k % 2 == 0 else _brace_items(p, pattern) for k, p in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def _brace_items(inner: str, pattern: str) -> list[str]:
    match = _RANGE.match(inner)
    if match:
        return [str(i) for i in _int_range(match, f"{{{inner}}} in {pattern!r}")]
    items = [s.strip() for s in inner.split(",")]
    if len(items) < 2 or not all(items):
        raise ExperimentError(f"cannot expand {{{inner}}} in {pattern!r}: write {{first..last}}, "
                              "{first..last..step} or {a,b,c}")
    return items


def _int_range(match: re.Match, where: str) -> list[int]:
    first, last = int(match.group(1)), int(match.group(2))
    step = int(match.group(3)) if match.group(3) is not None else 1
    if step < 1:
        raise ExperimentError(f"{where}: the step must be at least 1")
    if first > last:
        raise ExperimentError(f"{where} is empty: first ({first}) is after last ({last}); ranges are inclusive "
                              "and go up")
    return list(range(first, last + 1, step))


def parse_layers(value: Any) -> str | list[int]:
    """``[sites] layers``: ``"all"``, an int, a list of ints, or ``"first..last[..step]"`` (inclusive).

    Raises:
        ExperimentError: any other string or an empty/descending range.
    """
    if value == "all":
        return "all"
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        if not value:
            raise ExperimentError("[sites] layers = [] selects no layer")
        return list(value)
    match = _RANGE.match(value.strip("{}")) if isinstance(value, str) else None
    if not match:
        raise ExperimentError(f"[sites] layers = {value!r}: use 'all', an index, a list such as [0, 5], or a range "
                              "'0..29' / '0..29..3'")
    return _int_range(match, f"[sites] layers = {value!r}")


def expand_in(pattern: str, where: str) -> list[str]:
    """:func:`expand_braces`, its error prefixed with ``where`` (``"[sites] paths"``)."""
    try:
        return expand_braces(pattern)
    except ExperimentError as err:
        raise ExperimentError(f"{where}: {err}") from None
