import numpy as np
import pytest
import torch

from lm_probe import ProbeDataset
from lm_probe.testing import tiny_tokenizer, toy_texts


def test_from_texts_sets_missing_pad_token_and_says_so(logs):
    tok = tiny_tokenizer(eos=True, pad=False)
    assert tok.pad_token is None
    data = ProbeDataset.from_texts(["good movie", "bad film"], [1, 0], tokenizer=tok)
    assert tok.pad_token == "<eos>" and data.pad_token_id == tok.eos_token_id
    assert any("no pad token" in m and "'<eos>'" in m for m in logs)


def test_tokenizer_without_any_reusable_token():
    tok = tiny_tokenizer(eos=False, pad=False)
    tok.unk_token = None
    with pytest.raises(ValueError, match="tokenizer.pad_token = tokenizer.eos_token"):
        ProbeDataset.from_texts(["good"], [1], tokenizer=tok)


def test_long_texts_are_counted_in_a_warning(logs):
    tok = tiny_tokenizer(pad=True)
    texts = ["good " * 10, "bad " * 3, "fun " * 6]
    data = ProbeDataset.from_texts(texts, [1, 0, 1], tokenizer=tok, max_length=5)
    assert [len(r) for r in data.ids] == [5, 3, 5]
    assert any("2 of 3 texts are longer than max_length=5" in m for m in logs)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda tok: ProbeDataset.from_texts([], [], tokenizer=tok), "empty"),
        (lambda tok: ProbeDataset.from_texts(["a", "b"], [1], tokenizer=tok), "2 texts but 1 labels"),
        (lambda tok: ProbeDataset.from_tensors(torch.ones(3, 4), torch.ones(3, 5), [0, 1, 0]), r"shape \(3, 4\) but attention_mask has \(3, 5\)"),
        (lambda tok: ProbeDataset.from_tensors(torch.ones(3, 4), torch.ones(3, 4), [0, 1]), "3 rows of input_ids but 2 labels"),
        (lambda tok: ProbeDataset([np.array([1, 2])], ["pos"]), "integers"),
        (lambda tok: ProbeDataset([np.array([], dtype=int), np.array([3])], [0, 1]), "no tokens"),
        (lambda tok: ProbeDataset([np.array([1])], [0], padding_side="middle"), "padding_side"),
    ],
)
def test_bad_input(build, match):
    with pytest.raises(ValueError, match=match):
        build(tiny_tokenizer(pad=True))


def test_from_tensors_drops_padding_on_either_side():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    data = ProbeDataset.from_tensors(ids, mask, [0, 1])
    assert [r.tolist() for r in data.ids] == [[5, 6], [7, 8, 9]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_batches_pad_to_the_batch_maximum(side):
    data = ProbeDataset([np.array([5]), np.array([6, 7, 8]), np.array([9, 9])], [0, 1, 0],
                        pad_token_id=0, padding_side=side)
    first, second = data.batches(2)
    assert first.input_ids.shape == (2, 3) and second.input_ids.shape == (1, 2)
    expected = [[0, 0, 5], [6, 7, 8]] if side == "left" else [[5, 0, 0], [6, 7, 8]]
    assert first.input_ids.tolist() == expected
    assert first.attention_mask.sum(1).tolist() == [1, 3]


def test_split_is_stratified_deterministic_and_disjoint():
    texts, labels = toy_texts(203, n_classes=3, seed=4)
    data = ProbeDataset.from_texts(texts, labels, tokenizer=tiny_tokenizer(pad=True))
    train, test = data.tt_split(0.2, seed=7)
    again, _ = data.tt_split(0.2, seed=7)
    other, _ = data.tt_split(0.2, seed=8)
    assert len(train) + len(test) == 203 and abs(len(test) - 41) <= 1
    assert train.texts == again.texts and train.texts != other.texts
    assert not set(train.texts) & set(test.texts) or len(set(texts)) < len(texts)
    for c in range(3):
        share_all = np.mean(labels == c)
        assert abs(np.mean(test.labels == c) - share_all) < 0.03


def test_split_refuses_singleton_class():
    data = ProbeDataset([np.array([1])] * 5, [0, 0, 0, 0, 1])
    with pytest.raises(ValueError, match=r"classes \[1\] have a single example"):
        data.tt_split(0.2)
    named = ProbeDataset([np.array([1])] * 5, [0, 0, 0, 0, 1], label_names=["neg", "pos"])
    with pytest.raises(ValueError, match=r"classes \[1 \(pos\)\] have a single example"):
        named.tt_split(0.2)


def test_class_name_labels_map_through_label_names(logs):
    tok = tiny_tokenizer(pad=True)
    texts = ["good film", "bad film", "fun", "dull"]
    data = ProbeDataset.from_texts(texts, ["pos", "neg", "pos", "neg"], tok, label_names=["pos", "neg"])
    assert data.labels.tolist() == [0, 1, 0, 1] and data.label_names == ["pos", "neg"]
    data = ProbeDataset.from_texts(texts, ["pos", "neg", "pos", "neg"], tok)  # no mapping: sorted order, logged
    assert data.labels.tolist() == [1, 0, 1, 0] and data.label_names == ["neg", "pos"]
    assert any("mapped in sorted order" in m for m in logs)
    assert ProbeDataset.from_texts(texts, [1, 0, 1, 0], tok, label_names=["neg", "pos"]).label_names == ["neg", "pos"]
    with pytest.raises(ValueError, match=r"labels \['good'\] are not among label_names \['neg', 'pos'\]"):
        ProbeDataset.from_texts(texts, ["pos", "good", "pos", "neg"], tok, label_names=["neg", "pos"])
    with pytest.raises(ValueError, match="mix class names and numbers"):
        ProbeDataset.from_texts(texts, ["pos", 0, "pos", "neg"], tok)
    with pytest.raises(ValueError, match=r"labels \[2\] have no name in label_names"):
        ProbeDataset.from_texts(texts, [1, 0, 2, 0], tok, label_names=["neg", "pos"])
    assert data.subset([0, 1]).label_names == data.tt_split(2, seed=0)[1].label_names == ["neg", "pos"]


def test_from_hf_keeps_class_label_names():
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["rotten", "fresh"])})
    hf = datasets.Dataset.from_dict({"text": ["good film", "bad film"], "label": [1, 0]}, features=features)
    assert ProbeDataset.from_hf(hf, tiny_tokenizer(pad=True)).label_names == ["rotten", "fresh"]


def test_shuffled_batches_are_seeded():
    data = ProbeDataset([np.array([i + 1]) for i in range(10)], [0, 1] * 5)
    order = lambda seed: np.concatenate([b.index for b in data.batches(3, shuffle=True, seed=seed)])
    assert order(1).tolist() == order(1).tolist() != order(2).tolist()
    assert sorted(order(1).tolist()) == list(range(10))


def test_length_sorted_batches_cover_each_example_once():
    rng = np.random.default_rng(0)
    data = ProbeDataset([np.arange(1, n + 1) for n in rng.integers(1, 30, size=101)], [0, 1] * 50 + [0])
    lengths = np.array([len(r) for r in data.ids])
    batches = list(data.batches(8, by_length=True))
    index = np.concatenate([b.index for b in batches])
    assert sorted(index.tolist()) == list(range(101))
    assert np.all(np.diff(lengths[index]) >= 0)
    padded = sum(b.input_ids.numel() for b in batches)
    plain = sum(b.input_ids.numel() for b in data.batches(8))
    assert padded < 0.8 * plain


def test_bucketed_shuffle_is_seeded_and_complete():
    rng = np.random.default_rng(1)
    data = ProbeDataset([np.arange(1, n + 1) for n in rng.integers(1, 30, size=300)], [0, 1] * 150)
    order = lambda seed: [b.index.tolist() for b in data.batches(10, shuffle=True, seed=seed, by_length=True, bucket=4)]
    first = order(3)
    assert first == order(3) and first != order(4)
    assert sorted(sum(first, [])) == list(range(300))
    lengths = np.array([len(r) for r in data.ids])
    spread = np.mean([np.ptp(lengths[b]) for b in first])
    assert spread < np.mean([np.ptp(lengths[b.index]) for b in data.batches(10, shuffle=True, seed=3)])
