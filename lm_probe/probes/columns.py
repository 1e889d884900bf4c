"""How a deployed probe's scores are computed and named, and how tokens are shown.

Shared by :mod:`lm_probe.probes.deploy` (``predict``, ``score_tokens``) and
:mod:`lm_probe.probes.monitor` (the live monitor), so a score column has one name and one
value everywhere: a binary classifier's column is the probe's name and holds the
probability of its second class (``classes_[1]``); a multi-class probe has one column per
class, ``"<name>[<class>]"``; a regression probe's column is its predicted value. Classes
are named by the probe's ``label_names`` (its config's, else those learned from the
training data's :attr:`~lm_probe.ProbeDataset.label_names`, :attr:`Probe.label_names_`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .probe import Probe

__all__ = ["class_name", "label_names_of", "score_columns", "token_scores", "token_strings", "next_piece", "METADATA"]

#: The columns :meth:`~lm_probe.ProbeRunner.score_tokens` puts before the probes' scores.
METADATA = ("text", "position", "token", "token_id")


def label_names_of(probe: Probe) -> list[str] | None:
    """The probe's class names: its config's ``label_names``, else the training data's."""
    names = getattr(probe.config, "label_names", None)
    return names if names is not None else getattr(probe, "label_names_", None)


def class_name(probe: Probe, label: Any) -> Any:
    """A class's name: the probe's ``label_names`` entry, else the integer label (the fit
    refuses names that do not cover every class, so there is no silent fallback)."""
    names = label_names_of(probe)
    return names[int(label)] if names is not None else int(label)


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


def token_strings(tokenizer: Any, ids: Sequence[int], start: int = 0) -> list[str]:
    """Each token of ``ids[start:]`` as the piece it adds to the decoded text, so that the
    pieces of all ``ids`` join back to ``tokenizer.decode(ids)`` (a SentencePiece or
    byte-level token decoded alone loses or shows its leading space differently): piece
    ``k`` is ``decode(ids[:k + 1])`` less ``decode(ids[:k])``. Where the shorter prefix does
    not decode to the start of the longer (an incomplete UTF-8 sequence), the token is
    decoded alone.

    Args:
        tokenizer: A Hugging Face tokenizer.
        ids: The token ids, in order (the context of ``ids[start:]`` included).
        start: The first token to return a piece for.
    """
    ids = [int(i) for i in ids]
    pieces, done = [], tokenizer.decode(ids[:start]) if start else ""
    for k in range(start, len(ids)):
        piece, done = next_piece(tokenizer, done, ids[:k + 1])
        pieces.append(piece)
    return pieces


def next_piece(tokenizer: Any, done: str, ids: Sequence[int]) -> tuple[str, str]:
    """``(the piece ids[-1] adds to done, decode(ids))``, where ``done`` is
    ``decode(ids[:-1])`` (the rule of :func:`token_strings`, one token at a time: a live
    generation decodes each prefix once)."""
    text = tokenizer.decode(ids)
    return (text[len(done):] if text.startswith(done) else tokenizer.decode([ids[-1]])), text
