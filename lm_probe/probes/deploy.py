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
* :meth:`~lm_probe.probes.monitor.Monitoring.monitor`: decodes from a prompt, one nnsight
  trace per new token, and yields each new token, as it is made, with every probe's score
  of it (:mod:`lm_probe.probes.monitor`); each score equals :meth:`~Deployed.score_tokens`
  on the finished text at that position.

Control twins (``"<name> [control]"``) are left out unless ``include_control=True``.
Scores are named the same way everywhere (:mod:`lm_probe.probes.columns`): a binary
classifier's column is the probe's name and holds the probability of its second class
(``classes_[1]``, the positive one of 0/1 labels); a multi-class probe has one column per
class, ``"<name>[<class>]"``; a regression probe's column is its predicted value. Classes
are named by the probe's ``label_names`` (its config's, else the training data's).

Texts are cut at ``max_length`` tokens, by default the model's position limit
(``max_position_embeddings`` / ``n_positions``, or the tokenizer's ``model_max_length``
where smaller); a larger ``max_length`` is refused before any forward.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..core.batching import check_batch_size
from ..core.consumer import requests_of
from ..core.dataset import ProbeDataset
from .columns import METADATA, class_name, score_columns, token_scores, token_strings
from .control import is_control
from .monitor import Monitoring, MonitorStep
from .probe import Probe, ProbeNotFittedError

__all__ = ["Deployed", "MonitorStep", "score_columns", "token_scores"]


def _unfit(probe: Probe, what: str) -> str | None:
    """Why ``probe`` cannot serve ``what`` (``None``: it can)."""
    if what != "score_tokens" and probe.config.pool == "none":
        return "token-level (pool='none'): use score_tokens"
    if what == "predict_proba" and not probe.is_classifier:
        return "a regression probe: use predict"
    return None


def _texts(texts: str | Sequence[str]) -> tuple[list[str], pd.Index | None]:
    """The texts as a list (one string is one text) and a pandas Series' index to keep;
    a ``ValueError`` if there are none."""
    index = texts.index if isinstance(texts, pd.Series) else None
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("no texts given: pass a list of strings, e.g. runner.predict(['a review', 'another'])")
    return texts, index


def _check_columns(chosen: dict[str, Probe], tokens: bool) -> None:
    """Refuse probes whose score columns would clash: with another probe's (``"a[b]"``
    beside a multi-class ``"a"`` with class ``b``) or, for ``tokens``, with ``score_tokens``'
    own columns."""
    seen: dict[str, str] = {column: "score_tokens' own columns" for column in METADATA} if tokens else {}
    for name, probe in chosen.items():
        for column in score_columns(name, probe):
            if column in seen:
                raise ValueError(f"probe {name!r}'s score column {column!r} clashes with {seen[column]}; "
                                 "rename the probe (ProbeConfig(name=...)) or leave one out (probes=[...])")
            seen[column] = f"probe {name!r}'s"


class Deployed(Monitoring):
    """The runner's deployed use (a mixin: it uses the runner's ``model``, ``probes``,
    ``sites``, ``source``, ``trace_kwargs``, ``pooled``, ``_resolve`` and ``__getitem__``)."""

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
        _check_columns(chosen, tokens=what == "score_tokens")
        return chosen

    def _max_length(self, max_length: int | None) -> int | None:
        """Tokens per text at most: ``max_length``, checked against the model's position
        limit, or (``None``) that limit itself (``None`` if the model states none)."""
        config = getattr(self.model._module, "config", None)
        limits = [getattr(config, key, None) for key in ("max_position_embeddings", "n_positions")]
        tokenizer_limit = getattr(getattr(self.model, "tokenizer", None), "model_max_length", None)
        limits.append(tokenizer_limit if isinstance(tokenizer_limit, int) and tokenizer_limit < 10**6 else None)
        limit = min((int(n) for n in limits if isinstance(n, int) and n > 0), default=None)
        if max_length is None:
            return limit
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive whole number of tokens, got {max_length!r}")
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} is more than the model's {limit} positions; "
                             f"give max_length={limit} or less (or None for the limit)")
        return max_length

    def _dataset(self, texts: list[str], max_length: int | None) -> ProbeDataset:
        """The texts tokenized with the model's tokenizer (labels unused), cut at ``max_length``
        tokens (with a warning counting the texts cut)."""
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("the model has no tokenizer to tokenize texts with; load it with one: "
                             "load_model(model, tokenizer=tokenizer)")
        return ProbeDataset.from_texts(texts, np.zeros(len(texts), np.int64), tokenizer,
                                       max_length=max_length if max_length is not None else 10**9)

    def predict(self, texts: str | Sequence[str], probes: str | Sequence[str] | None = None, *,
                batch_size: int = 16, max_length: int | None = None, include_control: bool = False) -> pd.DataFrame:
        """Each probe's prediction for each text (one trace per batch for all the probes).

        Args:
            texts: The texts (one string is one text), tokenized with the model's tokenizer.
            probes: Names of the probes to use (default: every sequence-level probe; a
                token-level one is refused by name: see :meth:`score_tokens`).
            batch_size: Texts per forward pass.
            max_length: Tokens per text at most (longer ones are cut, with a warning naming
                how many); default and upper bound: the model's position limit.
            include_control: Also the control twins (``"<name> [control]"``).

        Returns:
            DataFrame indexed by ``text`` (the texts' order, or a pandas Series' own index),
            one column per probe: the predicted class (its label name, where the probe has
            ``label_names``) or value.

        Raises:
            ValueError: no texts, no model, a token-level probe named, ``max_length`` past the
                model's positions; ``KeyError``: no such probe; :class:`ProbeNotFittedError`:
                untrained probes (all before any forward).
        """
        chosen = self._deployed(probes, include_control, "predict")
        acts, index = self._read(texts, chosen, batch_size, max_length)
        columns = {}
        for name, probe in chosen.items():
            predicted = probe.predict(acts[probe.requests[0]])
            columns[name] = [class_name(probe, c) for c in predicted] if probe.is_classifier else predicted
        return pd.DataFrame(columns, index=index)

    def predict_proba(self, texts: str | Sequence[str], probes: str | Sequence[str] | None = None, *,
                      batch_size: int = 16, max_length: int | None = None,
                      include_control: bool = False) -> pd.DataFrame:
        """Each classifier probe's class probabilities for each text (one trace per batch for all).

        The arguments are as for :meth:`predict` (regression probes are left out, or
        refused by name).

        Returns:
            DataFrame indexed by ``text``, with columns ``(probe, class)`` (a
            ``MultiIndex``; classes by their label names where the probe has them).
        """
        chosen = self._deployed(probes, include_control, "predict_proba")
        acts, index = self._read(texts, chosen, batch_size, max_length)
        blocks, keys = [], []
        for name, probe in chosen.items():
            blocks.append(probe.predict_proba(acts[probe.requests[0]]))
            keys += [(name, class_name(probe, c)) for c in probe.classes_]
        return pd.DataFrame(np.hstack(blocks), columns=pd.MultiIndex.from_tuples(keys, names=["probe", "class"]),
                            index=index)

    def _read(self, texts: str | Sequence[str], chosen: dict[str, Probe], batch_size: int,
              max_length: int | None) -> tuple[dict[Any, np.ndarray], pd.Index]:
        """The chosen probes' pooled rows for ``texts`` and the index of the result."""
        max_length = self._max_length(max_length)
        texts, index = _texts(texts)
        acts = self.pooled(self._dataset(texts, max_length), requests_of(chosen.values()), batch_size, "deployed")
        return acts, index if index is not None else pd.RangeIndex(len(texts), name="text")

    def score_tokens(self, texts: str | Sequence[str], probes: str | Sequence[str] | None = None, *,
                     batch_size: int = 16, max_length: int | None = None,
                     include_control: bool = False) -> pd.DataFrame:
        """Every probe's score of every real token of each text (padding never enters).

        A probe trained on pooled rows is applied to each token's activation at its site,
        standardization and head included (see the module docstring). The arguments are as
        for :meth:`predict`; every probe is used by default, token-level ones included.
        Each batch's activations are scored as it is read and dropped: only the scores stay.

        Returns:
            A tidy DataFrame, one row per token: ``text`` (the text's number), ``position``
            (0 for its first token), ``token`` (the text the token adds: a text's tokens
            join back to its decoded ids), ``token_id``, then the probes' columns
            (:func:`~lm_probe.probes.columns.score_columns`).
        """
        chosen = self._deployed(probes, include_control)
        max_length = self._max_length(max_length)
        data = self._dataset(_texts(texts)[0], max_length)
        requests = list(dict.fromkeys((p.config.site, "none") for p in chosen.values()))
        self._resolve([spec for spec, _ in requests])
        scores: list[Any] = [None] * len(data)
        for batch in data.batches(check_batch_size(batch_size), by_length=True):
            acts = self.source.read(batch, data, requests)
            cuts = np.cumsum(batch.attention_mask.sum(1).numpy())[:-1]
            block = np.hstack([token_scores(p, acts[(p.config.site, "none")]) for p in chosen.values()])
            for i, part in zip(batch.index, np.split(block, cuts)):
                scores[i] = part
        ids = [row.tolist() for row in data.ids]
        frame = pd.DataFrame({"text": np.repeat(np.arange(len(data)), [len(row) for row in ids]),
                              "position": np.concatenate([np.arange(len(row)) for row in ids]),
                              "token": [piece for row in ids for piece in token_strings(self.model.tokenizer, row)],
                              "token_id": np.concatenate(data.ids)})
        columns = [c for name, probe in chosen.items() for c in score_columns(name, probe)]
        return pd.concat([frame, pd.DataFrame(np.concatenate(scores), columns=columns)], axis=1)
