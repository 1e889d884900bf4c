"""Deployed probes: trained probes applied to raw texts, token by token, and live.

:class:`Deployed` gives :class:`~lm_probe.ProbeRunner` four methods for after training
(or after :meth:`~lm_probe.ProbeRunner.load` with a model, with no training data):

* :meth:`~Deployed.predict` / :meth:`~Deployed.predict_proba`: each probe's prediction
  for each text. The texts are tokenized with the model's tokenizer and pooled through
  the runner's ``pooled``: one trace per batch for all the probes.
* :meth:`~Deployed.score_tokens`: each probe's score of every real token of each text.
  A probe trained on pooled rows (``"mean"``, ``"last"``, ...) is applied as it is to
  each token's activation at its site: its standardization and head, the same map it
  applies to a pooled row (for a linear head, ``sigmoid((x - mean_) / scale_ @ coef_ +
  intercept_)``; an MLP head runs its whole network on the row). Token-level probes
  (``pool="none"``) are scored where they were trained.
* :meth:`~Deployed.monitor`: generates from a prompt through nnsight and yields each new
  token, as it is made, with every probe's score of it (:mod:`lm_probe.core.generation`);
  each score equals :meth:`~Deployed.score_tokens` on the finished text at that position.

Control twins (``"<name> [control]"``) are left out unless ``include_control=True``.
Scores are named the same way everywhere (:func:`score_columns`): a binary classifier's
column is the probe's name and holds the probability of its second class (``classes_[1]``,
the positive one of 0/1 labels); a multi-class probe has one column per class,
``"<name>[<class>]"``; a regression probe's column is its predicted value. Classes are
named by the probe's ``label_names`` where its config has them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from ..core.consumer import requests_of
from ..core.dataset import ProbeDataset
from ..core.generation import generated_rows
from .control import is_control
from .probe import Probe, ProbeNotFittedError

__all__ = ["Deployed", "MonitorStep", "score_columns", "token_scores"]


@dataclass(frozen=True)
class MonitorStep:
    """One new token of :meth:`Deployed.monitor`.

    Attributes:
        step: 0 for the first new token.
        position: The token's position in the whole sequence (the prompt's tokens first).
        token_id: The token's id.
        token: The token decoded alone (``tokenizer.decode([token_id])``).
        scores: ``{column: score}`` per probe, named as :meth:`Deployed.score_tokens`'s columns.
    """

    step: int
    position: int
    token_id: int
    token: str
    scores: dict[str, float]


def class_name(probe: Probe, label: int) -> Any:
    """A class's name: the probe's ``label_names`` entry, else the integer label."""
    names = getattr(probe.config, "label_names", None)
    return names[int(label)] if names is not None and 0 <= int(label) < len(names) else int(label)


def score_columns(name: str, probe: Probe) -> list[str]:
    """The column names of a probe's scores: ``[name]`` for a binary classifier or a
    regression probe, ``["name[class]", ...]`` for a multi-class one."""
    if probe.is_classifier and len(probe.classes_) > 2:
        return [f"{name}[{class_name(probe, c)}]" for c in probe.classes_]
    return [name]


def token_scores(probe: Probe, X: np.ndarray) -> np.ndarray:
    """A probe's scores of rows ``X (n, hidden)``, its whole decision function per row:
    ``(n, len(score_columns))`` (the probability of ``classes_[1]``, of each class, or the
    predicted value)."""
    if not probe.is_classifier:
        return np.asarray(probe.predict(X), np.float64)[:, None]
    proba = probe.predict_proba(X)
    return proba[:, 1:] if proba.shape[1] == 2 else proba


def _unfit(probe: Probe, what: str) -> str | None:
    """Why ``probe`` cannot serve ``what`` (``None``: it can)."""
    if what != "score_tokens" and probe.config.pool == "none":
        return "token-level (pool='none'): use score_tokens"
    if what == "predict_proba" and not probe.is_classifier:
        return "a regression probe: use predict"
    return None


def _texts(texts: str | Sequence[str]) -> list[str]:
    """The texts as a list (one string is one text); a ``ValueError`` if there are none."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("no texts given: pass a list of strings, e.g. runner.predict(['a review', 'another'])")
    return texts


class Deployed:
    """The runner's deployed use (a mixin: it uses the runner's ``model``, ``probes``,
    ``sites``, ``trace_kwargs``, ``pooled`` and ``__getitem__``)."""

    def _deployed(self, probes: str | Sequence[str] | None, include_control: bool,
                  what: str = "score_tokens") -> dict[str, Probe]:
        """The probes asked for, checked before any forward: a model to run, names that exist,
        trained weights. ``what``: ``"predict"`` leaves out token-level probes (and
        ``"predict_proba"`` regression ones too) when ``probes`` is None, and refuses them by name."""
        if self.model is None:
            raise ValueError("this runner has no model to run texts through; load it with one: "
                             "ProbeRunner.load(path, model=load_model(...))")
        if not self.probes:
            raise ValueError("this runner has no probes; build it with ProbeConfig(...)s and run fit_probes first")
        named = probes is not None
        names = ([probes] if isinstance(probes, str) else list(probes)) if named else \
            [n for n in self.probes if include_control or not is_control(n)]
        chosen = {name: self[name] for name in names}  # a KeyError listing the names for an unknown one
        for name, probe in list(chosen.items()):
            unfit = _unfit(probe, what)
            if unfit and named:
                raise ValueError(f"probe {name!r} is {unfit}")
            if unfit:
                del chosen[name]
        if not chosen:
            raise ValueError(f"no probe of this runner gives {what}; probes are {list(self.probes)}")
        try:
            for probe in chosen.values():
                probe._check_fitted()
        except ProbeNotFittedError as err:
            raise ProbeNotFittedError(f"{err}; or load trained probes: ProbeRunner.load(path, model=model)") from None
        return chosen

    def _dataset(self, texts: list[str], max_length: int) -> ProbeDataset:
        """The texts tokenized with the model's tokenizer (labels unused)."""
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("the model has no tokenizer to tokenize texts with; load it with one: "
                             "load_model(model, tokenizer=tokenizer)")
        return ProbeDataset.from_texts(texts, np.zeros(len(texts), np.int64), tokenizer, max_length=max_length)

    def predict(self, texts: str | Sequence[str], probes: str | Sequence[str] | None = None, *,
                batch_size: int = 16, max_length: int = 512, include_control: bool = False) -> pd.DataFrame:
        """Each probe's prediction for each text (one trace per batch for all the probes).

        Args:
            texts: The texts (one string is one text), tokenized with the model's tokenizer.
            probes: Names of the probes to use (default: every sequence-level probe; a
                token-level one is refused by name: see :meth:`score_tokens`).
            batch_size: Texts per forward pass.
            max_length: Tokens per text at most (longer ones are cut, with a warning).
            include_control: Also the control twins (``"<name> [control]"``).

        Returns:
            DataFrame indexed by ``text`` (the texts' order), one column per probe: the
            predicted class (its label name, where the probe has ``label_names``) or value.

        Raises:
            ValueError: no texts, no model, a token-level probe named; ``KeyError``: no such
                probe; :class:`ProbeNotFittedError`: untrained probes (all before any forward).
        """
        chosen = self._deployed(probes, include_control, "predict")
        acts = self._read(_texts(texts), chosen, batch_size, max_length)
        columns = {}
        for name, probe in chosen.items():
            predicted = probe.predict(acts[probe.requests[0]])
            columns[name] = [class_name(probe, c) for c in predicted] if probe.is_classifier else predicted
        return pd.DataFrame(columns, index=pd.RangeIndex(len(next(iter(acts.values()))), name="text"))

    def predict_proba(self, texts: str | Sequence[str], probes: str | Sequence[str] | None = None, *,
                      batch_size: int = 16, max_length: int = 512, include_control: bool = False) -> pd.DataFrame:
        """Each classifier probe's class probabilities for each text (one trace per batch for all).

        The arguments are as for :meth:`predict` (regression probes are left out, or
        refused by name).

        Returns:
            DataFrame indexed by ``text``, with columns ``(probe, class)`` (a
            ``MultiIndex``; classes by their label names where the probe has them).
        """
        chosen = self._deployed(probes, include_control, "predict_proba")
        acts = self._read(_texts(texts), chosen, batch_size, max_length)
        blocks, keys = [], []
        for name, probe in chosen.items():
            blocks.append(probe.predict_proba(acts[probe.requests[0]]))
            keys += [(name, class_name(probe, c)) for c in probe.classes_]
        return pd.DataFrame(np.hstack(blocks), columns=pd.MultiIndex.from_tuples(keys, names=["probe", "class"]),
                            index=pd.RangeIndex(len(blocks[0]), name="text"))

    def _read(self, texts: list[str], chosen: dict[str, Probe], batch_size: int, max_length: int,
              pool: str | None = None) -> dict[Any, np.ndarray]:
        """The chosen probes' rows for ``texts``: their own pooling, or ``pool`` for every one."""
        requests = requests_of(chosen.values()) if pool is None else \
            list(dict.fromkeys((p.config.site, pool) for p in chosen.values()))
        return self.pooled(self._dataset(texts, max_length), requests, batch_size, "deployed")

    def score_tokens(self, texts: str | Sequence[str], probes: str | Sequence[str] | None = None, *,
                     batch_size: int = 16, max_length: int = 512, include_control: bool = False) -> pd.DataFrame:
        """Every probe's score of every real token of each text (padding never enters).

        A probe trained on pooled rows is applied to each token's activation at its site,
        standardization and head included (see the module docstring). The arguments are as
        for :meth:`predict`; every probe is used by default, token-level ones included.

        Returns:
            A tidy DataFrame, one row per token: ``text`` (the text's number), ``position``
            (0 for its first token), ``token`` (decoded alone), ``token_id``, then the
            probes' columns (:func:`score_columns`).
        """
        chosen = self._deployed(probes, include_control)
        data = self._dataset(_texts(texts), max_length)
        requests = list(dict.fromkeys((p.config.site, "none") for p in chosen.values()))
        acts = self.pooled(data, requests, batch_size, "tokens")
        ids = np.concatenate(data.ids)
        decoded = {i: self.model.tokenizer.decode([i]) for i in np.unique(ids).tolist()}
        frame = pd.DataFrame({"text": np.repeat(np.arange(len(data)), [len(row) for row in data.ids]),
                              "position": np.concatenate([np.arange(len(row)) for row in data.ids]),
                              "token": [decoded[i] for i in ids.tolist()], "token_id": ids})
        for name, probe in chosen.items():
            scores = token_scores(probe, acts[(probe.config.site, "none")])
            for k, column in enumerate(score_columns(name, probe)):
                frame[column] = scores[:, k]
        return frame

    def monitor(self, prompt: str, probes: str | Sequence[str] | None = None, *, max_new_tokens: int = 20,
                include_control: bool = False, **generate_kwargs: Any) -> Iterator[MonitorStep]:
        """Generate from ``prompt`` through nnsight and yield each new token, as it is made,
        with every probe's score of it (a live monitor; :mod:`lm_probe.core.generation`).

        Greedy by default (``do_sample=False``), so the same prompt gives the same tokens.
        Each token's scores equal :meth:`score_tokens` on the finished sequence at its
        position (a causal model's activations do not depend on later tokens).

        Args:
            prompt: The text to continue (tokenized with the model's tokenizer).
            probes: Names of the probes to use (default: every probe but the control twins).
            max_new_tokens: New tokens at most (fewer if the model ends the sequence).
            include_control: Also the control twins.
            **generate_kwargs: Passed to ``model.generate`` (``do_sample=True``, ``temperature``, ...).

        Returns:
            An iterator of :class:`MonitorStep`; stopping early (``break``) stops the generation.

        Raises:
            ValueError: no model, an empty prompt, ``max_new_tokens`` < 1, a remote runner;
                ``KeyError``, :class:`ProbeNotFittedError`: as for :meth:`predict` (all before
                any forward).
        """
        chosen = self._deployed(probes, include_control)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive whole number, got {max_new_tokens!r}")
        if self.trace_kwargs.get("remote"):
            raise ValueError("monitor generates with the local model; it does not run remotely (remote=True)")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"the prompt must be a non-empty string, got {prompt!r}; give some text to continue")
        ids = self._dataset([prompt], max_length=10**9).ids[0]
        tokenizer = self.model.tokenizer
        generate_kwargs = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id, **generate_kwargs}
        sites = {spec: self.sites[spec] for spec in dict.fromkeys(p.config.site for p in chosen.values())}
        return self._monitor(torch.as_tensor(ids)[None], chosen, sites, max_new_tokens, generate_kwargs)

    def _monitor(self, ids: torch.Tensor, chosen: dict[str, Probe], sites: dict[str, Any], max_new_tokens: int,
                 generate_kwargs: dict[str, Any]) -> Iterator[MonitorStep]:
        """The generator behind :meth:`monitor` (its checks ran when it was called)."""
        rows = generated_rows(self.model, sites, ids, max_new_tokens=max_new_tokens, **generate_kwargs)
        for step, (position, token_id, acts) in enumerate(rows):
            scores = {}
            for name, probe in chosen.items():
                values = token_scores(probe, acts[probe.config.site][None])[0]
                scores.update(zip(score_columns(name, probe), values.tolist()))
            yield MonitorStep(step, position, token_id, self.model.tokenizer.decode([token_id]), scores)
