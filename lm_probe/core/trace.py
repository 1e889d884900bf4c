"""One trace per batch: read every requested site, pool it, stop early.

This is the only place a pass runs the model (generation, for a live monitor, runs in
:mod:`lm_probe.core.generation`). Given the resolved sites and the
``(site, pooling)`` requests of the active consumers, :func:`read_pooled` opens one
nnsight trace over the batch, reads each distinct site once in execution order, pools
it every way it was asked for, and stops the forward right after the deepest site
(``tracer.stop()``), so no later layer and no logits run unless a site asks for them.
Only the pooled float32 CPU tensors are saved out of the trace.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any, Iterable

import torch

from .architectures import _torch_module
from .pooling import pool
from .sites import Site

__all__ = ["read_pooled", "model_inputs", "model_device", "ship_pooling", "site_tensor"]


def model_inputs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """Forward keyword arguments for one batch.

    Position ids are derived from the mask (``cumsum - 1``) so that a left- or
    right-padded example sees exactly the positions it would see alone; the key-value
    cache is switched off where the model has one.

    Args:
        model: The nnsight model (or its ``torch.nn.Module``).
        input_ids: ``(batch, tokens)`` token ids.
        attention_mask: ``(batch, tokens)`` mask, 1 for real tokens.

    Returns:
        Keyword arguments for ``model.trace``.
    """
    params = inspect.signature(_torch_module(model).forward).parameters
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "position_ids" in params:
        inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + _first_position(model)
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


def _first_position(model: Any) -> int:
    """Position id of a sequence's first token: 0, but ``padding_idx + 1`` for RoBERTa-style
    embeddings, which number positions after the padding index."""
    module = _torch_module(model)
    base = getattr(module, "base_model", module)
    padding_idx = getattr(getattr(base, "embeddings", None), "padding_idx", None)
    return 0 if padding_idx is None else int(padding_idx) + 1


def site_tensor(value: Any) -> torch.Tensor:
    """Reduce a module's output (tensor, tuple, ModelOutput) to its hidden states."""
    while not isinstance(value, torch.Tensor):
        if isinstance(value, (tuple, list)) or hasattr(value, "to_tuple"):
            value = value[0]
        else:
            raise TypeError(f"cannot read a tensor from a module output of type {type(value)}")
    return value


def read_pooled(
    model: Any,
    sites: dict[str, Site],
    requests: Iterable[tuple[str, str]],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    to_cpu: bool = True,
    **trace_kwargs: Any,
) -> dict[tuple[str, str], torch.Tensor]:
    """Run one trace over a batch and return the pooled activations.

    Args:
        model: nnsight model.
        sites: ``{spec: Site}`` as resolved by :func:`lm_probe.core.sites.resolve_sites`.
        requests: ``(spec, pooling)`` pairs to read; each distinct site is read once.
        input_ids: ``(batch, tokens)``.
        attention_mask: ``(batch, tokens)``.
        to_cpu: Move the pooled tensors to the host inside the trace; ``False`` leaves them
            on the model's device (for consumers that compute there).
        **trace_kwargs: passed to ``model.trace`` (e.g. ``remote=``).

    Returns:
        ``{(spec, pooling): (rows, hidden) float32 tensor}``, on the CPU unless ``to_cpu=False``.
    """
    wanted: dict[Site, set[str]] = defaultdict(set)
    requests = list(dict.fromkeys(requests))
    for spec, how in requests:
        wanted[sites[spec]].add(how)
    plan = sorted(
        ((site, sorted(pools)) for site, pools in _merge_same_site(wanted).items()),
        key=lambda item: item[0].rank,
    )
    if not plan:
        return {}
    device = model_device(model, trace_kwargs.get("remote"))
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
              for k, v in model_inputs(model, input_ids, attention_mask).items()}
    mask = inputs["attention_mask"]
    pooled: dict[tuple[str, str], torch.Tensor] = {}
    with torch.no_grad():
        with model.trace(**inputs, **trace_kwargs) as tracer:
            for site, pools in plan:
                hidden = site_tensor(getattr(site.envoy(model), site.attr))
                if hidden.ndim == 2 and hidden.shape[0] == mask.numel():  # (batch * tokens, d): MoE routers
                    hidden = hidden.reshape(*mask.shape, hidden.shape[1])
                for how in pools:
                    value = pool(hidden, mask, how)
                    pooled[(site.name, how)] = (value.cpu() if to_cpu else value).save()
            tracer.stop()
    return {(spec, how): pooled[(sites[spec].name, how)] for spec, how in requests}


def _merge_same_site(wanted: dict[Site, set[str]]) -> dict[Site, set[str]]:
    """Two specs may name one module (``layers[-1]`` and ``layers.29``): read it once."""
    by_name: dict[str, Site] = {}
    merged: dict[Site, set[str]] = defaultdict(set)
    for site, pools in wanted.items():
        key = by_name.setdefault(site.name, site)
        merged[key] |= pools
    return merged


def model_device(model: Any, remote: Any = False) -> torch.device:
    """Where a batch's inputs and pooled activations live: the model's device, or the CPU
    for remote execution (a remote model may sit on the meta device; results come back
    to the host)."""
    if remote:
        return torch.device("cpu")
    try:
        return next(model._module.parameters()).device
    except StopIteration:  # a parameterless module: keep inputs where they are
        return torch.device("cpu")


def ship_pooling() -> None:
    """For remote execution (NDIF): the trace body pools with :mod:`lm_probe.core.pooling`,
    so ship its source with each request, since the server does not have lm_probe installed."""
    import nnsight

    from . import pooling

    nnsight.register(pooling)
