"""Shared fixtures: tiny random models (no downloads) and toy labeled texts."""

from __future__ import annotations

import numpy as np
import pytest
from loguru import logger

from lm_probe import ProbeDataset, load_model
from lm_probe.testing import tiny_model, tiny_tokenizer, toy_texts


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def any_model(request):
    """An nnsight-wrapped tiny random causal LM of each family."""
    return load_model(tiny_model(request.param, layers=4, hidden=32, seed=0), tokenizer=tiny_tokenizer())


@pytest.fixture(scope="session")
def gpt2():
    return load_model(tiny_model("gpt2", layers=4, hidden=32, seed=0), tokenizer=tiny_tokenizer())


@pytest.fixture(scope="session")
def llama():
    return load_model(tiny_model("llama", layers=4, hidden=32, seed=0), tokenizer=tiny_tokenizer())


@pytest.fixture(scope="session")
def toy():
    """(train, test) toy sentiment datasets for the llama tokenizer (pads left)."""
    tok = tiny_tokenizer()
    tok.pad_token, tok.padding_side = "<eos>", "left"
    texts, labels = toy_texts(400, seed=0)
    return ProbeDataset.from_texts(texts, labels, tokenizer=tok, max_length=32).tt_split(0.25, seed=0)


@pytest.fixture
def logs():
    """Messages that lm_probe logs through loguru during the test."""
    messages: list[str] = []
    handler = logger.add(lambda m: messages.append(m.record["message"]), level="DEBUG")
    yield messages
    logger.remove(handler)


def count_calls(module):
    """Attach a forward *pre*-hook (it fires even when nnsight stops the forward)."""
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    handle = module.register_forward_pre_hook(hook)
    return calls, handle


def tiny_experiment_folder(root, *, family="llama", layers=2, n=60, seed=0, text_column="text"):
    """A folder as experiment files use it: a tiny saved model in ``tiny/`` and toy labeled
    texts in ``toy.csv``. Returns ``(texts, labels)``."""
    import pandas as pd

    tiny_model(family, layers=layers, hidden=32, seed=0).save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    texts, labels = toy_texts(n, seed=seed)
    pd.DataFrame({text_column: texts, "label": labels}).to_csv(root / "toy.csv", index=False)
    return texts, labels
