"""Control tasks (Hewitt and Liang, 2019): what a probe learns without the property.

A probe's accuracy says little on its own: a flexible probe can memorize. Its twin is
trained on *control* labels, in the same pass on the same activations, and the gap
(``selectivity`` = task accuracy - control accuracy) is what the representation adds.

* Token tasks: each word type gets a fixed random label drawn from the task's label
  distribution, the same wherever the word occurs (in training or test).
* Sequence tasks: the labels of each split are permuted once with the seed.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

from .dataset import IGNORE, ProbeDataset

__all__ = ["control_sequence_labels", "control_token_labels", "label_distribution"]


def label_distribution(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, probabilities)`` of the labeled entries (``IGNORE`` left out)."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels[labels != IGNORE], return_counts=True)
    return classes, counts / counts.sum()


def control_sequence_labels(labels: np.ndarray, seed: int) -> np.ndarray:
    """The labels permuted once with ``seed``."""
    return np.asarray(labels)[np.random.default_rng(seed).permutation(len(labels))]


def control_token_labels(data: ProbeDataset, classes: np.ndarray, probs: np.ndarray,
                         seed: int) -> list[np.ndarray]:
    """Per-token control labels: a fixed draw from ``(classes, probs)`` per word type.

    The draw depends only on the seed and the lower-cased word, so a word type has the
    same control label in every split and every run.
    """
    if data.token_words is None:
        raise ValueError("control tasks for token labels need the words: build the data with from_tagged")
    cache: dict[str, int] = {}

    def draw(word: str) -> int:
        key = word.lower()
        if key not in cache:
            rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
            cache[key] = int(rng.choice(classes, p=probs))
        return cache[key]

    out = []
    for labels, words in zip(data.token_labels, data.token_words):
        out.append(np.array([IGNORE if lab == IGNORE else draw(w) for lab, w in zip(labels, words)], np.int64))
    return out


def control_targets(data: ProbeDataset, token: bool, classes: Sequence[int], probs: np.ndarray, seed: int):
    """Control targets for a split, indexed like the split (array or list of arrays)."""
    if token:
        return control_token_labels(data, np.asarray(classes), probs, seed)
    return control_sequence_labels(data.labels, seed)
