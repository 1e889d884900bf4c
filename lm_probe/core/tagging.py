"""Word tags to token labels: the alignment behind :meth:`ProbeDataset.from_tagged`.

Each sentence's words are joined with single spaces and tokenized once; each token is
aligned to the word whose characters it covers, through the fast tokenizer's offsets (so
leading-space markers such as GPT-2's ``Ġ`` stay on their tokens). A word's tag goes to
its first token (or to all of its tokens); every other position (special tokens,
continuation subwords, padding) is :data:`~lm_probe.core.labels.IGNORE`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from loguru import logger

from .labels import IGNORE

__all__ = ["tag_tokens", "tag_codes", "align_sentence"]


def tag_codes(tags_per_sentence: Sequence[Sequence[Any]]) -> tuple[dict[Any, int], list[str] | None]:
    """The integer label of each tag, and the label names: integer tags are their own
    labels (no names); other tags are numbered in sorted order and named."""
    flat = sorted({t for tags in tags_per_sentence for t in tags}, key=str)
    as_ints = all(isinstance(t, (int, np.integer)) for t in flat)
    names = None if as_ints else [str(t) for t in flat]
    return {t: (int(t) if as_ints else k) for k, t in enumerate(flat)}, names


def align_sentence(words: Sequence[str], tags: Sequence[Any], tokenizer: Any, code: dict[Any, int],
                   first_only: bool) -> tuple[list[int], np.ndarray, list[str | None]]:
    """One sentence's token ids, token labels (``IGNORE`` where none) and the word each
    token belongs to (``None`` for special tokens and separating spaces)."""
    text, spans = "", []
    for w in words:
        if text:
            text += " "
        spans.append((len(text), len(text) + len(w)))
        text += w
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True, truncation=False)
    row, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = np.full(len(row), IGNORE, dtype=np.int64)
    owner: list[str | None] = [None] * len(row)
    seen: set[int] = set()
    for t, (a, b) in enumerate(offsets):
        if b <= a:
            continue  # special tokens have empty spans
        w = next((k for k, (s0, s1) in enumerate(spans) if a < s1 and b > s0), None)
        if w is None:
            continue  # a token of the separating space alone
        owner[t] = words[w]
        if w not in seen or not first_only:
            labels[t] = code[tags[w]]
        seen.add(w)
    return row, labels, owner


def tag_tokens(words_per_sentence: Sequence[Sequence[str]], tags_per_sentence: Sequence[Sequence[Any]],
               tokenizer: Any, *, label_first_subword_only: bool = True, max_length: int = 128
               ) -> tuple[list[np.ndarray], list[np.ndarray], list[list[str | None]], list[str] | None]:
    """Every sentence aligned (:func:`align_sentence`) and cut to ``max_length`` tokens; the
    word labels cut off are counted in a warning.

    Returns:
        ``(ids, token_labels, token_words, label_names)``, one entry per sentence for the
        first three.
    """
    code, names = tag_codes(tags_per_sentence)
    ids, token_labels, token_words, cut, cut_sentences = [], [], [], 0, 0
    for words, tags in zip(words_per_sentence, tags_per_sentence):
        row, labels, owner = align_sentence(words, tags, tokenizer, code, label_first_subword_only)
        if len(row) > max_length:
            lost = int(np.sum(labels[max_length:] != IGNORE))
            cut += lost
            cut_sentences += lost > 0
        ids.append(np.asarray(row[:max_length], np.int64))
        token_labels.append(labels[:max_length])
        token_words.append(owner[:max_length])
    if cut:
        logger.warning("{} word labels in {} sentences fell beyond max_length={} tokens and were cut; "
                       "raise max_length to keep them", cut, cut_sentences, max_length)
    return ids, token_labels, token_words, names
