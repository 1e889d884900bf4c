"""Batches: padded to their longest example, in an order chosen once per epoch.

A :class:`~lm_probe.core.dataset.ProbeDataset` keeps its examples unpadded;
:func:`batch_order` chooses which examples share a batch (in order, by length for
evaluation, or a seeded bucketed shuffle for training), :func:`pad` pads one batch on
the tokenizer's side, and :func:`unpad` turns padded ``(n, tokens)`` tensors back into
rows. :func:`check_batch_size` is the one check of a batch size, made before any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["Batch", "check_batch_size", "batch_order", "pad", "unpad"]


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


def batch_order(lengths: np.ndarray, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                by_length: bool = False, bucket: int = 16) -> list[np.ndarray]:
    """The dataset positions of each batch, in the order the batches are made (see
    :meth:`~lm_probe.core.dataset.ProbeDataset.batches` for the arguments).

    Args:
        lengths: ``(n,)`` tokens per example.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if by_length and not shuffle:
        order = np.argsort(lengths, kind="stable")
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if by_length and shuffle:
        window = batch_size * bucket
        order = np.concatenate([w[np.argsort(lengths[w], kind="stable")]
                                for w in np.split(order, range(window, len(order), window))])
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    return chunks


def pad(rows: Sequence[np.ndarray], pad_token_id: int, padding_side: str,
        width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of token ids padded to the longest (or to ``width``, if wider) on ``padding_side``.

    Returns:
        ``(ids, mask)``: ``(rows, width)`` int64 ids and their mask, 1 for real tokens.
    """
    width = max([len(r) for r in rows] + [width or 0])
    ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for k, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        ids[k, span], mask[k, span] = row, 1
    return ids, mask


def unpad(input_ids: Any, attention_mask: Any, n_labels: int) -> tuple[list[np.ndarray], int | None, str | None]:
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
