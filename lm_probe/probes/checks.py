"""The checks ``fit_probes`` and ``evaluate`` make before any forward pass.

Every probe's configuration is matched against the data it is given (token-level or
one row per example, classes or regression targets, label names, the classes a probe
predicts), probe names are checked for collisions, and ``solver="lbfgs"`` probes are
checked to fit their rows in the replay cache's memory budget. Each failure is a
``TypeError``, ``ValueError`` or ``MemoryError`` whose message names the probe and says
what to change.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from ..core.batching import check_batch_size

from ..core.dataset import ProbeDataset

from ..core.labels import format_labels
from ..core.replay import Cache
from .config import ProbeConfig
from .probe import Probe

__all__ = ["check_fit", "split_validation", "check_intervals", "check_names", "check_labels", "check_solver_memory", "class_names"]


def check_fit(probes: Sequence[Probe], train: ProbeDataset, test: ProbeDataset | None, *, batch_size: int,
              num_epochs: int, eval_every: int, cache: Any, ci: float = 0.95, n_boot: int = 1000) -> int:
    """``fit_probes``' arguments and data, checked before anything runs.

    Returns:
        ``batch_size`` as an int.

    Raises:
        ValueError, TypeError: a bad argument, or data that does not suit a probe (see
            :func:`check_labels`).
    """
    batch_size = check_batch_size(batch_size)
    if num_epochs < 1 or eval_every < 1:
        raise ValueError(f"num_epochs and eval_every must be at least 1, got {num_epochs}, {eval_every}")
    if cache is not None and not isinstance(cache, Cache):
        raise TypeError(f"cache must be lm_probe.Cache(...) or None, got {type(cache).__name__}")
    check_intervals(ci, n_boot)
    check_labels(probes, train, "training")
    if test is not None:
        check_labels(probes, test, "test", default=tuple(train.classes.tolist()))
    return batch_size


def split_validation(train: ProbeDataset, val_size: float, seed: int) -> tuple[ProbeDataset, ProbeDataset | None]:
    """``fit_probes``' split of ``train``: ``(fitted, validation)``, a stratified ``val_size``
    share held out with ``seed`` (``(train, None)`` when ``val_size`` is 0).

    Raises:
        ValueError: a split that cannot be made (too few examples for a stratified share),
            naming the fix.
    """
    if not val_size:
        return train, None
    try:
        return train.tt_split(val_size, seed=seed)
    except ValueError as err:
        raise ValueError(f"cannot hold out val_size={val_size} of the {len(train)} training examples for validation "
                         f"({err}); give more training examples, a larger val_size, or val_size=0 (no validation "
                         "and no early stopping)") from None


def check_intervals(ci: Any, n_boot: Any) -> None:
    """Refuse a bootstrap coverage outside (0, 1) or a resample count that is not an int >= 0."""
    if isinstance(ci, bool) or not isinstance(ci, (int, float)) or not 0 < ci < 1:
        raise ValueError(f"ci must be a coverage strictly between 0 and 1, e.g. ci=0.95, got {ci!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"n_boot must be a whole number of bootstrap resamples >= 0 (0: no intervals), "
                         f"e.g. n_boot=1000, got {n_boot!r}")


def check_names(configs: Iterable[ProbeConfig]) -> None:
    """Refuse anything but ProbeConfig objects, and two probes of the same name."""
    seen: dict[str, ProbeConfig] = {}
    for config in configs:
        if not isinstance(config, ProbeConfig):
            raise TypeError(f"configs must be ProbeConfig objects, got {type(config).__name__}")
        if config.name in seen:
            raise ValueError(
                f"two probes are named {config.name!r} ({seen[config.name]!r} and {config!r}); "
                "give each a unique name=..., e.g. ProbeConfig(site, pool='last', name='l9-last')"
            )
        seen[config.name] = config


def check_labels(probes: Sequence[Probe], data: ProbeDataset, what: str,
                 default: tuple[int, ...] | None = None) -> None:
    """Check that ``data`` (the ``what`` set: training, test) suits every probe: its label
    level, task, label names and classes (``default``: the classes of probes that name none)."""
    if not isinstance(data, ProbeDataset):
        raise TypeError(f"the {what} set must be a ProbeDataset, got {type(data).__name__}")
    for probe in probes:
        token, config = probe.config.pool == "none", probe.config
        if token and not data.is_token_level:
            raise ValueError(f"probe {probe.name!r} uses pool='none' (token-level) but the {what} set has one "
                             "label per example; build it with ProbeDataset.from_tagged(...)")
        if not token and data.is_token_level:
            raise ValueError(f"probe {probe.name!r} pools to one row per example but the {what} set has token "
                             "labels; use pool='none' for token-level probes")
        if probe.is_classifier and data.is_regression:
            raise ValueError(f"probe {probe.name!r} is a classifier but the {what} labels are floats; "
                             "use ProbeConfig(..., task='regression') for continuous targets")
        named = getattr(config, "label_names", None)
        if named is not None and data.label_names is not None and named != data.label_names:
            raise ValueError(f"probe {probe.name!r} names its labels {named} but the {what} set names them "
                             f"{data.label_names}; give the probe label_names={data.label_names!r}")
    if data.is_regression or not any(p.is_classifier for p in probes):
        return
    present = set(data.classes.tolist())
    if what == "training" and len(present) < 2:
        single = format_labels(sorted(present), class_names(data, [p.config for p in probes]))
        raise ValueError(f"the training set has a single class ({single}); a probe needs examples of at least two")
    if data.is_token_level and what != "training":
        return  # a new tag in the test set is reported at scoring time, not an error
    for probe in probes:
        allowed = probe.config.classes or default
        names = getattr(probe.config, "label_names", None) or data.label_names
        classes = sorted(int(c) for c in (allowed if allowed is not None else present))
        if probe.is_classifier and names is not None and not all(0 <= c < len(names) for c in classes):
            raise ValueError(f"probe {probe.name!r}: label_names {list(names)} name labels 0..{len(names) - 1} but "
                             f"its classes are {classes}; give one name per label up to the "
                             "largest (label_names[i] names label i), or relabel the data 0..k-1")
        if probe.is_classifier and allowed is not None and not present <= set(allowed):
            names = class_names(data, [probe.config])
            raise ValueError(
                f"the {what} set has labels {format_labels(sorted(present - set(allowed)), names)} outside the "
                f"classes {format_labels(allowed, names)} of probe {probe.name!r}; add them to classes= or drop "
                "those examples"
            )


def class_names(data: ProbeDataset | None, configs: Iterable[ProbeConfig]) -> list[str] | None:
    """The class names for messages: the data's, else the first of ``configs``' label_names."""
    if data is not None and data.label_names is not None:
        return data.label_names
    return next((c.label_names for c in configs if getattr(c, "label_names", None) is not None), None)


def check_solver_memory(probes: Iterable[Probe], fit: ProbeDataset, model: Any, budget: int) -> None:
    """Refuse, before any forward, ``solver="lbfgs"`` probes whose fit rows cannot fit in
    the cache's memory budget (the hidden size is the model's; a wider site is caught
    at its first batch)."""
    hidden = getattr(getattr(getattr(model, "_module", None), "config", None), "hidden_size", None)
    if hidden is None:
        return
    for probe in probes:
        if probe.config.solver != "lbfgs":
            continue
        rows = len(fit) if probe.config.pool != "none" else int(sum(len(r) for r in fit.ids))
        need = rows * int(hidden) * 4
        if need > budget:
            raise MemoryError(f"probe {probe.name!r}: solver='lbfgs' needs its {rows} fit rows x {hidden} in "
                              f"memory ({need / 2**20:.1f} MiB), over the cache budget of {budget / 2**20:.1f} "
                              "MiB; raise it with fit_probes(cache=Cache(memory_budget=...)) or use solver='sgd'")
