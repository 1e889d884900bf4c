"""The live monitor: a model's generation, token by token, with every probe's score.

:class:`Monitoring` gives :class:`~lm_probe.ProbeRunner` its :meth:`~Monitoring.monitor`
(through :class:`~lm_probe.probes.deploy.Deployed`). The decoding itself is
:func:`lm_probe.core.generation.generated_rows`: lazy, in the caller's thread, one trace
per new token with the key-value cache, so the runner's other methods work between two
steps and abandoning the loop costs nothing. Each step's rows go through the probes'
own standardization and heads (:func:`~lm_probe.probes.columns.token_scores`), so a
score equals :meth:`~lm_probe.probes.deploy.Deployed.score_tokens` of the finished text
at that position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..core.generation import generated_rows, next_token_chooser
from .columns import next_piece, score_columns, token_scores
from .probe import Probe

__all__ = ["Monitoring", "MonitorStep"]


@dataclass(frozen=True)
class MonitorStep:
    """One new token of :meth:`Monitoring.monitor`.

    Attributes:
        step: 0 for the first new token.
        position: The token's position in the whole sequence (the prompt's tokens first).
        token_id: The token's id.
        token: The text the token adds to the decoded sequence (the pieces of the prompt
            and of every step join back to ``tokenizer.decode`` of all the ids).
        scores: ``{column: score}`` per probe, named as :meth:`score_tokens`'s columns.
    """

    step: int
    position: int
    token_id: int
    token: str
    scores: dict[str, float]


class Monitoring:
    """The runner's live monitor (a mixin: it uses the runner's ``model``, ``sites``,
    ``trace_kwargs`` and ``_deployed``, ``_dataset``, ``_max_length``)."""

    def monitor(self, prompt: str, probes: str | Sequence[str] | None = None, *, max_new_tokens: int = 20,
                include_control: bool = False, **generation: Any) -> Iterator[MonitorStep]:
        """Generate from ``prompt`` and yield each new token, as it is made, with every
        probe's score of it (a live monitor; :mod:`lm_probe.core.generation`).

        Greedy by default, so the same prompt gives Hugging Face's greedy ``generate``
        tokens. Decoding stops after the model's end-of-sequence token. The iterator is
        lazy and holds no trace open between steps: other calls on the runner (or a second
        monitor) work in between, and leaving the loop early stops the decoding. Each
        token's scores equal :meth:`score_tokens` on the finished sequence at its position
        (a causal model's activations do not depend on later tokens).

        Args:
            prompt: The text to continue (tokenized with the model's tokenizer).
            probes: Names of the probes to use (default: every probe but the control twins).
            max_new_tokens: New tokens at most; the prompt's tokens plus these must fit the
                model's positions.
            include_control: Also the control twins.
            **generation: ``do_sample=True`` with ``temperature``, ``top_k``, ``top_p``
                (over the model's ``generation_config``), and ``seed`` for a reproducible
                draw (:func:`~lm_probe.core.generation.next_token_chooser`).

        Returns:
            An iterator of :class:`MonitorStep`, one forward of one token per step.

        Raises:
            ValueError: no model, an empty prompt, ``max_new_tokens`` < 1 or past the
                model's positions, a remote runner, beam search / several sequences /
                assisted decoding or another unsupported argument; ``KeyError``,
                :class:`ProbeNotFittedError`: as for :meth:`predict` (all before any forward).
        """
        chosen = self._deployed(probes, include_control)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive whole number, got {max_new_tokens!r}")
        if self.trace_kwargs.get("remote"):
            raise ValueError("monitor generates with the local model; it does not run remotely (remote=True)")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"the prompt must be a non-empty string, got {prompt!r}; give some text to continue")
        module = self.model._module
        config = getattr(module, "generation_config", None)
        choose = next_token_chooser(config, **generation)
        limit = self._max_length(None)
        ids = self._dataset([prompt], max_length=10**9).ids[0]
        if limit is not None and len(ids) + max_new_tokens > limit:
            raise ValueError(f"the prompt's {len(ids)} tokens plus max_new_tokens={max_new_tokens} exceed the "
                             f"model's {limit} positions; shorten the prompt or lower max_new_tokens")
        sites = {spec: self.sites[spec] for spec in dict.fromkeys(p.config.site for p in chosen.values())}
        eos = getattr(config, "eos_token_id", None)
        eos = eos if eos is not None else getattr(getattr(module, "config", None), "eos_token_id", None)
        return self._monitor(torch.as_tensor(ids)[None], chosen, sites, max_new_tokens, choose, eos)

    def _monitor(self, ids: torch.Tensor, chosen: dict[str, Probe], sites: dict[str, Any], max_new_tokens: int,
                 choose: Any, eos: Any) -> Iterator[MonitorStep]:
        """The generator behind :meth:`monitor` (its checks ran when it was called)."""
        rows = generated_rows(self.model, sites, ids, max_new_tokens=max_new_tokens, choose=choose, eos_token_id=eos)
        sequence = ids[0].tolist()
        done = self.model.tokenizer.decode(sequence)  # the text so far, decoded once per step
        for step, (position, token_id, acts) in enumerate(rows):
            scores = {}
            for name, probe in chosen.items():
                values = token_scores(probe, acts[probe.config.site][None])[0]
                scores.update(zip(score_columns(name, probe), values.tolist()))
            sequence.append(token_id)
            token, done = next_piece(self.model.tokenizer, done, sequence)
            yield MonitorStep(step, position, token_id, token, scores)
