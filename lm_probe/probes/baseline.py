"""The random-init baseline: the same probes on a copy of the model with fresh weights.

Probe accuracy alone barely separates a pretrained model from a randomly initialized
one (Voita and Titov, 2020): a linear probe on random features of the tokens can do
well. ``ProbeRunner(model, configs, baseline="random_init")`` therefore also trains every
probe on a copy of the model whose weights the architecture's own ``_init_weights``
re-draws under the run's seed (:func:`random_init_copy`), with the same tokenizer,
sites, seed, data and settings, so its splits, batches and probe initializations equal
the main run's. ``metrics`` gains ``baseline_<column>`` for every metric column of the
copy's metrics (:func:`with_baseline`): ``baseline_accuracy``, ``baseline_loss``,
``baseline_f1``, ..., and any codelength or interval columns the metrics carry. What the
trained model adds over its architecture is the gap between the two.

It costs one extra forward per example (the copy is traced on the same batches) and the
memory of a second copy of the weights. It needs the model's weights, so a remote run,
or a runner read from a store or any other source, refuses it before any forward pass.
Only the probes are repeated: other consumers (geometry, gauges) see the trained model
alone. ``fit_probes`` fits both; ``runner.evaluate(data)`` scores the trained model's
probes and ``runner.baseline_runner.evaluate(data)`` the copy's.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable, Iterable

import pandas as pd
import torch
from loguru import logger

__all__ = ["BASELINES", "check_baseline", "random_init_copy", "baseline_runner", "with_baseline",
           "then_fit_baseline", "BOOKKEEPING"]

#: The baselines a runner can train beside its probes.
BASELINES = ("random_init",)
#: Columns of ``metrics`` that describe a probe or its fit rather than score it: not copied.
BOOKKEEPING = frozenset({"site", "pool", "layer", "head", "n_scored", "n_unseen_label", "n_nonfinite",
                         "n_nonfinite_fit", "solver", "C", "alpha", "n_epochs", "converged", "n_steps",
                         "stopped_early", "stop_reason", "score_error", "support", "variant", "seed"})


def check_baseline(value: str | None, *, has_model: bool = True, remote: bool = False) -> str | None:
    """``value`` if it names a baseline (or is ``None``) that a runner with (``has_model``) or
    without a model, traced remotely or not, can train.

    Raises:
        ValueError: an unknown baseline (listing the valid ones); no model (a runner from a
            store or a source); a remote run (its weights are on the server).
    """
    if value is None:
        return None
    if value not in BASELINES:
        raise ValueError(f"baseline must be None or one of {list(BASELINES)}, got {value!r}")
    if not has_model:
        raise ValueError("baseline='random_init' re-initializes the model's weights, and a runner that reads a "
                         "store or another source has no model; build ProbeRunner(model, ..., baseline=...) instead")
    if remote:
        raise ValueError("baseline='random_init' needs the model's weights here to re-initialize a copy; "
                         "a remote run (remote=...) has none: run it locally")
    return value


def random_init_copy(model: Any, seed: int) -> Any:
    """A copy of an nnsight-wrapped Hugging Face model with every weight re-initialized.

    The wrapped module is deep-copied (same dtype, device, tokenizer; tied weights stay
    tied), the "already initialized" marks that loading left on it are cleared, and its
    ``init_weights()`` runs the architecture's own ``_init_weights`` on every module
    under ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng()``: the caller's
    global random state is left as it was, and the same seed gives the same copy. The
    model passed in is not changed.

    Args:
        model: An nnsight model whose ``_module`` is a ``transformers`` ``PreTrainedModel``.
        seed: Seed of the new weights.

    Returns:
        The re-initialized copy, wrapped by :func:`lm_probe.load_model` with ``model``'s tokenizer.

    Raises:
        TypeError: the wrapped module has no ``init_weights`` (not a ``transformers`` model).
    """
    from ..core.model import load_model

    module = getattr(model, "_module", None)
    if not callable(getattr(module, "init_weights", None)):
        raise TypeError(f"baseline='random_init' re-initializes a transformers model with its init_weights(); "
                        f"{type(module).__name__} has none")
    fresh = copy.deepcopy(module)
    for tensor_or_module in [*fresh.modules(), *fresh.parameters(), *fresh.buffers()]:
        tensor_or_module.__dict__.pop("_is_hf_initialized", None)  # else init_weights skips what loading set
    devices = [p.device for p in fresh.parameters() if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices})), torch.no_grad():
        torch.manual_seed(seed)
        fresh.init_weights()
    return load_model(fresh.eval(), tokenizer=model.tokenizer)


def baseline_runner(cls: type, baseline: str | None, model: Any, configs: Iterable[Any], *, seed: int,
                    trace_kwargs: dict[str, Any], **settings: Any) -> Any:
    """The baseline's own runner (``cls(copy, configs, seed=seed, **settings)``), or ``None``.

    Raises:
        ValueError: as :func:`check_baseline`, before any forward pass.
    """
    if check_baseline(baseline, has_model=model is not None, remote=bool(trace_kwargs.get("remote"))) is None:
        return None
    return cls(random_init_copy(model, seed), configs, seed=seed, **settings, **trace_kwargs)


def with_baseline(metrics: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """``metrics`` with ``baseline_<column>`` for each metric column of ``baseline`` (the
    random-init runner's metrics, same probes), in ``baseline``'s column order; the
    columns in :data:`BOOKKEEPING` (site, layer, steps, solver...) are not copied."""
    columns = [c for c in baseline.columns if c not in BOOKKEEPING and pd.api.types.is_numeric_dtype(baseline[c])
               and not pd.api.types.is_bool_dtype(baseline[c])]
    copied = baseline.loc[metrics.index, columns].add_prefix("baseline_")
    return pd.concat([metrics.drop(columns=copied.columns, errors="ignore"), copied], axis=1)


def then_fit_baseline(fit_probes: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``ProbeRunner.fit_probes``: after the probes, fit the runner's
    ``baseline_runner`` (if any) with the same arguments (same seed: same splits and
    batches) and add its metrics to ``metrics`` (:func:`with_baseline`)."""

    @functools.wraps(fit_probes)
    def fit_both(runner: Any, *args: Any, **kwargs: Any) -> Any:
        fit_probes(runner, *args, **kwargs)
        other = getattr(runner, "baseline_runner", None)
        if other is not None:
            logger.info("random-init baseline: the same probes on the re-initialized copy, same batches")
            other.fit_probes(*args, **kwargs)
            if runner.metrics is not None and other.metrics is not None:
                runner.metrics = with_baseline(runner.metrics, other.metrics)
        return runner

    return fit_both
