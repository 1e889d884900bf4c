"""Labels: the integer labels of examples and tokens, and the one marker of "no label".

:data:`IGNORE` marks a position that no probe trains or is scored on; :func:`labeled`
is the one test for a label (also for float regression targets, where a label is a
finite value). :func:`encode_labels` maps class names to integer labels once, when a
dataset is built, and :func:`format_labels` writes labels with their names in messages.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from loguru import logger

__all__ = ["IGNORE", "labeled", "class_columns", "encode_labels", "format_labels"]

#: Label of positions that no probe trains or is scored on (padding, continuation
#: subwords, special tokens), as in Hugging Face token classification.
IGNORE = -100


def labeled(y: np.ndarray) -> np.ndarray:
    """``(rows,)`` bool: the entries of ``y`` that carry a label (not :data:`IGNORE`; for
    float regression targets, the finite ones)."""
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.floating):
        return np.isfinite(y)
    return y != IGNORE


def class_columns(classes: np.ndarray, y: np.ndarray, consequence: str = "") -> np.ndarray:
    """``(rows,)`` the column of each label of ``y`` among the sorted ``classes``.

    Raises:
        ValueError: some labels are not among ``classes`` (named; ``consequence`` is added
            to the message: ``": they cannot be coded"``).
    """
    classes, y = np.asarray(classes), np.asarray(y)
    index = np.searchsorted(classes, y).clip(max=len(classes) - 1)
    if np.any(classes[index] != y):
        raise ValueError(f"labels {sorted(set(y[classes[index] != y].tolist()))} are not in classes "
                         f"{classes.tolist()}{consequence}")
    return index


def encode_labels(labels: Any, label_names: Sequence[str] | None = None,
                  what: str = "labels") -> tuple[np.ndarray, list[str] | None]:
    """Class names to integer labels, through a given mapping or in sorted order.

    Integer (or float) labels pass through unchanged; ``label_names`` then only names them
    (``label_names[i]`` names label ``i``), and each label must have a name. String labels
    are mapped through ``label_names`` when it is given, else in sorted order (logged).

    Args:
        labels: One label per example: integers, floats (regression targets) or strings.
        label_names: The name of each integer label, in order.
        what: What the labels are, for messages.

    Returns:
        ``(labels, label_names)``: an int64 (or float64) array and the names (``None``
        when there are none).

    Raises:
        ValueError: a mix of names and numbers, a name missing from ``label_names``, an
            integer label without a name, or names given for regression targets.
    """
    values = list(labels) if not isinstance(labels, np.ndarray) else labels.tolist()
    names = None if label_names is None else [str(n) for n in label_names]
    if names is not None and len(set(names)) != len(names):
        raise ValueError(f"label_names {names} lists a name twice; give each class one name")
    strings = [isinstance(v, str) for v in values]
    if any(strings) and not all(strings):
        row = strings.index(False) if strings[0] else strings.index(True)
        raise ValueError(f"{what} mix class names and numbers (index {row} is {values[row]!r}); use one or the other")
    if values and all(strings):
        if names is None:
            names = sorted(set(values))
            logger.info("{} are class names; mapped in sorted order: {}", what, dict(zip(names, range(len(names)))))
        code = {n: k for k, n in enumerate(names)}
        unknown = sorted(set(values) - set(code))
        if unknown:
            raise ValueError(f"{what} {unknown} are not among label_names {names}; add them to label_names")
        return np.asarray([code[v] for v in values], np.int64), names
    array = np.asarray(labels)
    if names is not None:
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"label_names names integer class labels, but the {what} are {array.dtype} values")
        outside = sorted(set(array.tolist()) - set(range(len(names))))
        if outside:
            raise ValueError(f"{what} {outside} have no name in label_names {names} (label i is named by "
                             f"label_names[i], i = 0..{len(names) - 1})")
    return array, names


def format_labels(labels: Any, names: Sequence[str] | None = None) -> str:
    """Labels for a message, each with its name when names are known: ``"[0 (neg), 1 (pos)]"``."""
    def one(label: Any) -> str:
        k = int(label)
        return f"{k} ({names[k]})" if names is not None and 0 <= k < len(names) else str(k)

    return "[" + ", ".join(one(v) for v in labels) + "]"
