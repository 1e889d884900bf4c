"""The original lm_probe's API (t-shoemaker/lm_probe): its README runs unchanged on ours.

Each piece of that README has its own test here, and one test runs the README's code end
to end on a tiny random GPT-2 (``load_model(...)`` in place of ``LanguageModel("gpt2")``),
checked against Hugging Face's own hidden states pooled by hand.
"""

import warnings

import numpy as np
import pytest
import torch

from lm_probe import ProbeConfig, ProbeDataset, ProbeRunner, StopReason, load_model
from lm_probe import probe as probe_module
from lm_probe.testing import tiny_model, tiny_tokenizer, toy_texts

WIDTH = 16  # GPT-2 pads to 1024 tokens with padding="max_length"; the tiny tokenizer to this


def _tokenizer(side="right"):
    tok = tiny_tokenizer()
    tok.pad_token, tok.padding_side, tok.model_max_length = "<eos>", side, WIDTH
    return tok


# ---------------------------------------------------------------- ProbeDataset
@pytest.mark.parametrize("side", ["right", "left"])
def test_three_positional_arguments_are_from_tensors(side):
    tok = _tokenizer(side)
    texts, labels = toy_texts(30, seed=1)
    inputs = tok(texts, padding="max_length", truncation=True, return_tensors="pt")
    ds = ProbeDataset(inputs["input_ids"], inputs["attention_mask"], labels.tolist())
    ref = ProbeDataset.from_tensors(inputs["input_ids"], inputs["attention_mask"], labels)
    assert [r.tolist() for r in ds.ids] == [r.tolist() for r in ref.ids] == tok(texts)["input_ids"]
    np.testing.assert_array_equal(ds.labels, labels)
    # the padding is read off the tensors: the tokenizer's pad id and side
    assert (ds.pad_token_id, ds.padding_side) == (ref.pad_token_id, ref.padding_side) == (tok.pad_token_id, side)


def test_our_own_constructor_is_unchanged():
    ds = ProbeDataset([np.array([5, 6]), np.array([7])], [0, 1])
    assert [r.tolist() for r in ds.ids] == [[5, 6], [7]]
    assert (ds.pad_token_id, ds.padding_side) == (0, "right")


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.ones(3, 4, dtype=torch.long), torch.ones(3, 5, dtype=torch.long), [0, 1, 0]),
         r"shape \(3, 4\) but attention_mask has \(3, 5\)"),
        ((torch.ones(3, 4, dtype=torch.long), torch.full((3, 4), 2), [0, 1, 0]), "0 \\(padding\\) and 1"),
        ((torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)), "labels third"),
    ],
)
def test_the_original_form_with_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        ProbeDataset(*args)


def test_tt_split_takes_the_original_test_size_keyword():
    ds = ProbeDataset([np.array([i + 1]) for i in range(20)], [0, 1] * 10)
    train, test = ds.tt_split(test_size=0.1)
    assert (len(train), len(test)) == (18, 2)
    assert sorted(train.example_ids.tolist() + test.example_ids.tolist()) == list(range(20))


def test_slicing_gives_the_original_dict_of_padded_tensors():
    tok = _tokenizer()
    texts, labels = toy_texts(40, seed=2)
    inputs = tok(texts, padding="max_length", truncation=True, return_tensors="pt")
    _, test_set = ProbeDataset(inputs["input_ids"], inputs["attention_mask"], labels).tt_split(test_size=0.25)
    docs = test_set[0:5]
    rows = test_set.example_ids[:5]
    expected = tok([texts[i] for i in rows], padding="max_length", truncation=True, return_tensors="pt")
    assert set(docs) == {"input_ids", "attention_mask", "labels"}
    for key in ("input_ids", "attention_mask"):
        assert docs[key].dtype == torch.int64 and docs[key].shape == (5, WIDTH)
        assert torch.equal(docs[key], expected[key])
    assert docs["labels"].tolist() == labels[rows].tolist()
    one = test_set[1]  # a position: one row, as the original's __getitem__
    assert torch.equal(one["input_ids"], expected["input_ids"][1]) and one["labels"].ndim == 0
    assert torch.equal(test_set[[3, 0]]["input_ids"], expected["input_ids"][[3, 0]])
    with pytest.raises(IndexError):
        test_set[len(test_set)]


def test_slicing_a_dataset_of_texts_pads_to_the_longest_picked():
    tok = _tokenizer()
    ds = ProbeDataset.from_texts(["good movie", "a very dull film", "fun"], [1, 0, 1], tokenizer=tok)
    docs = ds[0:2]
    assert torch.equal(docs["input_ids"], tok(["good movie", "a very dull film"], padding=True,
                                              return_tensors="pt")["input_ids"])
