"""Generation read live: each new token's activations at some sites, as it is made.

A probe is a monitor when it scores a model's output while the model writes it.
:func:`generated_rows` runs ``model.generate`` through nnsight, reads the requested
sites in every decoding step (``tracer.iter``) and hands each step's rows over as the
step runs, so a caller sees token ``t`` while token ``t + 1`` is being computed.

Decoding step ``k`` (``k >= 1``, with the key-value cache) feeds the token made by step
``k - 1``, so its activations at the last position are that token's; step 0 reads the
prompt and is skipped. The last new token is never fed back, so its rows come from one
trace of the whole sequence at the end (:func:`~lm_probe.core.trace.read_pooled`,
``pool="none"``). In a causal model a token's activations do not depend on what follows
it, so every new token's rows equal those of the finished sequence at its position (up
to float rounding between the cached and the full forward).

The generation runs in a worker thread that puts each step's rows on a queue; the
generator in the caller's thread yields them. Closing the generator early (``break``)
tells the worker to stop after its current step (a Hugging Face stopping criterion) and
waits for it.
"""

from __future__ import annotations

import queue
import threading
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .sites import Site
from .trace import model_device, read_pooled, site_tensor

__all__ = ["generated_rows"]

#: nnsight's warning when a ``tracer.iter`` loop asks for a step the generation did not make
#: (it stopped at an end-of-sequence token, or was told to stop): expected here.
_NEVER_REACHED = ".*was never reached.*"


class _Recorder(StoppingCriteria):
    """Puts the ids after each new token on the queue; stops the generation once told to."""

    def __init__(self, events: queue.Queue, stop: threading.Event) -> None:
        self.events, self.stop = events, stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.events.put(("ids", input_ids[0].detach().cpu().numpy().copy()))
        return torch.full((input_ids.shape[0],), self.stop.is_set(), dtype=torch.bool, device=input_ids.device)


def _last_row(value: Any) -> torch.Tensor:
    """The last position's ``(hidden,)`` float32 row of a site's value in one decoding step."""
    hidden = site_tensor(value)
    if hidden.ndim == 2:  # (batch * tokens, d): a router's flattened output
        return hidden[-1].float().cpu()
    return hidden[0, -1].float().cpu()


def _generate(model: Any, sites: Sequence[Site], input_ids: torch.Tensor, max_new_tokens: int,
              events: queue.Queue, stop: threading.Event, kwargs: dict[str, Any]) -> None:
    """The worker: generate, putting ``("rows", {site name: row})`` after each step from the
    second on, then ``("done", None)``, or ``("error", exception)``."""
    try:
        criteria = StoppingCriteriaList([*kwargs.pop("stopping_criteria", []), _Recorder(events, stop)])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NEVER_REACHED)
            with model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                                stopping_criteria=criteria, **kwargs) as tracer:
                for _ in tracer.iter[1:max_new_tokens]:
                    rows = {}
                    for site in sites:  # in execution order
                        rows[site.name] = _last_row(getattr(site.envoy(model), site.attr))
                    events.put(("rows", rows))
    except BaseException as err:  # noqa: BLE001 (handed to the caller's thread, raised there)
        events.put(("error", err))
    else:
        events.put(("done", None))


def generated_rows(model: Any, sites: dict[str, Site], input_ids: torch.Tensor, *, max_new_tokens: int,
                   **generate_kwargs: Any) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Generate from one prompt and yield each new token with its activations, as made.

    Args:
        model: An nnsight language model (``model.generate``).
        sites: ``{spec: Site}`` to read, resolved for ``model``.
        input_ids: ``(1, prompt_tokens)`` prompt ids.
        max_new_tokens: New tokens at most (fewer if the model ends the sequence).
        **generate_kwargs: Passed to ``model.generate`` (``do_sample``, ``pad_token_id``, ...).

    Yields:
        ``(position, token_id, {spec: (hidden,) float32 row})`` per new token, in order;
        ``position`` counts the prompt's tokens first.
    """
    device = model_device(model)
    input_ids = input_ids.to(device)
    prompt_len = input_ids.shape[1]
    by_rank = sorted({site.name: site for site in sites.values()}.values(), key=lambda s: s.rank)
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    worker = threading.Thread(target=_generate, daemon=True, name="lm_probe-monitor",
                              args=(model, by_rank, input_ids, max_new_tokens, events, stop, dict(generate_kwargs)))
    worker.start()
    ids, position = input_ids[0].cpu().numpy(), prompt_len
    try:
        while True:
            kind, value = events.get()
            if kind == "error":
                raise value
            if kind == "done":
                break
            if kind == "ids":
                ids = value
                continue
            yield position, int(ids[position]), {spec: value[site.name].numpy() for spec, site in sites.items()}
            position += 1
        if position < len(ids):  # the last new token was never fed back: one trace of the whole sequence
            full = torch.as_tensor(ids, device=device)[None]
            rows = read_pooled(model, sites, [(spec, "none") for spec in sites], full, torch.ones_like(full))
            for at in range(position, len(ids)):
                yield at, int(ids[at]), {spec: rows[(spec, "none")][at].numpy() for spec in sites}
    finally:
        stop.set()
        worker.join()
