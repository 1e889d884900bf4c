"""ProbeDataset: labeled token sequences, split and batched for the runner.

Examples are stored unpadded (one id array each) and padded per batch to that batch's
longest example, on the tokenizer's padding side, so no batch carries more padding
than it needs. Every check a dataset can make about itself (lengths, empty input,
labels, truncation) happens here, when it is built, before any model runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from loguru import logger

__all__ = ["ProbeDataset", "Batch", "ensure_pad_token", "check_batch_size", "encode_labels", "format_labels",
           "IGNORE"]

#: Label of positions that no probe trains or is scored on (padding, continuation
#: subwords, special tokens), as in Hugging Face token classification.
IGNORE = -100


@dataclass
class Batch:
    """One padded batch.

    Attributes:
        input_ids: ``(batch, tokens)`` int64.
        attention_mask: ``(batch, tokens)`` int64, 1 for real tokens.
        labels: ``(batch,)`` labels (int64, or float64 regression targets).
        index: ``(batch,)`` positions in the dataset.
        token_labels: Token tasks: the labels of every real token, example by example,
            left to right (the row order of ``pool="none"``), ``IGNORE`` where unlabeled.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: np.ndarray
    index: np.ndarray
    token_labels: np.ndarray | None = None


def check_batch_size(batch_size: Any, name: str = "batch_size") -> int:
    """Check a number of examples per batch before any batch is made.

    Every public function that takes a batch size calls this first, so ``0``, a negative
    number or a float fails with one message that names the argument, instead of a
    ``ZeroDivisionError`` from deep inside a pass.

    Args:
        batch_size: The value given.
        name: The argument's name, for the message (``"--batch-size"`` on the command line).

    Returns:
        ``batch_size`` as an int.

    Raises:
        ValueError: ``batch_size`` is not a whole number of at least 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"{name} must be a whole number of examples per batch, at least 1; got {batch_size!r}")
    return int(batch_size)


def encode_labels(labels: Any, label_names: Sequence[str] | None = None,
                  what: str = "labels") -> tuple[np.ndarray, list[str] | None]:
    """Class names to integer labels, through a given mapping or in sorted order.

    Integer (or float) labels pass through unchanged; ``label_names`` then only names them
    (``label_names[i]`` names label ``i``), and each label must have a name. String labels
    are mapped through ``label_names`` when it is given, else in sorted order (logged).

    Args:
        labels: One label per example: integers, floats (regression targets) or strings.
        label_names: The name of each integer label, in order.
        what: What the labels are, for messages.

    Returns:
        ``(labels, label_names)``: an int64 (or float64) array and the names (``None``
        when there are none).

    Raises:
        ValueError: a mix of names and numbers, a name missing from ``label_names``, an
            integer label without a name, or names given for regression targets.
    """
    values = list(labels) if not isinstance(labels, np.ndarray) else labels.tolist()
    names = None if label_names is None else [str(n) for n in label_names]
    if names is not None and len(set(names)) != len(names):
        raise ValueError(f"label_names {names} lists a name twice; give each class one name")
    strings = [isinstance(v, str) for v in values]
    if any(strings) and not all(strings):
        row = strings.index(False) if strings[0] else strings.index(True)
        raise ValueError(f"{what} mix class names and numbers (index {row} is {values[row]!r}); use one or the other")
    if values and all(strings):
        if names is None:
            names = sorted(set(values))
            logger.info("{} are class names; mapped in sorted order: {}", what, dict(zip(names, range(len(names)))))
        code = {n: k for k, n in enumerate(names)}
        unknown = sorted(set(values) - set(code))
        if unknown:
            raise ValueError(f"{what} {unknown} are not among label_names {names}; add them to label_names")
        return np.asarray([code[v] for v in values], np.int64), names
    array = np.asarray(labels)
    if names is not None:
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"label_names names integer class labels, but the {what} are {array.dtype} values")
        outside = sorted(set(array.tolist()) - set(range(len(names))))
        if outside:
            raise ValueError(f"{what} {outside} have no name in label_names {names} (label i is named by "
                             f"label_names[i], i = 0..{len(names) - 1})")
    return array, names


def format_labels(labels: Any, names: Sequence[str] | None = None) -> str:
    """Labels for a message, each with its name when names are known: ``"[0 (neg), 1 (pos)]"``."""
    def one(label: Any) -> str:
        k = int(label)
        return f"{k} ({names[k]})" if names is not None and 0 <= k < len(names) else str(k)

    return "[" + ", ".join(one(v) for v in labels) + "]"


def ensure_pad_token(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token one (its EOS, else UNK token) and say so.

    Raises:
        ValueError: the tokenizer has no pad, EOS or UNK token to reuse.
    """
    if tokenizer.pad_token is not None:
        return
    for candidate in ("eos_token", "unk_token"):
        token = getattr(tokenizer, candidate, None)
        if token is not None:
            tokenizer.pad_token = token
            logger.warning(
                "the tokenizer had no pad token; using its {} {!r} for padding "
                "(padding is masked out, so this does not change any activation)",
                candidate.replace("_token", ""), token,
            )
            return
    raise ValueError(
        "the tokenizer has no pad token and no EOS/UNK token to reuse; "
        "set one first, e.g. tokenizer.pad_token = tokenizer.eos_token"
    )


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
            ids, found_pad, found_side = _unpad(ids, labels, len(tensor_labels))
            width, labels = np.shape(labels)[1], tensor_labels
            pad_token_id = found_pad if pad_token_id is None else pad_token_id
            padding_side = found_side if padding_side is None else padding_side
        elif getattr(labels, "ndim", 1) == 2:
            raise ValueError("labels is 2-D, like an attention mask: the original lm_probe's form takes the labels "
                             "third, ProbeDataset(input_ids, attention_mask, labels)")
        pad_token_id = 0 if pad_token_id is None else pad_token_id
        padding_side = "right" if padding_side is None else padding_side
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
        their tokens). A word's tag goes to its first token (or to all of its tokens
        with ``label_first_subword_only=False``); every other position (special tokens,
        continuation subwords, padding) is ``IGNORE`` and is never trained or scored.

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
        flat = sorted({t for tags in tags_per_sentence for t in tags}, key=str)
        as_ints = all(isinstance(t, (int, np.integer)) for t in flat)
        names = None if as_ints else [str(t) for t in flat]
        code = {t: (int(t) if as_ints else k) for k, t in enumerate(flat)}
        ids, token_labels, token_words, cut, cut_sentences = [], [], [], 0, 0
        for words, tags in zip(words_per_sentence, tags_per_sentence):
            text, spans, pos = "", [], 0
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
                if w not in seen or not label_first_subword_only:
                    labels[t] = code[tags[w]]
                seen.add(w)
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
        return cls(ids, None, pad_token_id=tokenizer.pad_token_id, padding_side=getattr(tokenizer, "padding_side", "right"),
                   token_labels=token_labels, token_words=token_words, label_names=names)

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

        if self.is_token_level or self.is_regression:  # split by example (sentence), never by token
            try:
                train, test = train_test_split(np.arange(len(self)), test_size=test_size, random_state=seed)
            except ValueError as err:
                raise ValueError(f"cannot split {len(self)} examples with test_size={test_size}: {err}") from None
            return self.subset(np.sort(train)), self.subset(np.sort(test))
        classes, counts = np.unique(self.labels, return_counts=True)
        if counts.min() < 2:
            rare = classes[counts < 2].tolist()
            raise ValueError(
                f"cannot make a stratified split: classes {format_labels(rare, self.label_names)} have a single "
                "example; add examples or drop those classes"
            )
        try:
            train, test = train_test_split(
                np.arange(len(self)), test_size=test_size, random_state=seed, stratify=self.labels
            )
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
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self)) if shuffle else np.arange(len(self))
        lengths = np.array([len(r) for r in self.ids])
        if by_length and not shuffle:
            order = np.argsort(lengths, kind="stable")
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if by_length and shuffle:
            window = batch_size * bucket
            order = np.concatenate([w[np.argsort(lengths[w], kind="stable")]
                                    for w in np.split(order, range(window, len(order), window))])
            chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        for index in chunks:
            yield self._pad(index)

    def _pad(self, index: np.ndarray, width: int | None = None) -> Batch:
        rows = [self.ids[i] for i in index]
        width = max([len(r) for r in rows] + [width or 0])
        ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for k, row in enumerate(rows):
            span = slice(width - len(row), width) if self.padding_side == "left" else slice(0, len(row))
            ids[k, span], mask[k, span] = row, 1
        tokens = None if self.token_labels is None else np.concatenate([self.token_labels[i] for i in index] or
                                                                        [np.zeros(0, np.int64)])
        return Batch(torch.from_numpy(ids), torch.from_numpy(mask), self.labels[index], index, tokens)


def _unpad(input_ids: Any, attention_mask: Any, n_labels: int) -> tuple[list[np.ndarray], int | None, str | None]:
    """Padded ``(n, tokens)`` ids and their mask -> the real tokens of each row, the pad id
    (``None`` unless every padded position holds the same id) and the padding side
    (``None`` unless every padded row is padded on the same side)."""
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"input_ids has shape {ids.shape} but attention_mask has {mask.shape}; both must be "
                         "(examples, tokens)")
    if len(ids) != n_labels:
        raise ValueError(f"got {len(ids)} rows of input_ids but {n_labels} labels")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold 0 (padding) and 1 (real tokens) only")
    real = mask.astype(bool)
    pads = np.unique(ids[~real])
    padded = ~real.all(1)
    left, right = padded & ~real[:, 0], padded & ~real[:, -1]
    side = "left" if left.any() and not right.any() else "right" if right.any() and not left.any() else None
    return [row[m] for row, m in zip(ids, real)], int(pads[0]) if len(pads) == 1 else None, side
