"""Generation read live: each new token's activations at some sites, as it is made.

A probe is a monitor when it scores a model's output while the model writes it.
:func:`generated_rows` decodes one token at a time in the caller's thread, with one
nnsight ``model.trace`` per new token: the trace feeds only the newest token, with the
Hugging Face key-value cache of everything before it (``use_cache=True``), and saves
the cache, the last position's logits and the last position's rows at the requested
sites. The logits choose the next token (greedy, or sampled with transformers' own
logit warpers: :func:`next_token_chooser`); the rows are those of the token just fed.
So token ``t`` is yielded after the trace that fed it, and the first trace (the whole
prompt) yields nothing. The last new token is fed once more for its rows alone.

It is a plain lazy generator: nothing runs until the first ``next``, each ``next`` is
one forward of one token, and no trace stays open between them, so other traces on the
same model (``runner.predict`` in the next notebook cell, a second monitor) run in
between as usual; abandoning the generator (``break``) simply stops the decoding.

In a causal model a token's activations do not depend on what follows it, so every new
token's rows equal those of the finished sequence at its position (up to float rounding
between the cached and the full forward), and greedy decoding gives Hugging Face's
greedy ``generate`` tokens.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .sites import Site
from .trace import model_device, site_tensor

__all__ = ["generated_rows", "next_token_chooser", "SAMPLING_KWARGS"]

#: The keyword arguments :func:`next_token_chooser` takes (generation settings, as for ``generate``).
SAMPLING_KWARGS = ("do_sample", "temperature", "top_k", "top_p", "seed")

#: ``generate`` arguments that ask for something a one-sequence monitor cannot do: ``(name, allowed value)``.
_REFUSED = {"num_beams": 1, "num_return_sequences": 1, "assistant_model": None, "num_beam_groups": 1}


def greedy(ids: torch.Tensor, logits: torch.Tensor) -> int:
    """The greedy choice of the next token: the argmax of its logits."""
    return int(logits.argmax())


def next_token_chooser(generation_config: Any = None, **kwargs: Any) -> Callable[[torch.Tensor, torch.Tensor], int]:
    """How the next token is chosen from the last position's logits.

    Greedy (``do_sample=False``, the default) takes the argmax. ``do_sample=True`` applies
    transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and ``TopPLogitsWarper``
    (in ``generate``'s order) with the settings given here over the model's own
    ``generation_config``, then draws from the softmax with ``torch.multinomial`` (with
    ``seed``: from a ``torch.Generator`` seeded once, so a run is reproducible; without:
    from torch's global generator, as ``generate`` does).

    Args:
        generation_config: The model's ``GenerationConfig`` (its defaults for the warpers), or None.
        **kwargs: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``.

    Returns:
        ``choose(ids (1, tokens), logits (vocab,)) -> token id``.

    Raises:
        ValueError: a beam search, several sequences, assisted decoding, or an argument
            not among :data:`SAMPLING_KWARGS` (before any forward).
    """
    from transformers import (GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    for name, allowed in _REFUSED.items():
        if name in kwargs and kwargs.pop(name) != allowed:
            raise ValueError(f"monitor decodes one sequence token by token; {name} is not supported "
                             f"(leave it out, or use model.generate for it)")
    unknown = sorted(set(kwargs) - set(SAMPLING_KWARGS))
    if unknown:
        raise ValueError(f"monitor does not take {unknown}; its generation settings are {list(SAMPLING_KWARGS)}")
    seed = kwargs.pop("seed", None)
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    config.update(**{"do_sample": False, **kwargs})
    if not config.do_sample:
        return greedy
    warpers = LogitsProcessorList()
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def sample(ids: torch.Tensor, logits: torch.Tensor) -> int:
        scores = warpers(ids, logits[None].float())
        probs = torch.softmax(scores, dim=-1).cpu() if generator is not None else torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=generator)[0, 0])

    return sample


def _last_row(value: Any) -> torch.Tensor:
    """The last position's ``(hidden,)`` float32 row of a site's value in one decoding step."""
    hidden = site_tensor(value)
    if hidden.ndim == 2:  # (batch * tokens, d): a router's flattened output
        return hidden[-1].float().cpu()
    return hidden[0, -1].float().cpu()


def _step(model: Any, sites: Sequence[Site], feed: torch.Tensor, length: int, cache: Any,
          params: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor, Any]:
    """One trace feeding ``feed (1, k)``, the last ``k`` of ``length`` tokens, after ``cache``
    (``params``: the forward's parameters): the last position's rows ``{site name: (hidden,)}``,
    its logits ``(vocab,)``, the new cache."""
    cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
    inputs: dict[str, Any] = {"input_ids": feed, "use_cache": True,
                              "attention_mask": torch.ones(1, length, dtype=torch.long, device=feed.device)}
    if "position_ids" in params:
        inputs["position_ids"] = torch.arange(length - feed.shape[1], length, device=feed.device)[None]
    if cache is not None:
        inputs[cache_arg] = cache
    rows: dict[str, torch.Tensor] = {}
    with torch.no_grad(), model.trace(**inputs):
        for site in sites:  # in execution order
            rows[site.name] = _last_row(getattr(site.envoy(model), site.attr)).save()
        output = model.output.save()
    new_cache = getattr(output, "cache", None)
    new_cache = getattr(output, "past_key_values", None) if new_cache is None else new_cache
    if new_cache is None:
        raise ValueError(f"{type(model._module).__name__} returned no key-value cache (use_cache=True); "
                         "monitor needs a causal language model with one")
    return rows, output.logits[0, -1], new_cache


def generated_rows(model: Any, sites: dict[str, Site], input_ids: torch.Tensor, *, max_new_tokens: int,
                   choose: Callable[[torch.Tensor, torch.Tensor], int] | None = None,
                   eos_token_id: int | Sequence[int] | None = None) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Decode from one prompt, lazily, and yield each new token with its activations.

    Args:
        model: An nnsight language model of a causal LM with a key-value cache.
        sites: ``{spec: Site}`` to read, resolved for ``model``.
        input_ids: ``(1, prompt_tokens)`` prompt ids.
        max_new_tokens: New tokens at most (fewer if the model ends the sequence).
        choose: ``choose(ids, logits) -> token id`` (:func:`next_token_chooser`; default greedy).
        eos_token_id: End-of-sequence id(s): decoding stops after yielding one.

    Yields:
        ``(position, token_id, {spec: (hidden,) float32 row})`` per new token, in order;
        ``position`` counts the prompt's tokens first. ``max_new_tokens + 1`` traces at most.
    """
    choose = choose or greedy
    ends = set() if eos_token_id is None else {int(eos_token_id)} if np.ndim(eos_token_id) == 0 else \
        {int(i) for i in eos_token_id}
    params = inspect.signature(model._module.forward).parameters
    by_rank = sorted({site.name: site for site in sites.values()}.values(), key=lambda s: s.rank)
    ids = input_ids.to(model_device(model))
    _, logits, cache = _step(model, by_rank, ids, ids.shape[1], None, params)
    for _ in range(max_new_tokens):
        token = choose(ids, logits)
        ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
        rows, logits, cache = _step(model, by_rank, ids[:, -1:], ids.shape[1], cache, params)
        yield ids.shape[1] - 1, token, {spec: rows[site.name].numpy() for spec, site in sites.items()}
        if token in ends:
            return
