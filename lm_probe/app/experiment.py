"""Experiments: a whole probing run declared in one TOML file.

``lm-probe run experiment.toml`` reads a file like this one::

    seed = 0
    out = "runs/sentiment"                  # relative paths start at the file's folder

    [model]
    name = "smollm2-135m"                   # embedded name, local folder or hub id

    [data]
    source = "rotten_tomatoes"              # or path = "reviews.csv" / ".jsonl" / a saved dataset
    n_examples = 400

    [sites]
    kind = "resid_post"                     # or paths = ["model.layers.{0..29}.output"]
    layers = "0..29..3"

    [probes]
    pool = ["mean", "last"]                 # a list is a sweep: one probe per value
    alpha = [1e-4, 1e-3]

    [geometry]
    [gauges]
    n_samples = 128

and goes through three stages, each in one function:

1. :func:`load_experiment` parses the file into frozen dataclasses. Every key of every
   table is checked: an unknown key is an error naming it, its table and the closest
   valid key; values are type-checked against the schema (:data:`~lm_probe.app.schema.SCHEMA`).
2. :func:`lm_probe.app.plan.plan_experiment` does everything that needs no forward pass:
   reads the data and checks its columns and labels (:mod:`lm_probe.app.tables`), loads the
   model (its weights, to check sites), expands site ranges and kinds, resolves every
   site against the model, expands the probe sweep (the cartesian product of
   list-valued settings, per site), builds each seed's splits, probes and consumers, and
   checks the consumers' options. ``--dry-run`` stops here and prints
   :meth:`~lm_probe.app.plan.Plan.describe`.

Stages 1 and 2 report every problem they find in one :class:`ExperimentError` (a
:class:`Problems` list: the file's keys, the data, the model and its sites, the options,
then the output folder), so one run shows all there is to fix.
3. :func:`lm_probe.app.outputs.run_plan` trains every probe of a seed from one
   :class:`~lm_probe.ProbeRunner` (one trace per batch for all probes, the geometry and
   the gauges), then writes ``metrics.csv``, each consumer's artifacts, ``run.json`` and
   ``report.html`` (:mod:`lm_probe.app.report`).

This module holds the parsing of the file; its schema is :mod:`lm_probe.app.schema`, its
brace ranges :mod:`lm_probe.app.braces`, its problems :mod:`lm_probe.app.problems`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from ..probes.config import _HEADS, ProbeConfig
from .problems import ExperimentError, Problems
from .schema import REQUIRED, SECTIONS, SWEEPABLE, TOP_LEVEL, DataSection, Experiment, ProbesSection

__all__ = ["load_experiment", "parse_experiment"]

_NOT_ESTIMATOR = {"random_state": "it is set from seed/seeds", "loss": "probes always use log-loss",
                  "hidden_layer_sizes": "use hidden_size", "classes": "classes come from the data's labels"}



def load_experiment(path: str | Path, *, out: str | Path | None = None,
                    seeds: Sequence[int] | None = None, strict: bool = True) -> Experiment:
    """Read and check an experiment file (no model or data is loaded).

    Every table and key is checked, and every problem found is reported together.

    Args:
        path: The TOML file.
        out: Replace the file's output folder (relative to the current directory).
        seeds: Replace the file's seeds.
        strict: Raise if the file has any problem. ``False``: return what could be read,
            with the problems in :attr:`Experiment.problems` (for
            :func:`lm_probe.app.plan.plan_experiment` to add those of the model and data).

    Raises:
        ExperimentError: the file is missing or not TOML, or (``strict``) has unknown keys
            or bad values; the message names the file, and each problem its table and key.
    """
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        return parse_experiment(text, base=path.resolve().parent, name=path.stem, source=path,
                                out=out, seeds=seeds, strict=strict)
    except ExperimentError as err:
        raise ExperimentError(err.problems, where=path) from None


def parse_experiment(text: str, *, base: str | Path = ".", name: str = "experiment", source: Path | None = None,
                     out: str | Path | None = None, seeds: Sequence[int] | None = None,
                     strict: bool = True) -> Experiment:
    """Parse experiment TOML text; relative paths in it start at ``base``.

    Args:
        text: TOML text.
        base: Folder that relative paths in the text are relative to.
        name: Default report title and output folder name.
        source: The file the text came from (recorded in the outputs).
        out: Override the output folder (relative to the current directory).
        seeds: Override the seeds.
        strict: Raise on any problem; ``False``: record them in :attr:`Experiment.problems`.

    Raises:
        ExperimentError: invalid TOML; and (``strict``) unknown keys, missing tables or keys,
            or bad values, all of them in one error.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ExperimentError(f"not valid TOML: {err}") from None
    problems, invalid = Problems(), set()
    base = Path(base)
    top, parsed, probes, found_seeds = _parse_tables(doc, seeds, problems, invalid)
    if strict:
        problems.raise_any()
    geometry, gauges = parsed.get("geometry"), parsed.get("gauges")
    default_out = f"runs/{name}"
    return Experiment(
        model=parsed.get("model"), data=parsed.get("data"), sites=parsed.get("sites"), probes=probes,
        geometry=geometry if geometry is not None and geometry.enabled else None,
        gauges=gauges if gauges is not None and gauges.enabled else None,
        seeds=found_seeds or (),
        out=Path(out).resolve() if out is not None else (base / top.get("out", default_out)).resolve(),
        name=top.get("name", name), base=base, source=source, text=text,
        problems=tuple(problems.found), invalid=frozenset(invalid),
    )


def _parse_tables(doc: dict, seeds: Sequence[int] | None, problems: Problems,
                  invalid: set[str]) -> tuple[dict[str, Any], dict[str, Any], Any, tuple[int, ...] | None]:
    """Every table and top-level key of a TOML document, checked; each problem is recorded
    in ``problems`` and its table (``""``: the top level) in ``invalid``.

    Returns:
        ``(top, tables, probes, seeds)``: the top-level values that passed, the parsed
        ``[model]``, ``[data]``, ``[sites]``, ``[geometry]`` and ``[gauges]`` tables (``None``
        where a required key is missing), the ``[probes]`` section and the seeds.
    """
    def check(table: str, parse: Any) -> Any:
        """Run one table's parse; a table with any problem is marked invalid."""
        before, value = len(problems), None
        with problems.collect():
            value = parse()
        if len(problems) > before:
            invalid.add(table)
        return value

    check("", lambda: _reject_unknown(doc, [*TOP_LEVEL, *SECTIONS], "the top level", "table or key"))
    top = {key: check("", lambda key=key, types=types: _check_value(doc[key], types, "the top level", key))
           for key, (types, _) in TOP_LEVEL.items() if key in doc}
    top = {key: value for key, value in top.items() if value is not None}  # the values that passed
    missing = [table for table in ("model", "data", "sites") if table not in doc]
    if missing:
        problems.add(f"missing table {', '.join(f'[{t}]' for t in missing)}; an experiment needs [model], [data] "
                     "and [sites]")
        invalid.update(missing)
    parsed = {table: check(table, lambda table=table: _parse_table(SECTIONS[table], doc[table], table, problems))
              for table in ("model", "data", "sites", "geometry", "gauges") if table in doc}
    probes = check("probes", lambda: _parse_probes(doc.get("probes", {}), problems))
    if parsed.get("data") is not None:
        check("data", lambda: _check_data(parsed["data"]))
    if parsed.get("sites") is not None and not parsed["sites"].paths and not parsed["sites"].kind:
        check("sites", lambda: _fail("[sites] names no site: give paths = [...] or kind = 'resid_post'"))
    found_seeds = check("", lambda: _seeds(top) if seeds is None else _unique_seeds(list(seeds), "--seed"))
    return top, parsed, probes, found_seeds


def _fail(message: str) -> None:
    raise ExperimentError(message)


def _reject_unknown(table: dict, valid: Sequence[str], where: str, what: str = "key") -> None:
    """Every key of ``table`` not in ``valid``, each with the closest valid key, in one error."""
    unknown = []
    for key in table:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ";"
            unknown.append(f"unknown {what} {key!r} in {where}{hint} valid: {', '.join(valid)}")
    if unknown:
        raise ExperimentError(unknown)


def _describe_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _check_value(value: Any, types: tuple, where: str, key: str, choices: Sequence | None = None,
                 items: type | None = None, minimum: float | None = None) -> Any:
    """``value`` if it has one of ``types`` (ints pass for floats, never bools for numbers)."""
    wanted = " or ".join({bool: "true/false", int: "an integer", float: "a number", str: "a string",
                          list: "a list", dict: "a table"}[t] for t in types)
    ok = any(isinstance(value, t) and not (isinstance(value, bool) and t is not bool) for t in types)
    if not ok and float in types and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ExperimentError(f"{where}: {key} must be {wanted}, got {value!r} ({_describe_type(value)})")
    if isinstance(value, list) and items is not None:
        for item in value:
            _check_value(item, (items,), where, f"{key} (each item)", choices, minimum=minimum)
    elif choices is not None and not isinstance(value, list) and value not in choices:
        raise ExperimentError(f"{where}: {key} = {value!r} is not one of {', '.join(map(repr, choices))}")
    elif minimum is not None and isinstance(value, (int, float)) and value < minimum:
        raise ExperimentError(f"{where}: {key} = {value!r} must be at least {minimum}")
    return value


def _parse_table(cls: type, table: Any, section: str, problems: Problems) -> Any:
    """A section dataclass from a TOML table, every key checked; each problem is recorded in
    ``problems`` and the key left at its default. ``None`` when a required key is missing or bad."""
    where = f"[{section}]"
    if not isinstance(table, dict):
        raise ExperimentError(f"{section} must be a table [{section}], got {_describe_type(table)}")
    specs = [f for f in fields(cls) if not f.metadata.get("internal")]
    with problems.collect():
        _reject_unknown(table, [f.name for f in specs], where)
    values = {}
    for f in specs:
        meta = f.metadata
        if f.name in table:
            with problems.collect():
                value = _check_value(table[f.name], meta["types"], where, f.name, meta["choices"], meta["items"],
                                     meta["minimum"])
                if meta["items"] is str and isinstance(value, str):
                    value = [value]
                values[f.name] = tuple(value) if isinstance(value, list) and f.name != "layers" else value
        elif f.default is REQUIRED:
            problems.add(f"{where} needs {f.name!r}: {meta['help']}")
    if any(f.default is REQUIRED and f.name not in values for f in specs):
        return None
    return cls(**values)


def _parse_probes(table: Any, problems: Problems) -> ProbesSection | None:
    """``[probes]``: lm_probe's keys are checked like any table; other keys must be estimator arguments."""
    if not isinstance(table, dict):
        raise ExperimentError(f"probes must be a table [probes], got {_describe_type(table)}")
    own = {f.name for f in fields(ProbesSection) if not f.metadata.get("internal")}
    section = _parse_table(ProbesSection, {k: v for k, v in table.items() if k in own}, "probes", problems)
    for key in SWEEPABLE:
        value = getattr(section, key)
        if isinstance(value, tuple) and not value:
            problems.add(f"[probes] {key} = [] sweeps over nothing; give at least one value")
    if isinstance(section.val_size, float) and section.val_size >= 1:
        problems.add(f"[probes] val_size = {section.val_size} must be a share below 1 or a number of examples")
    if not 0 < section.ci < 1:
        problems.add(f"[probes] ci = {section.ci} must be a coverage strictly between 0 and 1, e.g. 0.95")
    extra = {k: v for k, v in table.items() if k not in own}
    heads = _as_tuple(section.head) or ("auto",)
    valid = set.intersection(*[_estimator_params(h, section.task) for h in heads])
    anywhere = set.union(*[_estimator_params(h, t) for t, h in _HEADS])
    estimator = []
    for key, value in extra.items():
        with problems.collect():
            if key in _NOT_ESTIMATOR:
                raise ExperimentError(f"[probes] {key!r} cannot be set: {_NOT_ESTIMATOR[key]}")
            if key not in valid:
                if key in anywhere:
                    raise ExperimentError(
                        f"[probes] {key!r} is not an argument of the estimator of head {list(heads)} and task "
                        f"{section.task!r}; its arguments are {sorted(valid)}")
                _reject_unknown({key: value}, sorted(own | valid), "[probes]")
            values = tuple(value) if isinstance(value, list) else (value,)
            if not values:
                raise ExperimentError(f"[probes] {key} = [] sweeps over nothing; give at least one value")
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise ExperimentError(f"[probes] {key} lists a value twice: {list(values)}")
            estimator.append((key, values))
    return dataclasses.replace(section, estimator=tuple(estimator))


def _estimator_params(head: str, task: str) -> set[str]:
    estimator = ProbeConfig("x.output", head=head, task=task).estimator
    return set(estimator().get_params()) - set(_NOT_ESTIMATOR)


def _check_data(data: DataSection) -> None:
    if (data.source is None) == (data.path is None):
        raise ExperimentError("[data] needs exactly one of source = 'rotten_tomatoes' (embedded) or "
                              "path = '<file.csv|file.jsonl|saved dataset folder>'")
    if not (0 < data.test_size < 1 or (isinstance(data.test_size, int) and data.test_size >= 1)):
        raise ExperimentError(f"[data] test_size must be a share in (0, 1) or a number of examples, "
                              f"got {data.test_size}")


def _seeds(doc: dict) -> tuple[int, ...]:
    if "seed" in doc and "seeds" in doc:
        raise ExperimentError("give seed = N or seeds = [...], not both")
    if "seeds" in doc:
        return _unique_seeds(doc["seeds"], "seeds")
    return (doc.get("seed", 0),)


def _unique_seeds(seeds: list, where: str) -> tuple[int, ...]:
    if not seeds:
        raise ExperimentError(f"{where} is empty; give at least one seed")
    for s in seeds:
        _check_value(s, (int,), "the top level", f"{where} (each item)")
    if len(set(seeds)) != len(seeds):
        raise ExperimentError(f"{where} lists a seed twice: {seeds}")
    return tuple(seeds)


def _as_tuple(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)

