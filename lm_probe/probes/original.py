"""The original lm_probe's ProbeConfig arguments (t-shoemaker/lm_probe) with no per-probe
meaning here: accepted with one warning each, saying where their setting lives now."""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["ORIGINAL_ARGUMENTS", "from_original"]

#: Arguments of the original lm_probe's ProbeConfig (t-shoemaker/lm_probe) with no
#: per-probe meaning here, and where their setting lives now. Each is accepted with one
#: FutureWarning per process and argument; ``model_kwargs`` is still passed on.
ORIGINAL_ARGUMENTS: dict[str, str] = {
    "test_size": "is ignored: the validation rows for early stopping are one split of the training set, "
                 "shared by all probes (the original held out a share of each batch); set its share with "
                 "fit_probes(val_size=...)",
    "threshold": "is ignored: an improvement of validation log-loss counts when it is at least "
                 "fit_probes(min_delta=...) (absolute, where the original's threshold was relative)",
    "null_label": "is ignored: token-level probes are ProbeConfig(site, pool='none') on "
                  "ProbeDataset.from_tagged(...) data, whose unlabeled tokens are lm_probe.IGNORE",
    "model_kwargs": "is passed on, but give the estimator's arguments directly: ProbeConfig(site, classes, "
                    "alpha=...)",
}
_warned: set[str] = set()


def from_original(probe_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``probe_kwargs`` without the original lm_probe's :data:`ORIGINAL_ARGUMENTS` (its
    ``model_kwargs`` merged in), warning once per process about each one given."""
    kwargs = dict(probe_kwargs)
    for argument, where in ORIGINAL_ARGUMENTS.items():
        if argument not in kwargs:
            continue
        value = kwargs.pop(argument)
        if argument not in _warned:
            _warned.add(argument)
            warnings.warn(f"ProbeConfig({argument}=...) of the original lm_probe {where}", FutureWarning,
                          stacklevel=3)
        if argument == "model_kwargs":
            kwargs = {**dict(value or {}), **kwargs}
    return kwargs
