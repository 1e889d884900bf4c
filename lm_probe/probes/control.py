"""Control tasks (Hewitt and Liang, 2019): what a probe learns without the property.

A probe's accuracy says little on its own: a flexible probe can memorize. Its twin is
trained on *control* labels, in the same pass on the same activations, and the gap
(``selectivity`` = task accuracy - control accuracy) is what the representation adds.

A :class:`ControlTask` is built once per ``fit_probes`` from the fit split's label
distribution and gives the control labels of any split (fit, validation, test):

* Token tasks: each word type (lower-cased) gets a fixed label drawn from the
  distribution, the same wherever the word occurs, so a test word seen in training keeps
  its control label.
* Sequence tasks: each example gets a fixed label drawn from the distribution, keyed by
  its ``example_id`` (kept through ``subset`` and ``tt_split``), so an example has the
  same control label in every split, batch order and run.

The labels are functions of the seed and the key (word type or example id) alone: there
is no cache, so no split can receive another split's labels. A probe's twin is a probe of
the same config named ``"<name> [control]"`` (:func:`probes_for`), trained on them.
"""

from __future__ import annotations

import zlib
from typing import Any, Iterable

import numpy as np

from ..core.dataset import ProbeDataset

from ..core.labels import IGNORE
from ..functional.hashing import hash_uniform
from .config import ProbeConfig
from .probe import Probe
from .twins import make_probe

__all__ = ["ControlTask", "control_sequence_labels", "control_token_labels", "label_distribution",
           "CONTROL_SUFFIX", "is_control", "probes_for"]

CONTROL_SUFFIX = " [control]"  #: name suffix of a probe's control-task twin


def is_control(name: str) -> bool:
    """Whether ``name`` is a control twin's."""
    return name.endswith(CONTROL_SUFFIX)


def probes_for(configs: Iterable[ProbeConfig], seed: int) -> dict[str, Probe]:
    """One probe per config, plus its control twin where asked; seeds depend on the name only."""
    probes = {}
    for c in configs:
        for name in [c.name] + ([c.name + CONTROL_SUFFIX] if c.control else []):
            probes[name] = make_probe(c, random_state=(seed + zlib.crc32(name.encode())) % 2**32, name=name)
    return probes


def label_distribution(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, probabilities)`` of the labeled entries (``IGNORE`` left out)."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels[labels != IGNORE], return_counts=True)
    return classes, counts / counts.sum()


def control_sequence_labels(example_ids: np.ndarray, classes: np.ndarray, probs: np.ndarray,
                            seed: int) -> np.ndarray:
    """One control label per example: a draw from ``(classes, probs)`` keyed by its id.

    Args:
        example_ids: ``(n,)`` integer ids.
        classes: ``(k,)`` labels.
        probs: ``(k,)`` their probabilities.
        seed: Seed of the draw.

    Returns:
        ``(n,)`` int64 labels; the same id always gets the same label for the same seed.
    """
    u = hash_uniform(seed, np.asarray(example_ids, np.int64))
    pick = np.searchsorted(np.cumsum(probs), u, side="right").clip(max=len(classes) - 1)
    return np.asarray(classes, np.int64)[pick]


def control_token_labels(data: ProbeDataset, classes: np.ndarray, probs: np.ndarray,
                         seed: int) -> list[np.ndarray]:
    """Per-token control labels: a fixed draw from ``(classes, probs)`` per word type.

    The draw depends only on the seed and the lower-cased word, so a word type has the
    same control label in every split and every run.
    """
    if data.token_words is None:
        raise ValueError("control tasks for token labels need the words: build the data with from_tagged")
    drawn: dict[str, int] = {}  # within this call only: a word's draw is a pure function of it

    def draw(word: str) -> int:
        key = word.lower()
        if key not in drawn:
            rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
            drawn[key] = int(rng.choice(classes, p=probs))
        return drawn[key]

    out = []
    for labels, words in zip(data.token_labels, data.token_words):
        out.append(np.array([IGNORE if lab == IGNORE else draw(w) for lab, w in zip(labels, words)], np.int64))
    return out


class ControlTask:
    """The control labels of one fit, for any split.

    Args:
        token: Token task (labels per word type) or sequence task (per example id).
        classes: ``(k,)`` labels of the fit split.
        probs: ``(k,)`` their shares in the fit split.
        seed: The runner's seed.
    """

    def __init__(self, token: bool, classes: Any, probs: Any, seed: int) -> None:
        self.token, self.seed = bool(token), int(seed)
        self.classes, self.probs = np.asarray(classes, np.int64), np.asarray(probs, np.float64)

    @classmethod
    def for_fit(cls, fit: ProbeDataset, seed: int) -> "ControlTask":
        """The control task of a fit split: its label distribution (of labeled tokens)."""
        token = fit.is_token_level
        classes, probs = label_distribution(fit.flat_token_labels() if token else fit.labels)
        return cls(token, classes, probs, seed)

    def labels(self, data: ProbeDataset) -> np.ndarray | list[np.ndarray]:
        """Control labels of ``data``, indexed like it: ``(n,)`` for sequence tasks, one
        array per example (``IGNORE`` where the task has no label) for token tasks."""
        if self.token:
            return control_token_labels(data, self.classes, self.probs, self.seed)
        return control_sequence_labels(data.example_ids, self.classes, self.probs, self.seed)

    def flat_labels(self, data: ProbeDataset) -> np.ndarray:
        """Control labels in the row order of the probe's pooled activations."""
        labels = self.labels(data)
        return np.concatenate(labels) if self.token else labels

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (see :meth:`from_dict`)."""
        return {"token": self.token, "classes": self.classes.tolist(), "probs": self.probs.tolist(),
                "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict[str, Any], seed: int | None = None) -> "ControlTask":
        """Rebuild from :meth:`to_dict` (``seed`` for files written before it was stored)."""
        return cls(d["token"], d["classes"], d["probs"], d.get("seed", seed if seed is not None else 0))

    def __repr__(self) -> str:
        kind = "token" if self.token else "sequence"
        return f"ControlTask({kind}, classes={self.classes.tolist()}, seed={self.seed})"
