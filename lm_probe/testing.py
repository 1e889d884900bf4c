"""Tiny random models and toy data, for tests, benchmarks' quick mode and examples.

Nothing here touches the network: models are built from configs with random weights,
and the tokenizer is a word-level tokenizer over a fixed vocabulary.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["tiny_tokenizer", "tiny_bpe_tokenizer", "tiny_model", "toy_texts", "WORDS"]

WORDS = (
    "the a an this that movie film story plot actor actress scene ending music "
    "is was feels looks very quite really so too not never always "
    "good great superb lovely brilliant fun charming moving "
    "bad awful boring dull terrible weak clumsy tedious "
    "and but or with without of in on for to it its"
).split()
POSITIVE = ("good", "great", "superb", "lovely", "brilliant", "fun", "charming", "moving")
NEGATIVE = ("bad", "awful", "boring", "dull", "terrible", "weak", "clumsy", "tedious")


def tiny_tokenizer(eos: bool = True, pad: bool = False) -> Any:
    """A word-level fast tokenizer over :data:`WORDS` (unknown words map to ``<unk>``).

    Args:
        eos: Give it an EOS token (``<eos>``).
        pad: Give it a pad token (``<pad>``); by default it has none, like GPT-2's.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"unk_token": "<unk>"}
    if eos:
        special["eos_token"] = "<eos>"
    if pad:
        special["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=core, **special)


def tiny_bpe_tokenizer(vocab_size: int = 300) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style, ``Ġ`` marks a leading space) trained on
    :data:`WORDS` sentences, small enough that most words split into several subwords.
    Its ids fit a :func:`tiny_model` built with ``vocab=vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts, _ = toy_texts(300, seed=11)
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")


def tiny_model(family: str = "gpt2", *, layers: int = 4, hidden: int = 32, seed: int = 0,
               vocab: int | None = None) -> torch.nn.Module:
    """A small random model in eval mode, built from a config (no download).

    Args:
        family: ``"gpt2"``, ``"llama"`` or ``"bert"``.
        layers: Number of blocks.
        hidden: Hidden size.
        seed: Seed for the random weights.
        vocab: Vocabulary size (default: that of :func:`tiny_tokenizer`).
    """
    import transformers as tf

    vocab = vocab or len(WORDS) + 3
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = tf.GPT2Config(n_layer=layers, n_embd=hidden, n_head=4, vocab_size=vocab, n_positions=128,
                            bos_token_id=2, eos_token_id=2)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                             max_position_embeddings=128, bos_token_id=2, eos_token_id=2, pad_token_id=0)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "bert":
        cfg = tf.BertConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_attention_heads=4, vocab_size=vocab, max_position_embeddings=128, pad_token_id=0)
        model = tf.BertForMaskedLM(cfg)
    else:
        raise ValueError(f"unknown family {family!r}; choose 'gpt2', 'llama' or 'bert'")
    return model.eval()


def toy_texts(n: int, *, n_classes: int = 2, seed: int = 0, min_words: int = 4,
              max_words: int = 12) -> tuple[list[str], np.ndarray]:
    """Random sentences whose label decides which sentiment words they contain.

    Class 0 draws from negative words, the last class from positive ones, classes in
    between mix them in proportion, so a linear probe on mean-pooled activations can
    learn the label. Lengths vary, so batches carry padding.

    Returns:
        ``(texts, labels)`` with labels ``0 .. n_classes - 1``.
    """
    rng = np.random.default_rng(seed)
    neutral = [w for w in WORDS if w not in POSITIVE and w not in NEGATIVE]
    labels = rng.integers(0, n_classes, size=n)
    texts = []
    for label in labels:
        length = int(rng.integers(min_words, max_words + 1))
        share = label / max(n_classes - 1, 1)
        words = []
        for _ in range(length):
            if rng.random() < 0.4:
                pool = POSITIVE if rng.random() < share else NEGATIVE
            else:
                pool = neutral
            words.append(pool[rng.integers(len(pool))])
        texts.append(" ".join(words))
    return texts, labels.astype(np.int64)
