"""Labeled texts for an experiment, read from a file or an embedded data set, every row checked.

``[data]`` in an experiment file names a CSV or JSONL file, a folder written by
``datasets``' ``save_to_disk``, or the embedded Rotten Tomatoes snippets. :func:`read_table`
reads the text and label columns and checks every row before any model runs: a missing
column is named with the columns there are, and a missing text or label, an empty text,
a fractional class label or a mix of class names and numbers is reported with its row
number (data rows counted from 1). Labels are integers as given, or class names mapped
to integers in sorted order (the names are kept for the plan and the report). CSV cells
are read as strings, so a text such as "NA" stays text.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from loguru import logger

from ..core.dataset import ProbeDataset
from .experiment import DataSection, ExperimentError

__all__ = ["Table", "read_table", "class_counts"]


@dataclass
class Table:
    """Texts and integer (or float) labels read from one data source, every row checked.

    Attributes:
        texts: One string per row.
        labels: ``(n,)`` int64 class labels, or float64 regression targets.
        label_names: Class names for labels read as names (index = label), else None.
        description: Where the rows came from, for the plan and the report.
    """

    texts: list[str]
    labels: np.ndarray
    label_names: list[str] | None
    description: str


def read_table(data: DataSection, base: Path, task: str = "classification") -> Table:
    """Read ``[data]`` and check its text and label columns, row by row.

    Args:
        data: The ``[data]`` table.
        base: Folder that ``data.path`` is relative to (the experiment file's).
        task: ``"classification"`` (integer or named labels) or ``"regression"`` (numbers).

    Returns:
        The :class:`Table`.

    Raises:
        ExperimentError: a missing file, split or column (with the columns there are), a
            text that is not a non-empty string, or a missing or invalid label; row
            numbers count data rows from 1.
    """
    columns, names, where = _read_columns(data, base)
    for key in ("text_column", "label_column"):
        column = getattr(data, key)
        if column not in columns:
            close = difflib.get_close_matches(column, list(columns), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise ExperimentError(f"[data] {key} = {column!r} is not a column of {where}{hint} "
                                  f"Its columns are {list(columns)}")
    texts = _texts(columns[data.text_column], where)
    if task == "regression":
        labels, label_names = _numbers(columns[data.label_column], where), None
    else:
        labels, label_names = _classes(columns[data.label_column], where, names)
    return Table(texts, labels, label_names, f"{where} ({len(texts)} rows)")


def _read_columns(data: DataSection, base: Path) -> tuple[dict[str, list], list[str] | None, str]:
    """``(columns, class names or None, where)`` of the source ``[data]`` names."""
    if data.source is not None:
        from ..core.embedded import rotten_tomatoes

        reviews = rotten_tomatoes()
        return _from_hf(reviews), _class_names(reviews, data.label_column), "the embedded rotten_tomatoes data"
    path = (base / data.path).resolve()
    if not path.exists():
        raise ExperimentError(f"[data] path {data.path!r} does not exist (looked for {path})")
    if path.is_dir():
        return *_from_saved(path, data), str(data.path)
    if path.suffix.lower() == ".csv":
        return _from_csv(path), None, str(data.path)
    if path.suffix.lower() == ".jsonl":
        return _from_jsonl(path), None, str(data.path)
    raise ExperimentError(f"[data] path {data.path!r}: read .csv, .jsonl, or a folder written by datasets' "
                          "save_to_disk")


def _from_hf(dataset: Any) -> dict[str, list]:
    return {c: list(dataset[c]) for c in dataset.column_names}


def _class_names(dataset: Any, column: str) -> list[str] | None:
    feature = getattr(dataset, "features", {}).get(column)
    return list(feature.names) if hasattr(feature, "names") else None


def _from_saved(path: Path, data: DataSection) -> tuple[dict[str, list], list[str] | None]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 (any reason it is not a saved dataset is reported)
        raise ExperimentError(f"[data] path {data.path!r} is a folder but not a saved dataset "
                              f"(datasets.load_from_disk: {err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if data.split is None or data.split not in loaded:
            what = "needs split = ..." if data.split is None else f"has no split {data.split!r}"
            raise ExperimentError(f"[data] the saved DatasetDict at {data.path!r} {what}; its splits are "
                                  f"{list(loaded)}")
        loaded = loaded[data.split]
    elif data.split is not None:
        raise ExperimentError(f"[data] split = {data.split!r}, but {data.path!r} holds a single Dataset; "
                              "remove split")
    return _from_hf(loaded), _class_names(loaded, data.label_column)


def _from_csv(path: Path) -> dict[str, list]:
    try:  # every cell a string: "NA" stays text, and labels are parsed below with row numbers
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ExperimentError(f"cannot read {path.name} as CSV: {str(err).strip()}") from None
    return {str(c): frame[c].tolist() for c in frame.columns}


def _from_jsonl(path: Path) -> dict[str, list]:
    records = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ExperimentError(f"{path.name} line {line_no} is not JSON: {err}") from None
        if not isinstance(record, dict):
            raise ExperimentError(f"{path.name} line {line_no} is not a JSON object ({{\"text\": ..., ...}})")
        records.append(record)
    if not records:
        raise ExperimentError(f"{path.name} holds no records")
    names = list(dict.fromkeys(k for r in records for k in r))
    return {k: [r.get(k, _MISSING) for r in records] for k in names}


_MISSING = object()  #: a JSON record without the key


def _texts(values: list, where: str) -> list[str]:
    for row, value in enumerate(values, 1):
        if not isinstance(value, str):
            got = "no value" if value is _MISSING or value is None else f"{value!r}"
            raise ExperimentError(f"{where}: row {row} has {got} as text; every text must be a string")
        if not value.strip():
            raise ExperimentError(f"{where}: row {row} has an empty text; remove the row or fill it")
    return list(values)


def _is_missing(value: Any) -> bool:
    return (value is _MISSING or value is None or (isinstance(value, str) and not value.strip())
            or (isinstance(value, float) and math.isnan(value)))


def _classes(values: list, where: str, names: list[str] | None) -> tuple[np.ndarray, list[str] | None]:
    """Integer labels as given (numbers, or digit strings from a CSV), else class names mapped in sorted order."""
    for row, value in enumerate(values, 1):
        if _is_missing(value):
            raise ExperimentError(f"{where}: row {row} has no label; fill it or remove the row")
        if isinstance(value, bool) or not isinstance(value, (int, float, str, np.integer)):
            raise ExperimentError(f"{where}: row {row} has the label {value!r}; labels must be integers or "
                                  "class names (strings)")
        if isinstance(value, float) and not value.is_integer():
            raise ExperimentError(f"{where}: row {row} has the label {value!r}, not a class; use integers or "
                                  "names, or task = 'regression' in [probes] for numeric targets")
    as_int = [_as_int(v) for v in values]
    if all(v is not None for v in as_int):
        return np.asarray(as_int, np.int64), names
    kinds = {type(v) for v in values}
    if kinds != {str}:
        row = next(i for i, v in enumerate(values, 1) if not isinstance(v, str))
        raise ExperimentError(f"{where}: labels mix names and numbers (row {row} is {values[row - 1]!r}); use "
                              "one or the other")
    classes = sorted(set(values))
    code = {c: k for k, c in enumerate(classes)}
    logger.info("labels are class names; mapped in sorted order: {}", code)
    return np.asarray([code[v] for v in values], np.int64), classes


def _as_int(value: Any) -> int | None:
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float):
        return int(value)
    return int(value) if re.fullmatch(r"\s*-?\d+\s*", value) else None


def _numbers(values: list, where: str) -> np.ndarray:
    out = []
    for row, value in enumerate(values, 1):
        try:
            number = float(value) if not isinstance(value, bool) and not _is_missing(value) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number):
            raise ExperimentError(f"{where}: row {row} has the label {None if value is _MISSING else value!r}; "
                                  "task = 'regression' needs a finite number in every row")
        out.append(number)
    return np.asarray(out, np.float64)


def class_counts(data: ProbeDataset, names: list[str] | None, task: str = "classification") -> dict[str, int]:
    """``{label (name): examples}`` of a dataset; empty for regression targets."""
    if task == "regression":
        return {}
    values, counts = np.unique(data.labels, return_counts=True)
    return {_label_name(v, names): int(c) for v, c in zip(values, counts)}


def _label_name(label: Any, names: list[str] | None) -> str:
    return f"{label} ({names[int(label)]})" if names and 0 <= int(label) < len(names) else str(label)
