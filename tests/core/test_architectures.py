"""Role-named sites (resid_pre/post, attn_out, mlp_out, embed) across model families.

Every family is a tiny random model built from a config. Independent references: the
Hugging Face forward's ``output_hidden_states`` for the residual stream, the residual
identity ``resid_post = resid_pre + attn_out + mlp_out`` for pre-norm and sandwich
blocks, and the two LayerNorm equations for BERT's post-norm blocks.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from transformers.pipelines.base import PipelineException

from lm_probe import ProbeConfig, ProbeRunner, load_model
from lm_probe.core.architectures import KINDS, Architecture, describe, sites
from lm_probe.core.model import ensure_pad_token
from lm_probe.core.sites import resolve_sites
from lm_probe.core.trace import model_inputs, read_pooled
from lm_probe.testing import WORDS, tiny_model, tiny_tokenizer

LAYERS, HIDDEN, VOCAB = 3, 32, len(WORDS) + 3
CAUSAL = ("gpt2", "neox", "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3")
ENCODERS = ("bert", "bert_mlm", "roberta")
# Two examples of different lengths (ids of tiny_tokenizer's words).
EXAMPLES = ([5, 9, 14, 3, 22, 30, 8], [7, 12, 40, 4])


def _hf(family: str) -> torch.nn.Module:
    """A tiny random Hugging Face model of ``family`` (3 blocks, hidden size 32)."""
    import transformers as tf

    if family in ("gpt2", "llama"):
        return tiny_model(family, layers=LAYERS, hidden=HIDDEN, seed=0)
    torch.manual_seed(0)
    common = dict(num_hidden_layers=LAYERS, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                  num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=128)
    decoder = dict(common, num_key_value_heads=2, bos_token_id=2, eos_token_id=2, pad_token_id=0)
    build = {
        "neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common, bos_token_id=2, eos_token_id=2)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**decoder)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**decoder)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**decoder, head_dim=8)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**decoder, head_dim=8)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**decoder, head_dim=8)),
        "bert": lambda: tf.BertModel(tf.BertConfig(**common, pad_token_id=0)),
        "bert_mlm": lambda: tf.BertForMaskedLM(tf.BertConfig(**common, pad_token_id=0)),
        # padding_idx 0 = tiny_tokenizer's <pad>; RoBERTa numbers positions from padding_idx + 1
        "roberta": lambda: tf.RobertaModel(tf.RobertaConfig(**common, pad_token_id=0)),
    }
    return build[family]().eval()


def _wrap_encoder(hf: torch.nn.Module):
    """Wrap an encoder the way load_model should (see test_load_model_wraps_encoders)."""
    from nnsight import TransformersModel

    tokenizer = tiny_tokenizer()
    ensure_pad_token(tokenizer)
    with warnings.catch_warnings():  # nnsight: "submodule named 'output' ... is '.E_output'"
        warnings.simplefilter("ignore")
        model = TransformersModel(hf, tokenizer=tokenizer, task="feature-extraction")
    model._module.eval()
    return model


@functools.lru_cache(maxsize=None)
def _model(family: str):
    """``(hf, nnsight model)``, built once per test session."""
    hf = _hf(family)
    wrapped = _wrap_encoder(hf) if family in ENCODERS else load_model(hf, tokenizer=tiny_tokenizer())
    return hf, wrapped


def _batch(padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, EXAMPLES))
    ids = torch.zeros(len(EXAMPLES), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, example in enumerate(EXAMPLES):
        cols = slice(0, len(example)) if padding_side == "right" else slice(width - len(example), width)
        ids[row, cols], mask[row, cols] = torch.tensor(example), 1
    return ids, mask


def _hidden_states(family: str, example: list[int]) -> tuple[torch.Tensor, ...]:
    """HF hidden states of one unpadded example, run on the runner's own inputs (so the
    positions are the runner's: test_roberta_features_match_its_own_forward checks those)."""
    hf, model = _model(family)
    ids = torch.tensor([example])
    with torch.no_grad():
        out = hf(**model_inputs(model, ids, torch.ones_like(ids)), output_hidden_states=True)
    return tuple(h[0] for h in out.hidden_states)


def _tokens(family: str, specs: list[str], padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Token rows (``pool="none"``) of each site, read in one trace."""
    hf, model = _model(family)
    ids, mask = _batch(padding_side)
    acts = read_pooled(model, resolve_sites(hf, specs), [(s, "none") for s in specs], ids, mask)
    return {spec: acts[(spec, "none")] for spec in specs}


# ----------------------------------------------------------------- structure
EXPECTED = {
    "gpt2": ("transformer.h", "attn", "mlp", "attn", "mlp", "transformer.wte"),
    "neox": ("gpt_neox.layers", "attention", "mlp", "attention", "mlp", "gpt_neox.embed_in"),
    "llama": ("model.layers", "self_attn", "mlp", "self_attn", "mlp", "model.embed_tokens"),
    "mistral": ("model.layers", "self_attn", "mlp", "self_attn", "mlp", "model.embed_tokens"),
    "qwen2": ("model.layers", "self_attn", "mlp", "self_attn", "mlp", "model.embed_tokens"),
    "gemma": ("model.layers", "self_attn", "mlp", "self_attn", "mlp", "model.embed_tokens"),
    "gemma2": ("model.layers", "self_attn", "mlp", "post_attention_layernorm", "post_feedforward_layernorm",
               "model.embed_tokens"),
    "gemma3": ("model.layers", "self_attn", "mlp", "post_attention_layernorm", "post_feedforward_layernorm",
               "model.embed_tokens"),
    "bert": ("encoder.layer", "attention", "output", "attention.output.dense", "output.dense",
             "embeddings.word_embeddings"),
    "bert_mlm": ("bert.encoder.layer", "attention", "output", "attention.output.dense", "output.dense",
                 "bert.embeddings.word_embeddings"),
    "roberta": ("encoder.layer", "attention", "output", "attention.output.dense", "output.dense",
                "embeddings.word_embeddings"),
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_describe_finds_each_family(family):
    hf, model = _model(family)
    arch = describe(model)
    assert arch == Architecture(type(hf).__name__, EXPECTED[family][0], LAYERS, *EXPECTED[family][1:])
    assert describe(hf) == arch  # a plain torch module gives the same answer


def test_sites_strings_and_layer_selection():
    hf, _ = _model("gpt2")
    assert sites(hf, "resid_post") == [f"transformer.h.{i}.output" for i in range(3)]
    assert sites(hf, "resid_pre", 1) == ["transformer.h.1.input"]
    assert sites(hf, "attn_out", [-1, 0, 2]) == ["transformer.h.2.attn.output", "transformer.h.0.attn.output"]
    assert sites(hf, "mlp_out", range(1, 3)) == ["transformer.h.1.mlp.output", "transformer.h.2.mlp.output"]
    assert sites(hf, "mlp_out", slice(-2, None)) == sites(hf, "mlp_out", [1, 2])
    assert sites(hf, "resid_post", np.int64(-3)) == ["transformer.h.0.output"]
    assert sites(hf, "embed", layers=[99]) == ["transformer.wte.output"]  # layers ignored for embed
    arch = describe(hf)
    assert arch.site("mlp_out", -1) == "transformer.h.2.mlp.output" and arch.site("embed") == "transformer.wte.output"
    with pytest.raises(ValueError, match=r"'resid_post' needs a layer"):
        arch.site("resid_post")
    with pytest.raises(ValueError, match=r"site\(\) takes one layer, got layer=\[0, 1\]"):
        arch.site("resid_post", [0, 1])


@pytest.mark.parametrize("layers, match", [
    (3, r"layers=3: index 3 is out of range; GPT2LMHeadModel has 3 layers \(0..2, or -3..-1"),
    ([0, -4], r"index -4 is out of range; GPT2LMHeadModel has 3 layers"),
    (range(2, 5), r"index 3 is out of range"),
    (slice(5, None), r"selects no layer of GPT2LMHeadModel's 3 layers"),
    ([], r"selects no layer"),
    ("last", r"layers='last': use 'all', an int"),
    (1.0, r"layers=1.0: use 'all'"),
    (True, r"layers=True: use 'all'"),
])
def test_bad_layers_quote_the_input(layers, match):
    with pytest.raises(ValueError, match=match):
        sites(_model("gpt2")[0], "resid_post", layers)


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(ValueError, match=r"unknown site kind 'resid'; choose one of \['embed', 'resid_pre'"):
        sites(_model("gpt2")[0], "resid")


def test_missing_structure_names_the_model_class():
    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())

    with pytest.raises(ValueError, match=r"cannot find the transformer blocks of NoBlocks"):
        describe(NoBlocks())

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer, self.norm = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.layers = torch.nn.Embedding(10, 4), torch.nn.ModuleList([Block(), Block()])

    with pytest.raises(ValueError, match=r"attention of Odd's blocks: 'layers.0' has children \['mixer', 'norm'\]"):
        describe(Odd())
    with pytest.raises(TypeError, match=r"nnsight model or a torch.nn.Module, got str"):
        describe("gpt2")


def test_outermost_largest_stack_is_the_blocks():
    """An MoE-style list of experts inside each block is not taken for the block stack."""

    class Expert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = torch.nn.Linear(4, 4)
            self.mlp = torch.nn.Module()
            self.mlp.experts = torch.nn.ModuleList([Expert() for _ in range(8)])

    class Moe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = torch.nn.Embedding(50, 4)
            self.pos = torch.nn.Embedding(16, 4)
            self.blocks = torch.nn.ModuleList([Block(), Block()])

    assert describe(Moe()) == Architecture("Moe", "blocks", 2, "self_attn", "mlp", "self_attn", "mlp", "tok")


# ------------------------------------------------------- end to end, all families
@pytest.mark.parametrize("family", CAUSAL + ENCODERS)
def test_runner_features_match_hidden_states(family):
    """Every kind resolves; the runner's features have the hidden size; the residual
    stream matches HF's hidden_states (the last entry only where it is the raw block
    output: encoders have no final norm)."""
    hf, model = _model(family)
    kinds = KINDS if family not in ENCODERS else ("embed", "resid_pre", "resid_post")  # see test_post_norm_updates
    specs = [s for kind in KINDS for s in sites(model, kind)]
    resolved = resolve_sites(hf, specs)
    assert [resolved[s].name for s in specs] == specs  # canonical strings
    assert {resolved[s].layer for s in sites(model, "mlp_out")} == {0, 1, 2}

    wanted = [s for kind in kinds for s in sites(model, kind)]
    runner = ProbeRunner(model, [ProbeConfig(s) for s in wanted], progress=False)
    features = runner.get_probe_features(*_batch(model.tokenizer.padding_side))
    assert {s: f.shape for s, f in features.items()} == {s: (2, HIDDEN) for s in wanted}

    last = LAYERS if family in ENCODERS else LAYERS - 1
    for row, example in enumerate(EXAMPLES):
        hs = _hidden_states(family, example)
        for i in range(LAYERS):
            np.testing.assert_allclose(features[sites(hf, "resid_pre", i)[0]][row], hs[i].mean(0), atol=1e-4)
        for i in range(last):
            np.testing.assert_allclose(features[sites(hf, "resid_post", i)[0]][row], hs[i + 1].mean(0), atol=1e-4)
        with torch.no_grad():
            embedded = hf.get_input_embeddings()(torch.tensor(example))
        np.testing.assert_allclose(features[sites(hf, "embed")[0]][row], embedded.mean(0), atol=1e-5)


@pytest.mark.parametrize("family", CAUSAL)
def test_residual_identity(family):
    """resid_post = resid_pre + attn_out + mlp_out on every real token (GPT-NeoX's parallel
    residual and Gemma 2's normalized updates included); resid_pre[i + 1] = resid_post[i]."""
    _, model = _model(family)
    kinds = ("resid_pre", "attn_out", "mlp_out", "resid_post")
    rows = _tokens(family, [s for k in kinds for s in sites(model, k)], model.tokenizer.padding_side)
    for i in range(LAYERS):
        pre, attn, mlp, post = (rows[sites(model, k, i)[0]] for k in kinds)
        assert pre.shape == (sum(map(len, EXAMPLES)), HIDDEN)
        torch.testing.assert_close(pre + attn + mlp, post, atol=1e-4, rtol=1e-4)
        if i + 1 < LAYERS:
            torch.testing.assert_close(rows[sites(model, "resid_pre", i + 1)[0]], post)


def test_gemma2_raw_attention_output_is_not_the_update():
    """Why Gemma 2's attn_out/mlp_out are its post-norms: the raw outputs do not add up."""
    _, model = _model("gemma2")
    specs = ["model.layers.0.input", "model.layers.0.self_attn.output", "model.layers.0.mlp.output",
             "model.layers.0.output"]
    pre, attn, mlp, post = _tokens("gemma2", specs).values()
    assert (pre + attn + mlp - post).abs().max() > 1e-2


# ---------------------------------------------------------------- BERT-style
def test_bert_cls_is_last_hidden_state_first_token():
    """pool='first' at the last block's output is BertModel's CLS vector, padded or not."""
    hf, model = _model("bert")
    runner = ProbeRunner(model, [ProbeConfig(sites(model, "resid_post", -1)[0], pool="first")], progress=False)
    for ids, mask in [(torch.tensor([EXAMPLES[0]]), torch.ones(1, len(EXAMPLES[0]), dtype=torch.long)),
                      _batch("right")]:
        with torch.no_grad():
            cls = hf(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        (features,) = runner.get_probe_features(ids, mask).values()
        np.testing.assert_allclose(features, cls.numpy(), atol=1e-4)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_bert_positions_follow_the_mask(padding_side):
    """The runner's position ids (cumsum(mask) - 1) give each padded BERT example the
    absolute positions and (default, zero) token types it has alone, on either side."""
    hf, model = _model("bert")
    spec = sites(model, "resid_post", -1)[0]
    rows = _tokens("bert", [spec], padding_side)[spec]
    with torch.no_grad():
        alone = [hf(input_ids=torch.tensor([e])).last_hidden_state[0] for e in EXAMPLES]
    torch.testing.assert_close(rows, torch.cat(alone), atol=1e-4, rtol=1e-4)


def test_nnsight_mounts_bert_output_module_as_E_output():
    """nnsight serves ``.output`` on every envoy, so BERT's child module named ``output``
    is mounted as ``E_output`` (with a warning); ``.output`` stays the layer's value."""
    import transformers as tf
    from nnsight import TransformersModel

    hf = tf.BertModel(tf.BertConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8,
                                    num_attention_heads=2, vocab_size=VOCAB)).eval()
    with pytest.warns(UserWarning, match=r"submodule named 'output'.*'\.E_output' here"):
        model = TransformersModel(hf, tokenizer=tiny_tokenizer(pad=True), task="feature-extraction")
    layer = model.encoder.layer[0]
    assert layer.E_output._module is hf.encoder.layer[0].output
    assert layer.attention.E_output._module is hf.encoder.layer[0].attention.output
    with pytest.raises(ValueError, match="outside of interleaving"):
        layer.output  # noqa: B018  (the layer's live output, not the submodule)


@pytest.mark.parametrize("family", ENCODERS)
def test_post_norm_updates(family):
    """BERT-style blocks: mid = LN_a(resid_pre + attn_out), resid_post = LN_m(mid + mlp_out),
    with mid the attention module's output and the LayerNorms taken from the HF modules."""
    hf, model = _model(family)
    arch = describe(model)
    specs = [s for k in ("resid_pre", "attn_out", "mlp_out", "resid_post") for s in sites(model, k)]
    specs += [f"{arch.blocks}.{i}.{arch.attn}.output" for i in range(LAYERS)]
    rows = _tokens(family, specs)
    blocks = hf.get_submodule(arch.blocks)
    for i in range(LAYERS):
        pre, attn, mlp, post, mid = (rows[s] for s in specs[i::LAYERS])
        with torch.no_grad():
            torch.testing.assert_close(blocks[i].attention.output.LayerNorm(pre + attn), mid, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(blocks[i].output.LayerNorm(mid + mlp), post, atol=1e-4, rtol=1e-4)


def test_bert_output_module_site_reads_bert_output():
    """'...layer.0.output.output' is the BertOutput module's output: the layer's output."""
    hf, model = _model("bert")
    rows = _tokens("bert", ["encoder.layer.0.output.output", "encoder.layer.0.output"])
    torch.testing.assert_close(*rows.values())


def test_roberta_features_match_its_own_forward():
    hf, model = _model("roberta")
    spec = sites(model, "resid_post", -1)[0]
    rows = _tokens("roberta", [spec])[spec]
    with torch.no_grad():
        alone = [hf(input_ids=torch.tensor([e])).last_hidden_state[0] for e in EXAMPLES]
    torch.testing.assert_close(rows, torch.cat(alone), atol=1e-4, rtol=1e-4)


def test_load_model_wraps_an_encoder():
    model = load_model(_hf("bert"), tokenizer=tiny_tokenizer())
    assert sites(model, "resid_post", -1) == ["encoder.layer.2.output"]


def test_load_model_wraps_a_masked_lm_without_mask_token():
    model = load_model(_hf("bert_mlm"), tokenizer=tiny_tokenizer())
    assert sites(model, "resid_post", -1) == ["bert.encoder.layer.2.output"]


def test_load_model_accepts_a_transformers_model():
    _, model = _model("bert")
    assert load_model(model) is model
