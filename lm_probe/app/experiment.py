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
   valid key; values are type-checked against the schema (:data:`SCHEMA`).
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

This module holds the file format: the schema, its parsing and the brace ranges.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import json
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..consumers.gauge import N_SAMPLES
from ..probes.probe import _HEADS, ProbeConfig

__all__ = ["ExperimentError", "Problems", "Experiment", "SCHEMA", "SECTIONS", "SWEEPABLE", "load_experiment",
           "parse_experiment", "expand_braces", "parse_layers", "schema_help"]

REQUIRED = dataclasses.MISSING


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


# ---------------------------------------------------------------------------- schema
def _key(default: Any = REQUIRED, *, types: tuple, help: str, choices: Sequence | None = None,
         items: type | None = None, minimum: float | None = None) -> Any:
    """A schema entry: a dataclass field whose metadata says what the TOML value may be."""
    return field(default=default, metadata={"types": types, "help": help, "choices": choices, "items": items,
                                            "minimum": minimum})


@dataclass(frozen=True)
class ModelSection:
    """``[model]``: which model to probe."""

    name: str = _key(types=(str,), help="embedded model name ('smollm2-135m'), a local folder (relative to the "
                                         "file) or a Hugging Face hub id")
    dtype: str | None = _key(None, types=(str,), choices=("float32", "float16", "bfloat16"),
                             help="weight dtype (default: the checkpoint's)")
    device: str | None = _key(None, types=(str,), help="device map for the weights, e.g. 'cpu' or 'cuda:0'")


@dataclass(frozen=True)
class DataSection:
    """``[data]``: labeled texts, split into train and test."""

    source: str | None = _key(None, types=(str,), choices=("rotten_tomatoes",),
                              help="an embedded data set (give source or path)")
    path: str | None = _key(None, types=(str,), help="a .csv or .jsonl file, or a folder written by "
                                                     "datasets' save_to_disk (relative to the file)")
    split: str | None = _key(None, types=(str,), help="the split to read from a saved DatasetDict")
    text_column: str = _key("text", types=(str,), help="column with the texts")
    label_column: str = _key("label", types=(str,), help="column with the labels (integers or class names; "
                                                         "numbers for task = 'regression')")
    n_examples: int = _key(0, types=(int,), minimum=0, help="a seeded random subset of this many rows (0: all)")
    max_length: int = _key(128, types=(int,), minimum=1, help="tokens per text at most (longer texts are "
                                                              "truncated and counted in a warning)")
    test_size: float = _key(0.2, types=(float, int), help="test share (0-1) or number of test examples; "
                                                          "stratified, seeded split")
    batch_size: int = _key(16, types=(int,), minimum=1, help="examples per forward pass")


@dataclass(frozen=True)
class SitesSection:
    """``[sites]``: where the probes read (geometry and gauges default to the same sites)."""

    paths: tuple[str, ...] = _key((), types=(list, str), items=str,
                                  help="site strings; braces expand: 'model.layers.{0..29}.output', "
                                       "'{0..29..3}' (step), '{mlp,self_attn}' (words)")
    kind: tuple[str, ...] = _key((), types=(list, str), items=str,
                                 help="site kinds found from the model's structure: embed, resid_pre, "
                                      "attn_out, mlp_out, resid_post (one or a list)")
    layers: Any = _key("all", types=(str, int, list), items=int,
                       help="layers of the kinds: 'all', an index, a list, or a range 'first..last' / "
                            "'first..last..step' (inclusive; negative counts from the end)")


@dataclass(frozen=True)
class ProbesSection:
    """``[probes]``: probe settings (lists are sweeps) and training settings."""

    enabled: bool = _key(True, types=(bool,), help="train probes (false: geometry and gauges only)")
    pool: Any = _key("mean", types=(str, list), items=str, choices=("mean", "last", "first", "max"),
                     help="pooling of each example's tokens (sweepable; token-level probes, pool 'none', need "
                          "word-tagged data: use the Python API)")
    head: Any = _key("linear", types=(str, list), items=str, choices=("linear", "softmax", "mlp"),
                     help="'linear' (SGD logistic regression, one-vs-rest for more than two classes), "
                          "'softmax' (SGD multinomial logistic regression) or 'mlp' (sweepable)")
    task: str = _key("classification", types=(str,), choices=("classification", "regression"),
                     help="'classification' (integer or named labels) or 'regression' (numeric labels)")
    control: Any = _key(False, types=(bool, list), items=bool,
                        help="also train a control-task twin per probe: adds control_accuracy and "
                             "selectivity (sweepable)")
    standardize: Any = _key(True, types=(bool, list), items=bool,
                            help="standardize features with running moments (sweepable)")
    hidden_size: Any = _key(64, types=(int, list), minimum=1, items=int,
                            help="hidden units of the mlp head (sweepable)")
    solver: Any = _key("sgd", types=(str, list), items=str, choices=("sgd", "lbfgs"),
                       help="'sgd' (online, batch by batch) or 'lbfgs' (linear classifiers: a full-batch "
                            "logistic regression on the cached rows, C chosen by 5-fold cross-validation; sweepable)")
    num_epochs: int = _key(3, types=(int,), minimum=1, help="passes over the training examples at most")
    val_size: float = _key(0.1, types=(float, int), minimum=0, help="validation share for early stopping (0: none)")
    eval_every: int = _key(10, types=(int,), minimum=1, help="training steps between validations")
    patience: int = _key(5, types=(int,), minimum=1, help="validations without improvement before a probe stops")
    lr_decay: float = _key(0.0, types=(float, int), minimum=0,
                           help="multiply an SGD probe's step by this after decay_patience validations without "
                                "improvement (0: constant steps)")
    decay_patience: int = _key(2, types=(int,), minimum=1, help="validations without improvement before each decay")
    min_delta: float = _key(1e-4, types=(float, int), minimum=0,
                            help="smallest validation-loss improvement that counts")
    warmup_steps: int = _key(0, types=(int,), minimum=0, help="no early stop before this many steps")
    max_steps: int | None = _key(None, types=(int,), minimum=1, help="training steps per probe at most")
    cache: bool = _key(True, types=(bool,), help="trace each training example once and replay its pooled rows to "
                                                  "the probes in later epochs (false: trace every epoch)")
    cache_budget_mib: int = _key(2048, types=(int,), minimum=0,
                                 help="MiB of replayed rows held in memory; the rest spill to memory-mapped files")
    cache_dir: str = _key("", types=(str,), help="folder for spilled rows ('': the system's temporary folder)")
    save: bool = _key(True, types=(bool,), help="save the trained probes in probes/ (JSON + npz)")
    backend: str = _key("sklearn", types=(str,), choices=("sklearn", "torch"),
                        help="'sklearn' (each probe's own partial_fit) or 'torch' (all linear classifiers in one "
                             "batched step on the model's device)")
    estimator: tuple[tuple[str, tuple], ...] = field(default=(), metadata={"internal": True})


@dataclass(frozen=True)
class GeometrySection:
    """``[geometry]``: covariance spectra and CKA on the same traces."""

    enabled: bool = _key(True, types=(bool,), help="run the geometry consumer (the table's presence enables it)")
    sites: tuple[str, ...] | None = _key(None, types=(list, str), items=str,
                                         help="sites (default: those of [sites]); braces expand")
    pool: str = _key("mean", types=(str,), choices=("mean", "last", "first", "max", "none"),
                     help="'none': every real token is a row; else one pooled row per example")
    sample_limit: int = _key(512, types=(int,), minimum=2,
                             help="rows in the reservoir sample (sample metrics and the layer-by-layer CKA heatmap)")
    novelty_k: int = _key(32, types=(int,), minimum=1, help="dimension of the subspaces compared by novelty")
    sketch_rank: int | None = _key(None, types=(int,), minimum=1,
                                   help="Frequent Directions sketch rank instead of the dense covariance (wide models)")


@dataclass(frozen=True)
class GaugesSection:
    """``[gauges]``: diffusion-operator spectra of a fixed example subset, per site."""

    enabled: bool = _key(True, types=(bool,), help="run the diffusion gauge (the table's presence enables it)")
    sites: tuple[str, ...] | None = _key(None, types=(list, str), items=str,
                                         help="sites (default: those of [sites]); braces expand")
    pool: str = _key("mean", types=(str,), choices=("mean", "last", "first", "max"), help="pooling per example")
    n_samples: int = _key(N_SAMPLES, types=(int,), minimum=2, help="examples in the seeded subset")
    knn: int = _key(15, types=(int,), minimum=1, help="neighbours of the k-NN graph")
    alpha: float = _key(0.0, types=(float, int), help="anisotropy (0: none, 1: Laplace-Beltrami)")
    normalization: str = _key("markov", types=(str,), choices=("markov", "symmetric"),
                              help="'markov' (random-walk) or 'symmetric' operator")
    n_eigs: int = _key(32, types=(int,), minimum=1, help="top eigenvalues recorded")
    bandwidth: Any = _key("adaptive", types=(str, float, int), help="'adaptive', 'median' or a positive number")
    sparse: bool = _key(True, types=(bool,), help="sparse k-NN kernel")
    self_loops: bool = _key(True, types=(bool,), help="keep the kernel's diagonal")
    n_pca: int | None = _key(None, types=(int,), minimum=1, help="project on this many principal components first")
    t: float = _key(1, types=(float, int), help="diffusion time of the entropy")


@dataclass(frozen=True)
class Experiment:
    """A parsed experiment file (see the module docstring and :data:`SCHEMA`).

    Attributes:
        seeds: One run per seed (``seed = 0`` or ``seeds = [0, 1, 2]``).
        out: Output folder (absolute).
        source: The file the experiment was read from, and ``text`` its content.
        problems: What is wrong with the file, when it was read with ``strict=False``
            (else always empty: a strict read raises instead).
        invalid: The tables with a problem (``""``: the top level); a table that could not
            be read at all is ``None``. Planning skips every check that needs one of them.
    """

    model: ModelSection
    data: DataSection
    sites: SitesSection
    probes: ProbesSection
    geometry: GeometrySection | None
    gauges: GaugesSection | None
    seeds: tuple[int, ...]
    out: Path
    name: str
    base: Path
    source: Path | None = None
    text: str = ""
    problems: tuple[str, ...] = ()
    invalid: frozenset[str] = frozenset()


_TOP = {
    "name": ((str,), "title of the report (default: the file's name)"),
    "seed": ((int,), "seed of the subset, splits, batch order, probes and consumers (default 0)"),
    "seeds": ((list,), "several seeds: one run each in seed_<s>/, plus combined metrics and report"),
    "out": ((str,), "output folder (default 'runs/<file name>'; relative to the file)"),
}
SECTIONS: dict[str, type] = {"model": ModelSection, "data": DataSection, "sites": SitesSection,
                             "probes": ProbesSection, "geometry": GeometrySection, "gauges": GaugesSection}
#: Every table and its keys with their help text (drives parsing and ``lm-probe run --help``).
SCHEMA: dict[str, dict[str, str]] = {
    "": {k: h for k, (_, h) in _TOP.items()},
    **{name: {f.name: f.metadata["help"] for f in fields(cls) if not f.metadata.get("internal")}
       for name, cls in SECTIONS.items()},
}
#: The [probes] settings a list sweeps over (besides any estimator argument).
SWEEPABLE = ("pool", "head", "control", "standardize", "hidden_size", "solver")
_NOT_ESTIMATOR = {"random_state": "it is set from seed/seeds", "loss": "probes always use log-loss",
                  "hidden_layer_sizes": "use hidden_size", "classes": "classes come from the data's labels"}


def schema_help() -> str:
    """The experiment file's tables and keys, one line each (for ``lm-probe run --help``)."""
    import textwrap

    def entry(key: str, text: str) -> list[str]:
        return textwrap.wrap(text, width=width, initial_indent=f"  {key:<14} ", subsequent_indent=" " * 17)

    width, lines = 100, []
    for table, keys in SCHEMA.items():
        lines.append("top level:" if not table else f"[{table}]")
        defaults = {f.name: f.default for f in fields(SECTIONS[table])} if table else {}
        for key, text in keys.items():
            default = defaults.get(key, REQUIRED)
            choices = SECTIONS[table].__dataclass_fields__[key].metadata["choices"] if table else None
            if choices and not all(repr(c) in text for c in choices):
                text += f"; one of {', '.join(map(repr, choices))}"
            if default is REQUIRED and table:
                text += " (required)"
            elif default not in (REQUIRED, None, ()):
                text += f" (default {json.dumps(default)})"
            lines += entry(key, text)
        if table == "probes":
            lines += entry("<other>", "any argument of the probe's scikit-learn estimator (SGDClassifier: alpha, "
                           "penalty, l1_ratio, learning_rate, eta0, class_weight, ...; MLPClassifier for head = "
                           "'mlp'); a list is a sweep, [[64, 32]] passes one list value")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- parsing
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

    def check(table: str, parse: Any) -> Any:
        """Run one table's parse; a table with any problem is marked invalid."""
        before, value = len(problems), None
        with problems.collect():
            value = parse()
        if len(problems) > before:
            invalid.add(table)
        return value

    check("", lambda: _reject_unknown(doc, [*_TOP, *SECTIONS], "the top level", "table or key"))
    top = {key: check("", lambda key=key, types=types: _check_value(doc[key], types, "the top level", key))
           for key, (types, _) in _TOP.items() if key in doc}
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
    extra = {k: v for k, v in table.items() if k not in own}
    heads = _as_tuple(section.head) or ("linear",)
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


# ---------------------------------------------------------------------------- ranges
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
