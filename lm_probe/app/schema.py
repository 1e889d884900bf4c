"""The experiment file's schema: its tables, their keys, types, defaults and help.

Each table is a frozen dataclass whose fields carry their TOML types, choices, bounds
and help text as metadata (:func:`_key`); :data:`SCHEMA` lists every table and key with
its help (it drives parsing, :mod:`lm_probe.app.experiment`, and ``lm-probe run --help``,
:func:`schema_help`). A parsed file is an :class:`Experiment`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from ..consumers.gauge import N_SAMPLES

__all__ = ["Experiment", "ModelSection", "DataSection", "SitesSection", "ProbesSection", "GeometrySection",
           "GaugesSection", "SCHEMA", "SECTIONS", "SWEEPABLE", "TOP_LEVEL", "REQUIRED", "schema_help"]

REQUIRED = dataclasses.MISSING


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
    head: Any = _key("auto", types=(str, list), items=str, choices=("auto", "linear", "softmax", "mlp"),
                     help="'auto' ('softmax' for more than two classes, else 'linear'), 'linear' (SGD "
                          "logistic regression, one-vs-rest for more than two classes), 'softmax' (SGD "
                          "multinomial logistic regression) or 'mlp' (sweepable)")
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
    num_epochs: int = _key(100, types=(int,), minimum=1,
                           help="passes over the training examples at most (early stopping ends training first)")
    val_size: float = _key(0.1, types=(float, int), minimum=0, help="validation share for early stopping (0: none)")
    eval_every: int = _key(10, types=(int,), minimum=1, help="training steps between validations")
    patience: int = _key(15, types=(int,), minimum=1, help="validations without improvement before a probe stops")
    lr_decay: float = _key(0.5, types=(float, int), minimum=0,
                           help="multiply an SGD probe's step by this after decay_patience validations without "
                                "improvement (0: constant steps)")
    decay_patience: int = _key(3, types=(int,), minimum=1, help="validations without improvement before each decay")
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
    baseline: str = _key("none", types=(str,), choices=("none", "random_init"),
                         help="'random_init': also train every probe on a copy of the model with re-initialized "
                              "weights, on the same batches (one extra forward per example); metrics gain "
                              "baseline_accuracy, baseline_loss, ... ('none': no such baseline)")
    ci: float = _key(0.95, types=(float,), minimum=0,
                     help="coverage of the percentile bootstrap interval of every test metric (<metric>_lo, "
                          "<metric>_hi), strictly between 0 and 1")
    n_boot: int = _key(1000, types=(int,), minimum=0,
                       help="bootstrap resamples of the test examples per interval (0: no intervals)")
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
    """A parsed experiment file (see :mod:`lm_probe.app.experiment` and :data:`SCHEMA`).

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


#: The top-level keys: their TOML types and help.
TOP_LEVEL = {
    "name": ((str,), "title of the report (default: the file's name)"),
    "seed": ((int,), "seed of the subset, splits, batch order, probes and consumers (default 0)"),
    "seeds": ((list,), "several seeds: one run each in seed_<s>/, plus combined metrics and report"),
    "out": ((str,), "output folder (default 'runs/<file name>'; relative to the file)"),
}
SECTIONS: dict[str, type] = {"model": ModelSection, "data": DataSection, "sites": SitesSection,
                             "probes": ProbesSection, "geometry": GeometrySection, "gauges": GaugesSection}
#: Every table and its keys with their help text (drives parsing and ``lm-probe run --help``).
SCHEMA: dict[str, dict[str, str]] = {
    "": {k: h for k, (_, h) in TOP_LEVEL.items()},
    **{name: {f.name: f.metadata["help"] for f in fields(cls) if not f.metadata.get("internal")}
       for name, cls in SECTIONS.items()},
}
#: The [probes] settings a list sweeps over (besides any estimator argument).
SWEEPABLE = ("pool", "head", "control", "standardize", "hidden_size", "solver")


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

