"""ProbeDataset: labeled token sequences, split and batched for the runner.

Examples are stored unpadded and padded per batch to that batch's longest example, on
the tokenizer's side (:mod:`~lm_probe.core.batching`), so no batch carries more padding
than it needs. Every check a dataset can make about itself (lengths, empty input, labels
(:mod:`~lm_probe.core.labels`), truncation) happens when it is built, before any model runs.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from loguru import logger

from .batching import Batch, batch_order, check_batch_size, pad, unpad
from .labels import IGNORE, encode_labels, format_labels
from .model import ensure_pad_token
from .tagging import tag_tokens

__all__ = ["ProbeDataset"]


class ProbeDataset:
    """Labeled token sequences.

    Build one with :meth:`from_texts` or :meth:`from_tensors`; the original lm_probe's
    ``ProbeDataset(input_ids, attention_mask, labels)`` is :meth:`from_tensors` too.
    Indexing (``data[0:5]``) gives the original's dict of padded tensors.

    Args:
        ids: One int array of token ids per example, without padding. In the original
            form: ``(n, tokens)`` padded ids.
        labels: ``(n,)`` labels (integers, or floats for regression). In the original
            form: the ``(n, tokens)`` attention mask of ``ids``.
        tensor_labels: Given only in the original form: its ``(n,)`` labels.
        pad_token_id: Id used to pad batches (default: the id at the padded positions of
            padded ``ids``, else 0).
        padding_side: ``"left"`` or ``"right"`` (default: the side padded ``ids`` are
            padded on, else ``"right"``).
        texts: The source texts.
        token_labels, token_words, label_names: Token-level labels (see :meth:`from_tagged`).
        example_ids: See the attributes.

    Attributes:
        ids: One int64 array of token ids per example, without padding.
        labels: ``(n,)`` int64 labels.
        pad_token_id: Id used to pad batches.
        padding_side: ``"left"`` or ``"right"``.
        texts: The source texts, when built from texts.
        example_ids: A stable id per example (its position in the dataset it was built
            as; kept through ``subset`` and ``tt_split``), used by activation stores.
    """

    def __init__(
        self,
        ids: Sequence[np.ndarray] | torch.Tensor | np.ndarray,
        labels: Sequence[int] | Sequence[float] | np.ndarray | torch.Tensor | None = None,
        tensor_labels: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        *,
        pad_token_id: int | None = None,
        padding_side: str | None = None,
        texts: Sequence[str] | None = None,
        token_labels: Sequence[np.ndarray] | None = None,
        token_words: Sequence[Sequence[str | None]] | None = None,
        label_names: Sequence[str] | None = None,
        example_ids: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        width = None
        if tensor_labels is not None:  # the original lm_probe's (input_ids, attention_mask, labels)
            ids, found_pad, found_side = unpad(ids, labels, len(tensor_labels))
            width, labels = np.shape(labels)[1], tensor_labels
            pad_token_id = found_pad if pad_token_id is None else pad_token_id
            padding_side = found_side if padding_side is None else padding_side
        elif getattr(labels, "ndim", 1) == 2:
            raise ValueError("labels is 2-D, like an attention mask: the original lm_probe's form takes the labels "
                             "third, ProbeDataset(input_ids, attention_mask, labels)")
        pad_token_id = 0 if pad_token_id is None else pad_token_id
        padding_side = "right" if padding_side is None else padding_side
        labels = _checked(ids, labels, texts, token_labels, padding_side)
        self.ids = [np.asarray(row, dtype=np.int64) for row in ids]
        self.labels = labels if np.issubdtype(labels.dtype, np.floating) else labels.astype(np.int64)
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.texts = list(texts) if texts is not None else None
        self.token_labels = None if token_labels is None else [np.asarray(t, np.int64) for t in token_labels]
        self.token_words = None if token_words is None else [list(w) for w in token_words]
        self.label_names = None if label_names is None else list(label_names)
        self.example_ids = np.arange(len(ids)) if example_ids is None else np.asarray(example_ids, np.int64)
        if len(self.example_ids) != len(ids) or len(np.unique(self.example_ids)) != len(ids):
            raise ValueError("example_ids must give one distinct id per example")
        self._width = width  # the padded width it was built from: indexing pads to it, as the original did

    @property
    def is_token_level(self) -> bool:
        """Whether the labels are per token (``from_tagged``)."""
        return self.token_labels is not None

    @property
    def is_regression(self) -> bool:
        """Whether the labels are continuous targets."""
        return np.issubdtype(self.labels.dtype, np.floating)

    # ---------------------------------------------------------------- builders
    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        labels: Sequence[int] | Sequence[str],
        tokenizer: Any,
        max_length: int = 128,
        *,
        label_names: Sequence[str] | None = None,
    ) -> "ProbeDataset":
        """Tokenize texts (without padding) into a dataset.

        Texts longer than ``max_length`` tokens are truncated, and counted in a warning.

        Args:
            texts: The examples.
            labels: One label per text: an integer, a float (regression), or a class name.
            tokenizer: A Hugging Face tokenizer; one without a pad token is given one.
            max_length: Maximum tokens per example.
            label_names: The name of each integer label (``label_names[i]`` names label
                ``i``): class-name labels are mapped through it (without it, in sorted
                order), and messages name the classes.
        """
        texts = list(texts)
        if len(texts) != len(labels):
            raise ValueError(f"got {len(texts)} texts but {len(labels)} labels; they must match")
        labels, label_names = encode_labels(labels, label_names)
        if not texts:
            raise ValueError("the dataset is empty: give at least one text")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"texts must be strings; index {bad[0]} is {type(texts[bad[0]]).__name__}")
        ensure_pad_token(tokenizer)
        encoded = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        too_long = sum(len(row) > max_length for row in encoded)
        if too_long:
            logger.warning(
                "{} of {} texts are longer than max_length={} tokens and were truncated "
                "to their first {} tokens; raise max_length to keep them whole",
                too_long, len(texts), max_length, max_length,
            )
        ids = [np.asarray(row[:max_length], dtype=np.int64) for row in encoded]
        return cls(ids, labels, pad_token_id=tokenizer.pad_token_id,
                   padding_side=getattr(tokenizer, "padding_side", "right"), texts=texts, label_names=label_names)

    @classmethod
    def from_hf(
        cls,
        dataset: Any,
        tokenizer: Any,
        *,
        text_column: str = "text",
        label_column: str = "label",
        max_length: int = 128,
    ) -> "ProbeDataset":
        """Build a dataset from a Hugging Face ``datasets.Dataset`` (or any mapping of columns).

        Args:
            dataset: Has ``text_column`` (strings) and ``label_column`` (integers, a
                ``ClassLabel``, whose names become ``label_names``, or class names).
            tokenizer: A Hugging Face tokenizer.
            text_column: Column with the texts.
            label_column: Column with the labels.
            max_length: Maximum tokens per example (longer texts are truncated and counted).
        """
        columns = list(getattr(dataset, "column_names", None) or dataset.keys())
        missing = [c for c in (text_column, label_column) if c not in columns]
        if missing:
            raise ValueError(
                f"the dataset has no column {missing[0]!r}; its columns are {columns}. "
                "Pass text_column=... / label_column=..."
            )
        feature = (getattr(dataset, "features", None) or {}).get(label_column)
        names = list(feature.names) if hasattr(feature, "names") else None
        return cls.from_texts(list(dataset[text_column]), np.asarray(dataset[label_column]),
                              tokenizer, max_length=max_length, label_names=names)

    @classmethod
    def from_tagged(
        cls,
        words_per_sentence: Sequence[Sequence[str]],
        tags_per_sentence: Sequence[Sequence[Any]],
        tokenizer: Any,
        *,
        label_first_subword_only: bool = True,
        max_length: int = 128,
    ) -> "ProbeDataset":
        """Token-level labels from word-tagged sentences (part of speech, entities...).

        Each sentence's words are joined with single spaces and tokenized once; each
        token is aligned to the word whose characters it covers, through the fast
        tokenizer's offsets (so leading-space markers such as GPT-2's ``Ġ`` stay on
        their tokens; :mod:`lm_probe.core.tagging`). A word's tag goes to its first token
        (or to all of its tokens with ``label_first_subword_only=False``); every other
        position (special tokens, continuation subwords, padding) is ``IGNORE`` and is
        never trained or scored.

        Args:
            words_per_sentence: Words of each sentence.
            tags_per_sentence: One tag per word: strings (mapped to integers in sorted
                order; ``label_names`` keeps the names) or integers.
            tokenizer: A fast Hugging Face tokenizer (it must return offsets).
            label_first_subword_only: Label only each word's first token.
            max_length: Tokens per sentence at most; labels cut off are counted and
                reported in a warning.
        """
        if len(words_per_sentence) != len(tags_per_sentence):
            raise ValueError(f"got {len(words_per_sentence)} sentences of words but {len(tags_per_sentence)} of tags")
        for i, (words, tags) in enumerate(zip(words_per_sentence, tags_per_sentence)):
            if len(words) != len(tags):
                raise ValueError(f"sentence {i} has {len(words)} words but {len(tags)} tags; they must match "
                                 f"(words: {list(words)[:8]}...)")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("from_tagged needs a fast tokenizer (offsets): load it with use_fast=True")
        ensure_pad_token(tokenizer)
        ids, token_labels, token_words, names = tag_tokens(words_per_sentence, tags_per_sentence, tokenizer,
                                                           label_first_subword_only=label_first_subword_only,
                                                           max_length=max_length)
        return cls(ids, None, pad_token_id=tokenizer.pad_token_id,
                   padding_side=getattr(tokenizer, "padding_side", "right"), token_labels=token_labels,
                   token_words=token_words, label_names=names)

    @classmethod
    def from_tensors(
        cls,
        input_ids: torch.Tensor | np.ndarray,
        attention_mask: torch.Tensor | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        *,
        pad_token_id: int | None = None,
        padding_side: str | None = None,
    ) -> "ProbeDataset":
        """Build a dataset from padded ids and their mask; padding is dropped.

        Args:
            input_ids: ``(n, tokens)`` ids, padded on either side.
            attention_mask: ``(n, tokens)`` mask, 1 for real tokens.
            labels: ``(n,)`` integer labels.
            pad_token_id: Id to pad batches with (default: the id at the padded positions,
                when they all hold one, else 0).
            padding_side: Side to pad batches on (default: the side ``input_ids`` are
                padded on, when it is one side, else ``"right"``).
        """
        return cls(input_ids, attention_mask, labels, pad_token_id=pad_token_id, padding_side=padding_side)

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Examples as the original lm_probe's dataset gave them: padded tensors.

        Args:
            index: A position (``data[0]``), a slice (``data[0:5]``) or positions.

        Returns:
            ``{"input_ids", "attention_mask"}``: ``(k, tokens)`` int64, padded with
            ``pad_token_id`` on ``padding_side`` to the width of the tensors the dataset
            was built from (else to the longest example picked); ``"labels"``: ``(k,)``.
            A position gives ``(tokens,)`` rows and a 0-d label.
        """
        picked = np.arange(len(self))[index]  # IndexError past the end, as a sequence should
        batch = self._pad(np.atleast_1d(picked), width=self._width)
        items = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                 "labels": torch.as_tensor(batch.labels)}
        return {key: value[0] for key, value in items.items()} if np.ndim(picked) == 0 else items

    def __repr__(self) -> str:
        classes = dict(zip(*np.unique(self.labels, return_counts=True)))
        return f"ProbeDataset(n={len(self)}, classes={ {int(k): int(v) for k, v in classes.items()} })"

    @property
    def classes(self) -> np.ndarray:
        """Sorted distinct labels (of labeled tokens, for token tasks)."""
        labels = self.flat_token_labels() if self.is_token_level else self.labels
        return np.unique(labels[labels != IGNORE]) if not self.is_regression else np.array([])

    def flat_token_labels(self) -> np.ndarray:
        """All token labels, example by example (the row order of ``pool="none"``)."""
        if self.token_labels is None:
            raise ValueError("this dataset has no token labels; build it with ProbeDataset.from_tagged(...)")
        return np.concatenate(self.token_labels)

    def subset(self, index: Sequence[int] | np.ndarray) -> "ProbeDataset":
        """The examples at ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64)
        pick = lambda values: None if values is None else [values[i] for i in index]
        part = ProbeDataset(
            [self.ids[i] for i in index], self.labels[index],
            pad_token_id=self.pad_token_id, padding_side=self.padding_side, texts=pick(self.texts),
            token_labels=pick(self.token_labels), token_words=pick(self.token_words), label_names=self.label_names,
            example_ids=self.example_ids[index],
        )
        part._width = self._width
        return part

    def tt_split(self, test_size: float = 0.2, seed: int = 0) -> tuple["ProbeDataset", "ProbeDataset"]:
        """Stratified, seeded train/test split.

        Args:
            test_size: Fraction (0-1) or number of examples for the second part.
            seed: Same seed, same split.

        Returns:
            ``(train, test)``.
        """
        from sklearn.model_selection import train_test_split

        stratify = None  # token tasks and regression: split by example (sentence), never by token
        if not (self.is_token_level or self.is_regression):
            classes, counts = np.unique(self.labels, return_counts=True)
            if counts.min() < 2:
                rare = classes[counts < 2].tolist()
                raise ValueError(
                    f"cannot make a stratified split: classes {format_labels(rare, self.label_names)} have a single "
                    "example; add examples or drop those classes"
                )
            stratify = self.labels
        try:
            train, test = train_test_split(np.arange(len(self)), test_size=test_size, random_state=seed,
                                           stratify=stratify)
        except ValueError as err:
            raise ValueError(f"cannot split {len(self)} examples with test_size={test_size}: {err}") from None
        return self.subset(np.sort(train)), self.subset(np.sort(test))

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, by_length: bool = False,
        bucket: int = 16,
    ) -> Iterator[Batch]:
        """Yield padded batches.

        Padding costs forward-pass time, so batches can group examples of similar
        length. Pooled activations do not depend on which examples share a batch
        (padding is exact), only the order in which a probe sees them does.

        Args:
            batch_size: Examples per batch (the last batch may be smaller).
            shuffle: Visit examples in a seeded random order.
            seed: Seed for the order.
            by_length: Without ``shuffle``: sort all examples by length (fastest, for
                evaluation; ``Batch.index`` says where each row belongs). With
                ``shuffle``: shuffle, sort within windows of ``bucket`` batches, then
                shuffle the batches (a bucketed shuffle, for training).
            bucket: Window size in batches for the bucketed shuffle.
        """
        batch_size = check_batch_size(batch_size)
        lengths = np.array([len(r) for r in self.ids])
        for index in batch_order(lengths, batch_size, shuffle=shuffle, seed=seed, by_length=by_length, bucket=bucket):
            yield self._pad(index)

    def _pad(self, index: np.ndarray, width: int | None = None) -> Batch:
        ids, mask = pad([self.ids[i] for i in index], self.pad_token_id, self.padding_side, width)
        tokens = None if self.token_labels is None else np.concatenate([self.token_labels[i] for i in index] or
                                                                        [np.zeros(0, np.int64)])
        return Batch(torch.from_numpy(ids), torch.from_numpy(mask), self.labels[index], index, tokens)


def _checked(ids: Sequence[Any], labels: Any, texts: Sequence[str] | None, token_labels: Sequence[Any] | None,
             padding_side: str) -> np.ndarray:
    """``labels`` as an array (``IGNORE`` for each example of a token task without them),
    after every check a dataset makes of its examples: none empty, one label (a finite
    integer or float) and text per example, one token label per token, a padding side."""
    if len(ids) == 0:
        raise ValueError("the dataset is empty: give at least one example")
    if labels is None:
        if token_labels is None:
            raise ValueError("give labels (one per example) or token_labels (one per token)")
        labels = np.full(len(ids), IGNORE, dtype=np.int64)
    labels = np.asarray(labels)
    if len(ids) != len(labels):
        raise ValueError(f"got {len(ids)} examples but {len(labels)} labels; they must match")
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise ValueError(
            f"labels must be a flat sequence of integers (classes) or floats (regression targets), got "
            f"dtype {labels.dtype} and shape {labels.shape}; map class names to integers first"
        )
    if np.issubdtype(labels.dtype, np.floating) and not np.isfinite(labels).all():
        bad = np.flatnonzero(~np.isfinite(labels))
        raise ValueError(f"{len(bad)} regression targets are NaN or infinite (first at index {bad[0]}); "
                         "drop those examples or fill them")
    if texts is not None and len(texts) != len(ids):
        raise ValueError(f"got {len(texts)} texts for {len(ids)} examples")
    empty = [i for i, row in enumerate(ids) if len(row) == 0]
    if empty:
        raise ValueError(f"{len(empty)} examples have no tokens (first at index {empty[0]})")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if token_labels is not None:
        bad = [i for i, (row, tl) in enumerate(zip(ids, token_labels)) if len(row) != len(tl)]
        if len(token_labels) != len(ids) or bad:
            raise ValueError(f"token_labels must give one label per token of each example (example {bad[:1]})")
    return labels
