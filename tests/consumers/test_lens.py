"""The logit lens against the model's own logits and a float64 reference, through the runner."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as tf

from lm_probe import Consumer, NotComputedError, ProbeConfig, ProbeDataset, ProbeRunner, load_model
from lm_probe.consumers.lens import LogitLens
from lm_probe.core.architectures import find_blocks, find_final_norm, find_unembedding
from lm_probe.testing import WORDS, tiny_model, tiny_tokenizer

from conftest import count_calls

VOCAB = len(WORDS) + 3
PAIRS = [(5, 6), (10, 3), (40, 41)]
#: where each family keeps its blocks, final norm and unembedding, written out by hand
STRUCTURE = {"gpt2": ("transformer.h", "transformer.ln_f", "lm_head"),
             "llama": ("model.layers", "model.norm", "lm_head")}


def tiny_llama(tied: bool) -> torch.nn.Module:
    torch.manual_seed(1)
    cfg = tf.LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                         bos_token_id=2, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama_tied():
    return load_model(tiny_llama(tied=True), tokenizer=tiny_tokenizer())


@pytest.fixture
def models(gpt2, llama, llama_tied):
    return {"gpt2": gpt2, "llama": llama, "llama_tied": llama_tied}


def family(name: str) -> str:
    return name.split("_")[0]


def sites_of(name: str) -> list[str]:
    return [f"{STRUCTURE[family(name)][0]}.{i}.output" for i in range(4)]


def examples(n: int = 8, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=int(rng.integers(2, 10))) for _ in range(n)]


def dataset(ids: list[np.ndarray], side: str = "right") -> ProbeDataset:
    return ProbeDataset(ids, np.zeros(len(ids), np.int64), pad_token_id=0, padding_side=side)


def reference(model, name: str, ids: list[np.ndarray], position: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Each example alone, unpadded: ``(examples, blocks, vocab)`` float64 lens logits computed
    by hand from the block outputs, and ``(examples, vocab)`` the model's own logits."""
    hf = model._module
    blocks_path, norm_path, head_path = STRUCTURE[family(name)]
    blocks, norm, head = hf.get_submodule(blocks_path), hf.get_submodule(norm_path), hf.get_submodule(head_path)
    caught: dict[int, torch.Tensor] = {}
    handles = [block.register_forward_hook(
        lambda _m, _a, out, i=i: caught.__setitem__(i, (out[0] if isinstance(out, tuple) else out)[0, position]))
        for i, block in enumerate(blocks)]
    lens, final = [], []
    try:
        for row in ids:
            with torch.no_grad():
                final.append(hf(torch.as_tensor(row)[None]).logits[0, position].double().numpy())
                h = torch.stack([caught[i] for i in range(len(blocks))]).double()
                if isinstance(norm, torch.nn.LayerNorm):
                    x = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + norm.eps)
                    x = x * norm.weight.double() + norm.bias.double()
                else:  # RMSNorm
                    x = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()
                lens.append((x @ head.weight.double().T).numpy())
    finally:
        for handle in handles:
            handle.remove()
    return np.stack(lens), np.stack(final)


def wide(frame: pd.DataFrame, site: str, n: int) -> np.ndarray:
    """A top_k table with top_k = vocabulary, as ``(examples, vocab)`` logits of one site."""
    part = frame[frame["site"] == site]
    out = np.full((n, VOCAB), np.nan)
    out[part["example"].to_numpy(), part["token_id"].to_numpy()] = part["logit"].to_numpy()
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---------------------------------------------------------------- structure
def test_finds_blocks_norm_and_unembedding_from_the_structure():
    torch.manual_seed(0)
    neox = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                  num_attention_heads=4, vocab_size=70))
    gemma2 = tf.Gemma2ForCausalLM(tf.Gemma2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                  vocab_size=70))
    cases = {"gpt2": (tiny_model("gpt2"), STRUCTURE["gpt2"]), "llama": (tiny_model("llama"), STRUCTURE["llama"]),
             "neox": (neox, ("gpt_neox.layers", "gpt_neox.final_layer_norm",
                             "embed_out" if hasattr(neox, "embed_out") else "lm_head")),  # renamed in transformers 5
             "gemma2": (gemma2, ("model.layers", "model.norm", "lm_head"))}
    for name, (module, (blocks, norm, head)) in cases.items():
        found = find_blocks(module)
        assert (found, find_final_norm(module, found), find_unembedding(module)) == (blocks, norm, head), name
    gpt2 = cases["gpt2"][0]
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight, "GPT-2's unembedding is tied to its embedding"


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "llama_tied"])
def test_lens_at_the_last_block_is_the_models_own_logits(models, name, side):
    model, ids = models[name], examples()
    head, embed = model._module.get_output_embeddings(), model._module.get_input_embeddings()
    assert (head.weight is embed.weight) == (name != "llama"), "the case covers tied and untied unembeddings"
    sites = sites_of(name)
    lens = LogitLens(sites, top_k=VOCAB)
    ProbeRunner(model, consumers=[lens], progress=False).collect(dataset(ids, side), batch_size=4)
    lens_ref, final = reference(model, name, ids)
    got = wide(lens.top_k, sites[-1], len(ids))
    np.testing.assert_allclose(got, final, atol=1e-4, rtol=0)  # padded batches vs each example alone
    for layer, site in enumerate(sites):
        np.testing.assert_allclose(wide(lens.top_k, site, len(ids)), lens_ref[:, layer], atol=1e-5, rtol=0)
    assert lens.max_head_error_ < 1e-5
    assert (lens.blocks_path_, lens.norm_path_, lens.head_path_) == STRUCTURE[family(name)]


def test_first_position(gpt2):
    ids = examples()
    sites = ["transformer.h.0.output", "transformer.h[-1].output"]  # as written, in any index style
    lens = LogitLens(sites, position="first", top_k=VOCAB)
    ProbeRunner(gpt2, consumers=[lens], progress=False).collect(dataset(ids, "left"), batch_size=4)
    _, final = reference(gpt2, "gpt2", ids, position=0)
    np.testing.assert_allclose(wide(lens.top_k, sites[-1], len(ids)), final, atol=1e-4, rtol=0)
    assert lens.agreement["agreement_final"].tolist()[-1] == 1.0 and lens.agreement["layer"].tolist() == [0, 3]


def test_softcapped_logits_and_a_bfloat16_model():
    torch.manual_seed(0)
    cfg = tf.Gemma2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, initializer_range=0.2,
                          final_logit_softcapping=1.0)  # Gemma 2 caps its logits after the unembedding
    gemma = tf.Gemma2ForCausalLM(cfg).eval()
    ids = examples()
    sites = ["model.layers.0.output", "model.layers.1.output"]
    lens = LogitLens(sites, top_k=VOCAB)
    ProbeRunner(load_model(gemma, tokenizer=tiny_tokenizer()), consumers=[lens], progress=False).collect(
        dataset(ids, "left"), batch_size=4)
    with torch.no_grad():
        final = np.stack([gemma(torch.as_tensor(row)[None]).logits[0, -1].numpy() for row in ids])
    assert np.abs(final).max() > 0.5, "the cap bends these logits"
    np.testing.assert_allclose(wide(lens.top_k, sites[-1], len(ids)), final, atol=1e-5, rtol=0)
    assert lens.agreement["agreement_final"].iloc[-1] == 1.0

    half = load_model(tiny_model("llama").to(torch.bfloat16), tokenizer=tiny_tokenizer())
    lens = LogitLens(sites_of("llama"), top_k=3)  # the lens runs in the model's dtype, as the model does
    ProbeRunner(half, consumers=[lens], progress=False).collect(dataset(ids, "left"), batch_size=4)
    assert lens.max_head_error_ < 1e-2 and lens.agreement["agreement_final"].iloc[-1] == 1.0


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_give_each_example_alone(llama, side):
    ids = examples(8, seed=3)
    frames = []
    for batch_size in (5, 1):
        lens = LogitLens(sites_of("llama"), top_k=5, token_pairs=PAIRS, targets=[row[0] for row in ids])
        ProbeRunner(llama, consumers=[lens], progress=False).collect(dataset(ids, side), batch_size=batch_size)
        frames.append(lens.compute())
    padded, alone = frames
    for key in ("top_k", "logit_diff", "agreement"):
        pd.testing.assert_frame_equal(padded[key], alone[key], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- tables against a float64 reference
def check_tables(result: dict, lens_ref: np.ndarray, final: np.ndarray, sites: list[str], layers: list[int],
                 targets: np.ndarray, k: int = 5) -> None:
    """``lens_ref[:, i]`` is the float64 reference at ``sites[i]``, block ``layers[i]``."""
    n = len(final)
    top, diff, agree = result["top_k"], result["logit_diff"], result["agreement"]
    assert len(top) == n * len(sites) * k and len(diff) == n * len(sites) * len(PAIRS)
    assert top["example"].is_monotonic_increasing
    assert (top.groupby(["example", "site"])["prob"].sum() <= 1 + 1e-12).all()
    for i, site in enumerate(sites):
        ref = lens_ref[:, i]
        part = top[top["site"] == site]
        assert (part["layer"] == layers[i]).all()
        ids = part["token_id"].to_numpy().reshape(n, k)
        np.testing.assert_array_equal(ids, np.argsort(-ref, axis=1, kind="stable")[:, :k])
        probs = np.take_along_axis(softmax(ref), ids, 1)
        np.testing.assert_allclose(part["prob"].to_numpy().reshape(n, k), probs, rtol=1e-5)
        pairs = diff[diff["site"] == site]
        assert pairs["pair"].tolist()[:len(PAIRS)] == [f"{a}-{b}" for a, b in PAIRS]
        expected = np.stack([ref[:, a] - ref[:, b] for a, b in PAIRS], 1)
        np.testing.assert_allclose(pairs["logit_diff"].to_numpy().reshape(n, len(PAIRS)), expected, atol=1e-5)
        row = agree.set_index("site").loc[site]
        assert row["n"] == n
        assert row["agreement_final"] == np.mean(ref.argmax(1) == final.argmax(1))
        assert row["agreement_target"] == np.mean(ref.argmax(1) == targets)
        assert 0 <= row["agreement_final"] <= 1 and 0 <= row["agreement_target"] <= 1
    assert agree["agreement_final"].iloc[-1] == 1.0, "the last block's lens is the model's readout"


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_tables_match_a_float64_reference(models, name):
    model, ids = models[name], examples(16, seed=1)
    lens_ref, final = reference(model, name, ids)
    targets = lens_ref[:, 1].argmax(1)  # layer 1's top-1 for most examples, so agreement is not just 0
    targets[::3] = 7
    lens = LogitLens(sites_of(name), top_k=5, token_pairs=PAIRS, targets=targets)
    ProbeRunner(model, consumers=[lens], progress=False).collect(dataset(ids), batch_size=6)
    check_tables(lens.compute(), lens_ref, final, sites_of(name), [0, 1, 2, 3], targets)
    assert lens.top_k["token"].map(type).eq(str).all(), "decoded with the model's tokenizer"
    assert 0 < lens.agreement["agreement_target"].iloc[1] < 1


class Recorder(Consumer):
    def __init__(self, requests):
        self.requests, self.batches = tuple(requests), []

    def update(self, batch):
        self.batches.append(batch)


# test_conformance.py runs the lens through the conformance harness (with check_tables and Recorder)


# ---------------------------------------------------------------- with probes, and a head the lens misses
def test_alongside_probes_one_epoch_of_examples(llama, toy):
    train = toy[0].subset(np.arange(96))
    lens = LogitLens(sites_of("llama")[:2], top_k=3)
    runner = ProbeRunner(llama, [ProbeConfig("model.layers.1.output")], consumers=[lens], progress=False)
    last, handle = count_calls(llama._module.model.layers[3])  # reached only while the lens reads the logits
    try:
        runner.fit_probes(train, num_epochs=2, val_size=0, batch_size=32, eval_every=100, patience=100)
    finally:
        handle.remove()
    batches = -(-len(train) // 32)
    assert runner["model.layers.1.output"].n_steps_ == 2 * batches
    assert last["n"] == batches, "the lens reads (and runs the forward to the end) in the first epoch only"
    assert sorted(lens.top_k["example"].unique()) == list(range(len(train)))
    assert (lens.agreement["n"] == len(train)).all()


def test_warns_when_the_lens_is_not_the_models_readout(gpt2, logs):
    handle = gpt2._module.transformer.register_forward_hook(
        lambda _m, _a, out: out.__setitem__("last_hidden_state", out["last_hidden_state"] * 3 + 1))
    try:
        lens = LogitLens(sites_of("gpt2"), top_k=3)
        ProbeRunner(gpt2, consumers=[lens], progress=False).collect(dataset(examples()), batch_size=4)
    finally:
        handle.remove()
    assert lens.max_head_error_ > 1e-2
    assert any("not the model's own readout" in m for m in logs)


# ---------------------------------------------------------------- bad input, before any forward
@pytest.fixture
def no_forward(llama):
    calls, handle = count_calls(llama._module)
    yield calls
    handle.remove()
    assert calls["n"] == 0, "bad input must be caught before any forward pass"


@pytest.mark.parametrize("site", ["model.layers.1.mlp.output", "model.layers.1.self_attn.output",
                                  "model.norm.output", "model.layers.1.input"])
def test_site_that_is_not_a_block_output(llama, no_forward, site):
    lens = LogitLens(["model.layers.0.output", site])
    with pytest.raises(ValueError, match=r"residual-stream sites \(block outputs\); '" + site) as err:
        ProbeRunner(llama, consumers=[lens], progress=False).collect(dataset(examples()))
    assert "'model.layers.0.output'" in str(err.value) and "'model.layers.3.output'" in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"token_pairs": [(5, VOCAB)]}, rf"token_pairs have token ids \[{VOCAB}\] outside the vocabulary"),
    ({"targets": [3] * 7 + [VOCAB + 1]}, rf"targets have token ids \[{VOCAB + 1}\] outside the vocabulary"),
    ({"targets": [3] * 7}, "targets has 7 entries but the dataset has 8 examples"),
    ({"top_k": VOCAB + 1}, "exceeds the vocabulary size"),
])
def test_bad_token_ids_and_targets(llama, no_forward, kwargs, message):
    lens = LogitLens(sites_of("llama"), **kwargs)
    with pytest.raises(ValueError, match=message):
        ProbeRunner(llama, consumers=[lens], progress=False).collect(dataset(examples()))


@pytest.mark.parametrize("kwargs, message", [
    ({"position": "mean"}, "position must be one of"), ({"top_k": 0}, "top_k must be a positive integer"),
    ({"token_pairs": [(1, -2)]}, "non-negative integer token ids"), ({"token_pairs": [(1, 2, 3)]}, r"\(a, b\) pairs"),
    ({"targets": [1.5]}, "non-negative integer token ids"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LogitLens(["model.layers.0.output"], **kwargs)
    with pytest.raises(ValueError, match="listed twice"):
        LogitLens(["model.layers.0.output", "model.layers.0.output"])


def test_compute_before_update_and_update_before_start(llama):
    lens = LogitLens(sites_of("llama"))
    with pytest.raises(NotComputedError):
        lens.compute()
    with pytest.raises(NotComputedError):
        lens.top_k
    with pytest.raises(RuntimeError, match="start"):
        lens.update(None)
