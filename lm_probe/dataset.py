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

__all__ = ["ProbeDataset", "Batch", "ensure_pad_token"]


@dataclass
class Batch:
    """One padded batch.

    Attributes:
        input_ids: ``(batch, tokens)`` int64.
        attention_mask: ``(batch, tokens)`` int64, 1 for real tokens.
        labels: ``(batch,)`` int64.
        index: ``(batch,)`` positions in the dataset.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: np.ndarray
    index: np.ndarray


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

    Build one with :meth:`from_texts` or :meth:`from_tensors`.

    Attributes:
        ids: One int64 array of token ids per example, without padding.
        labels: ``(n,)`` int64 labels.
        pad_token_id: Id used to pad batches.
        padding_side: ``"left"`` or ``"right"``.
        texts: The source texts, when built from texts.
    """

    def __init__(
        self,
        ids: Sequence[np.ndarray],
        labels: Sequence[int] | np.ndarray,
        *,
        pad_token_id: int = 0,
        padding_side: str = "right",
        texts: Sequence[str] | None = None,
    ) -> None:
        labels = np.asarray(labels)
        if len(ids) == 0:
            raise ValueError("the dataset is empty: give at least one example")
        if len(ids) != len(labels):
            raise ValueError(f"got {len(ids)} examples but {len(labels)} labels; they must match")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be a flat sequence of integers, got dtype {labels.dtype} "
                f"and shape {labels.shape}; map class names to integers first"
            )
        if texts is not None and len(texts) != len(ids):
            raise ValueError(f"got {len(texts)} texts for {len(ids)} examples")
        empty = [i for i, row in enumerate(ids) if len(row) == 0]
        if empty:
            raise ValueError(f"{len(empty)} examples have no tokens (first at index {empty[0]})")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.ids = [np.asarray(row, dtype=np.int64) for row in ids]
        self.labels = labels.astype(np.int64)
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.texts = list(texts) if texts is not None else None

    # ---------------------------------------------------------------- builders
    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        labels: Sequence[int],
        tokenizer: Any,
        max_length: int = 128,
    ) -> "ProbeDataset":
        """Tokenize texts (without padding) into a dataset.

        Texts longer than ``max_length`` tokens are truncated, and counted in a warning.

        Args:
            texts: The examples.
            labels: One integer label per text.
            tokenizer: A Hugging Face tokenizer; one without a pad token is given one.
            max_length: Maximum tokens per example.
        """
        texts = list(texts)
        if len(texts) != len(labels):
            raise ValueError(f"got {len(texts)} texts but {len(labels)} labels; they must match")
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
                   padding_side=getattr(tokenizer, "padding_side", "right"), texts=texts)

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
            dataset: Has ``text_column`` (strings) and ``label_column`` (integers, or a
                ``ClassLabel``).
            tokenizer: A Hugging Face tokenizer.
            text_column: Column with the texts.
            label_column: Column with the integer labels.
            max_length: Maximum tokens per example (longer texts are truncated and counted).
        """
        columns = list(getattr(dataset, "column_names", None) or dataset.keys())
        missing = [c for c in (text_column, label_column) if c not in columns]
        if missing:
            raise ValueError(
                f"the dataset has no column {missing[0]!r}; its columns are {columns}. "
                "Pass text_column=... / label_column=..."
            )
        return cls.from_texts(list(dataset[text_column]), np.asarray(dataset[label_column]),
                              tokenizer, max_length=max_length)

    @classmethod
    def from_tensors(
        cls,
        input_ids: torch.Tensor | np.ndarray,
        attention_mask: torch.Tensor | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        *,
        pad_token_id: int = 0,
        padding_side: str = "right",
    ) -> "ProbeDataset":
        """Build a dataset from padded ids and their mask; padding is dropped.

        Args:
            input_ids: ``(n, tokens)`` ids, padded on either side.
            attention_mask: ``(n, tokens)`` mask, 1 for real tokens.
            labels: ``(n,)`` integer labels.
            pad_token_id: Id to pad batches with.
            padding_side: Side to pad batches on.
        """
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        if ids.shape != mask.shape:
            raise ValueError(f"input_ids has shape {ids.shape} but attention_mask has {mask.shape}")
        if len(ids) != len(labels):
            raise ValueError(f"got {len(ids)} rows of input_ids but {len(labels)} labels")
        rows = [row[m.astype(bool)] for row, m in zip(ids, mask)]
        return cls(rows, labels, pad_token_id=pad_token_id, padding_side=padding_side)

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        classes = dict(zip(*np.unique(self.labels, return_counts=True)))
        return f"ProbeDataset(n={len(self)}, classes={ {int(k): int(v) for k, v in classes.items()} })"

    @property
    def classes(self) -> np.ndarray:
        """Sorted distinct labels."""
        return np.unique(self.labels)

    def subset(self, index: Sequence[int] | np.ndarray) -> "ProbeDataset":
        """The examples at ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64)
        return ProbeDataset(
            [self.ids[i] for i in index], self.labels[index],
            pad_token_id=self.pad_token_id, padding_side=self.padding_side,
            texts=[self.texts[i] for i in index] if self.texts is not None else None,
        )

    def tt_split(self, test_size: float = 0.2, seed: int = 0) -> tuple["ProbeDataset", "ProbeDataset"]:
        """Stratified, seeded train/test split.

        Args:
            test_size: Fraction (0-1) or number of examples for the second part.
            seed: Same seed, same split.

        Returns:
            ``(train, test)``.
        """
        from sklearn.model_selection import train_test_split

        classes, counts = np.unique(self.labels, return_counts=True)
        if counts.min() < 2:
            rare = classes[counts < 2].tolist()
            raise ValueError(
                f"cannot make a stratified split: classes {rare} have a single example; "
                "add examples or drop those classes"
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
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
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

    def _pad(self, index: np.ndarray) -> Batch:
        rows = [self.ids[i] for i in index]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for k, row in enumerate(rows):
            span = slice(width - len(row), width) if self.padding_side == "left" else slice(0, len(row))
            ids[k, span], mask[k, span] = row, 1
        return Batch(torch.from_numpy(ids), torch.from_numpy(mask), self.labels[index], index)
