"""Saving and loading trained probes without pickle.

A saved runner is a folder with ``probes.json`` (schema version, versions, model
summary, each probe's configuration, training state and the estimator's scalar
attributes, the metrics) and ``arrays.npz`` (standardization moments and the
estimator's fitted arrays), read back with ``allow_pickle=False``: loading cannot
execute code. Any scikit-learn head lm_probe trains (SGD and MLP classifiers and
regressors) round-trips to identical predictions. A random-init baseline's runner
(:mod:`lm_probe.probes.baseline`) is saved the same way in ``baseline/`` and loaded
without a model, or, when a model is given, with its copy re-drawn under the saved seed.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.distributed import is_writer, wait_for_writer
from ..core.model import model_metadata
from ..core.sources import NoSource
from ..core.versions import __version__, check_schema_version
from ..functional.metrics import METRIC_COLUMNS, REGRESSION_COLUMNS
from .baseline import random_init_copy
from .codelength import CODELENGTH_COLUMNS, Codelength
from .config import PER_PROBE, ProbeConfig
from .control import ControlTask
from .early_stopping import StopReason
from .probe import Probe
from .twins import make_probe

__all__ = ["Persistent", "save_probes", "SavedProbes", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
_NUMERIC = (*METRIC_COLUMNS, *REGRESSION_COLUMNS, *CODELENGTH_COLUMNS, "selectivity", "n_epochs")
_CONFIG_FIELDS = ("site", "classes", "pool", "name", "standardize", "head", "task", "hidden_size", "control",
                  "solver", "Cs", "cv", "scoring", *PER_PROBE)


def _encode(value: Any) -> Any:
    """JSON for estimator kwargs: tuples become lists, int-keyed dicts become tagged pairs."""
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {"__pairs__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__pairs__" in value:
            return {_decode(k): _decode(v) for k, v in value["__pairs__"]}
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _estimator_state(estimator: Any, prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Fitted public attributes (``name_``): arrays into ``arrays``, scalars returned."""
    scalars: dict[str, Any] = {}
    for key, value in vars(estimator).items():
        if not key.endswith("_") or key.startswith("_"):
            continue
        if isinstance(value, np.ndarray):
            arrays[f"{prefix}/{key}"] = value
        elif isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
            for i, v in enumerate(value):
                arrays[f"{prefix}/{key}/{i}"] = v
            scalars[key] = {"__arrays__": len(value)}
        elif value is None or isinstance(value, (bool, int, float, str, np.generic, list)):
            scalars[key] = _encode(value)
    return scalars


def _restore_estimator(probe: Probe, scalars: dict[str, Any], prefix: str, arrays: Any) -> None:
    est = probe.estimator_
    for key, value in scalars.items():
        if isinstance(value, dict) and "__arrays__" in value:
            value = [arrays[f"{prefix}/{key}/{i}"] for i in range(value["__arrays__"])]
        setattr(est, key, value)
    for key in arrays.files:
        head, _, name = key.rpartition("/")
        if head == prefix:
            setattr(est, name, arrays[key])
    if hasattr(est, "classes_") and hasattr(est, "coefs_"):  # MLPClassifier predicts through a binarizer
        from sklearn.preprocessing import LabelBinarizer

        est._label_binarizer = LabelBinarizer().fit(est.classes_)


def save_probes(runner: Any, path: str | Path, overwrite: bool = False) -> Path:
    """Write a runner's probes, configurations and metrics to the folder ``path``.

    Raises:
        FileExistsError: ``path`` holds files and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is not empty; pass overwrite=True to replace the saved probes")
    path.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    probes = []
    for k, (name, probe) in enumerate(runner.probes.items()):
        prefix = f"p{k}"
        n, arrays[f"{prefix}/mean"], arrays[f"{prefix}/m2"] = probe.moments
        cfg = {f: getattr(probe.config, f) for f in _CONFIG_FIELDS}
        if getattr(probe.config, "label_names", None) is not None:  # only when set: older readers never see it
            cfg["label_names"] = probe.config.label_names
        probes.append({
            "name": name, "config": _encode(cfg), "probe_kwargs": _encode(probe.config.probe_kwargs),
            "given_kwargs": _encode(getattr(probe.config, "given_kwargs", probe.config.probe_kwargs)),
            "random_state": probe.random_state, "n": n, "n_steps": probe.n_steps_,
            "best_loss": probe.best_loss_, "best_step": probe.best_step_, "stop_reason": str(probe.stopped_reason_),
            "n_nonfinite": probe.n_nonfinite_, "C": probe.C_, "converged": probe.converged_,
            "n_epochs": probe.n_epochs_, "n_rows": probe.n_rows_, "codelength": probe.codelength_.to_dict(),
            "classes": None if probe.classes_ is None else probe.classes_.tolist(),
            "label_names": getattr(probe, "label_names_", None),  # learned from the training set
            "estimator": _estimator_state(probe.estimator_, f"{prefix}/est", arrays),
        })
    versions = {"lm_probe": __version__, "python": platform.python_version(), "numpy": np.__version__}
    import sklearn

    versions["scikit-learn"] = sklearn.__version__
    document = {
        "schema_version": SCHEMA_VERSION, "versions": versions, "seed": runner.seed,
        "model": model_metadata(getattr(runner, "model", None)),
        "probes": probes,
        "control": None if runner.control is None else runner.control.to_dict(),
        "metrics": None if runner.metrics is None else json.loads(runner.metrics.to_json(orient="split")),
        "baselines": None if getattr(runner, "baselines", None) is None else
        json.loads(runner.baselines.to_json(orient="split")),
    }
    np.savez(path / "arrays.npz", **arrays)
    (path / "probes.json").write_text(json.dumps(document, indent=2, default=_encode))
    shutil.rmtree(path / "baseline", ignore_errors=True)  # a replaced save's baseline is not this runner's
    if getattr(runner, "baseline_runner", None) is not None:  # the random-init copy's probes, in baseline/
        save_probes(runner.baseline_runner, path / "baseline")
    return path


def _saved_config(cfg: dict[str, Any], kwargs: dict[str, Any]) -> ProbeConfig:
    """The saved configuration rebuilt from its fields and estimator arguments. A config's
    ``Cs=None`` means one SGD probe, where the argument ``Cs=None`` asks for the default
    twins: a probe saved without twins is rebuilt with ``Cs=()`` when its arguments alone
    would add them (none given, e.g. no ``alpha``)."""
    site, classes = cfg.pop("site"), cfg.pop("classes")
    config = ProbeConfig(site, classes, **cfg, **kwargs)
    if cfg.get("Cs") is None and config.Cs is not None:
        config = ProbeConfig(site, classes, **{**cfg, "Cs": ()}, **kwargs)
    return config


class SavedProbes:
    """A folder written by :func:`save_probes`, read in the order a runner is rebuilt from it
    (:meth:`lm_probe.ProbeRunner.load`): the document and configurations first (checked
    against the model), the probes' arrays once the runner stands.

    Args:
        path: The folder.
        model: The nnsight model the probes will be attached to (its hidden size is checked
            against the saved one), or ``None``.

    Raises:
        ValueError: a newer schema, or a model whose hidden size differs.
    """

    def __init__(self, path: str | Path, model: Any = None) -> None:
        self.path = path = Path(path)
        self.document = document = json.loads((path / "probes.json").read_text())
        check_schema_version(document, SCHEMA_VERSION, "probe", path)
        saved_hidden = (document.get("model") or {}).get("hidden_size")
        if model is not None:
            hidden = getattr(model._module.config, "hidden_size", None)
            if saved_hidden is not None and hidden is not None and hidden != saved_hidden:
                raise ValueError(f"the probes in {path} were trained on hidden size {saved_hidden} "
                                 f"({document['model']['name']!r}) but this model has hidden size {hidden}")
        configs: dict[str, ProbeConfig] = {}
        self._states = []
        for entry in document["probes"]:
            kwargs = entry.get("given_kwargs", entry["probe_kwargs"])  # older saves keep only the merged ones
            config = _saved_config(_decode(entry["config"]), _decode(kwargs))
            configs.setdefault(config.name, config)
            self._states.append((config, entry))
        self.configs = list(configs.values())  #: one per probe name (a control twin shares its probe's)
        self.seed: int = document["seed"]

    def restore(self, runner: Any) -> Any:
        """Put the saved probes, metrics and control task into ``runner`` (built from
        :attr:`configs` and :attr:`seed`); returns it."""
        runner.probes.update(self.probes())
        runner.metrics, runner.control = self.metrics(), self.control()
        runner.baselines = self.baselines()
        if (self.path / "baseline" / "probes.json").exists():  # no weights saved: the copy is re-drawn, if a model
            copy = None if runner.model is None else random_init_copy(runner.model, self.seed)
            runner.baseline_runner = type(runner).load(self.path / "baseline", copy)
        return runner

    def probes(self) -> dict[str, Probe]:
        """Every saved probe, its estimator and moments restored (from ``arrays.npz``)."""
        probes = {}
        with np.load(self.path / "arrays.npz", allow_pickle=False) as arrays:
            for k, (config, entry) in enumerate(self._states):
                probe = make_probe(config, classes=entry["classes"], random_state=entry["random_state"],
                                   name=entry["name"])
                probe.n_steps_, probe.best_loss_ = entry["n_steps"], entry["best_loss"]
                probe.best_step_ = entry["best_step"]
                probe.stopped_reason_ = StopReason(entry["stop_reason"])
                probe.n_nonfinite_ = entry.get("n_nonfinite", 0)
                probe.C_, probe.converged_ = entry.get("C"), entry.get("converged")
                probe.label_names_ = entry.get("label_names")
                probe.n_epochs_ = entry.get("n_epochs", 0)
                if entry.get("codelength") is not None:  # saved before issue 17: a fresh (empty) one
                    probe.codelength_ = Codelength.from_dict(entry["codelength"])
                if entry.get("n_rows") is not None:  # alpha="auto" was resolved with the fit's row count
                    probe.n_rows_ = entry["n_rows"]
                    probe.reset_estimator_alpha()
                probe.load_moments(entry["n"], arrays[f"p{k}/mean"], arrays[f"p{k}/m2"])
                _restore_estimator(probe, entry["estimator"], f"p{k}/est", arrays)
                probes[entry["name"]] = probe
        return probes

    def metrics(self) -> pd.DataFrame | None:
        """The saved metrics table (``None`` if there was none)."""
        return _metrics(self.document.get("metrics"))

    def baselines(self) -> pd.DataFrame | None:
        """The saved text baselines table (``None`` if there was none, or the folder predates it)."""
        return _metrics(self.document.get("baselines"), index=None)

    def control(self) -> ControlTask | None:
        """The saved control task (``None`` if there was none)."""
        control = self.document.get("control")
        return None if control is None else ControlTask.from_dict(control, seed=self.seed)


def _numeric(column: str) -> bool:
    """Whether a metrics column holds numbers: a known numeric column, with or without the
    ``baseline_`` / ``control_`` prefix and the ``_lo`` / ``_hi`` / ``_mean`` / ``_std`` suffix
    (so an all-NaN column, which JSON stores as nulls, reads back as floats, not objects)."""
    stem = column.removeprefix("baseline_")
    for suffix in ("_lo", "_hi", "_mean", "_std"):
        stem = stem.removesuffix(suffix)
    return stem in ("C", "alpha", *_NUMERIC) or stem.removeprefix("control_") in _NUMERIC


def _metrics(split: dict | None, index: str | None = "probe") -> pd.DataFrame | None:
    if split is None:
        return None
    frame = pd.DataFrame(split["data"], index=pd.Index(split["index"], name=index), columns=split["columns"])
    if "layer" in frame:
        frame["layer"] = frame["layer"].astype("Int64")
    for column in [c for c in frame if _numeric(c)]:
        frame[column] = pd.to_numeric(frame[column])
    if "support" in frame:
        frame["support"] = [None if v is None else {int(k): c for k, c in v.items()} for v in frame["support"]]
    return frame


class Persistent:
    """The runner's :meth:`save` and :meth:`load` (a mixin: it uses the runner's probes,
    configurations, metrics and seed, and its constructors)."""

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Save the probes, their configurations and the metrics (JSON + npz, no pickle;
        :mod:`lm_probe.probes.persist`); a ``FileExistsError`` if ``path`` is not empty and
        ``overwrite`` is False. Under data parallelism rank 0 writes and every rank waits for it."""
        written = save_probes(self, path, overwrite=overwrite) if is_writer(self.source) else Path(path)
        wait_for_writer(self.source)
        return written

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> Any:
        """Load probes saved with :meth:`save`; give ``model`` to trace again, or use
        ``runner[name].predict(features)`` without one. A ``ValueError`` for a newer schema,
        or a model of another hidden size."""
        saved = SavedProbes(path, model)
        if model is not None:
            return saved.restore(cls(model, saved.configs, seed=saved.seed, progress=False))
        return saved.restore(cls.from_source(NoSource(), saved.configs, seed=saved.seed, progress=False))
