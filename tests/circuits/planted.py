"""A tiny GPT-2 whose label is carried by one MLP neuron (shared by the circuit tests)."""

from __future__ import annotations

import numpy as np
import torch

from lm_probe import ProbeDataset
from lm_probe.testing import WORDS, tiny_model, tiny_tokenizer

NEURON = 5
LABEL_WORD = "good"
SITE = "transformer.h.0.mlp.output"
MLP = "transformer.h.0.mlp"


def planted_model() -> torch.nn.Module:
    """One block; attention writes nothing; token ``good``'s embedding points along dim 0, and
    neuron ``NEURON`` of the MLP fires iff its input is that token. Every other neuron writes
    into the MLP's output a thousand times more weakly."""
    model = tiny_model("gpt2", layers=1, seed=0)
    tok = tiny_tokenizer()
    good = tok.convert_tokens_to_ids(LABEL_WORD)
    block = model.transformer.h[0]
    with torch.no_grad():
        block.attn.c_proj.weight.zero_()
        block.attn.c_proj.bias.zero_()
        model.transformer.wte.weight[good] = 0.0
        model.transformer.wte.weight[good, 0] = 5.0
        block.mlp.c_fc.weight[:, NEURON] = 0.0  # Conv1D: (in, out)
        block.mlp.c_fc.weight[0, NEURON] = 4.0
        block.mlp.c_fc.bias[NEURON] = -12.0
        block.mlp.c_proj.weight *= 1e-3
        block.mlp.c_proj.weight[NEURON] = torch.randn(block.mlp.c_proj.weight.shape[1]) / 2
    return model


def planted_data(n: int = 240, seed: int = 0) -> ProbeDataset:
    """Sentences of random words other than ``good``; label 1 puts ``good`` at a random place."""
    rng = np.random.default_rng(seed)
    others = [w for w in WORDS if w != LABEL_WORD]
    texts, labels = [], rng.integers(0, 2, n)
    for label in labels:
        words = list(rng.choice(others, int(rng.integers(4, 9))))
        if label:
            words.insert(int(rng.integers(len(words) + 1)), LABEL_WORD)
        texts.append(" ".join(words))
    return ProbeDataset.from_texts(texts, labels, tiny_tokenizer(pad=True))


def planted_tokens(n: int = 160, seed: int = 0) -> ProbeDataset:
    """The same sentences tagged word by word: 1 for ``good``, 0 for every other word."""
    rng = np.random.default_rng(seed)
    others = [w for w in WORDS if w != LABEL_WORD]
    sentences = []
    for _ in range(n):
        words = list(rng.choice(others, int(rng.integers(4, 9))))
        words.insert(int(rng.integers(len(words) + 1)), LABEL_WORD)
        sentences.append(words)
    tags = [[int(w == LABEL_WORD) for w in words] for words in sentences]
    return ProbeDataset.from_tagged(sentences, tags, tiny_tokenizer(pad=True))
