"""What ``masked`` names on each architecture, the refusals, and exact restoration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from torch.nn.utils import parametrize

from lm_probe import SiteError, load_model
from lm_probe.circuits import ablate, resolve_masked
from lm_probe.circuits.masks import HardConcrete
from lm_probe.circuits.targets import check_upstream, parametrized
from lm_probe.core.sites import resolve_sites
from lm_probe.testing import tiny_model, tiny_tokenizer


def tiny_neox() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           vocab_size=len(tiny_tokenizer()), max_position_embeddings=128)
    return tf.GPTNeoXForCausalLM(cfg).eval()


def model_of(family: str) -> torch.nn.Module:
    return tiny_neox() if family == "neox" else tiny_model(family, layers=2)


# the weight matrices of block 1's MLP, written out by hand for each family
MLP_1 = {
    "gpt2": ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"],
    "llama": ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"],
    "bert": ["bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.output.dense"],
    "neox": ["gpt_neox.layers.1.mlp.dense_h_to_4h", "gpt_neox.layers.1.mlp.dense_4h_to_h"],
}


@pytest.mark.parametrize("family", sorted(MLP_1))
def test_a_role_and_layers_name_the_mlp_weight_matrices(family):
    model = model_of(family)
    assert resolve_masked(model, [("mlp", [-1])]) == MLP_1[family]
    assert set(resolve_masked(model, [("mlp", 1), ("mlp", [1])])) == set(MLP_1[family])  # no repeats


def test_paths_expand_to_their_weight_matrices_in_model_order():
    model = tiny_model("gpt2", layers=2)
    got = resolve_masked(model, ["transformer.h[1].mlp", "transformer.h.0.attn"])
    assert got == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", *MLP_1["gpt2"]]
    assert resolve_masked(model, "transformer.h.0.mlp.c_fc") == ["transformer.h.0.mlp.c_fc"]
    assert resolve_masked(model, None) == resolve_masked(model, []) == []
    assert resolve_masked(load_model(model, tokenizer=tiny_tokenizer()), [("attn", 0)])[0] == "transformer.h.0.attn.c_attn"


@pytest.mark.parametrize("path", ["transformer.h.0.mlp.act", "transformer.h.0.ln_1", "transformer.h.0.mlp.dropout"])
def test_a_module_without_a_weight_matrix_is_refused(path):
    with pytest.raises(ValueError, match=f"masked module '{path}' .* holds no weight matrix"):
        resolve_masked(tiny_model("gpt2", layers=2), [path])


def test_unknown_paths_and_roles_are_refused_with_the_fix():
    model = tiny_model("gpt2", layers=2)
    with pytest.raises(SiteError, match="Closest valid sites: 'transformer.h.0.mlp.output'"):
        resolve_masked(model, ["transformer.h.0.mpl"])
    with pytest.raises(ValueError, match="role 'ffn' is unknown"):
        resolve_masked(model, [("ffn", 0)])
    with pytest.raises(ValueError, match="out of range"):
        resolve_masked(model, [("mlp", 5)])


@pytest.mark.parametrize("site, masked", [("transformer.h.0.output", ["transformer.h.1.mlp"]),
                                          ("transformer.h.1.mlp.input", ["transformer.h.1.mlp"]),
                                          ("transformer.h.1.mlp.c_fc.output", ["transformer.h.1.mlp.c_proj"])])
def test_a_site_before_every_masked_module_is_refused(site, masked):
    model = tiny_model("gpt2", layers=2)
    with pytest.raises(ValueError, match="nothing to learn"):
        check_upstream(model, resolve_sites(model, [site])[site], resolve_masked(model, masked))
    later = resolve_sites(model, ["transformer.h.1.output"])["transformer.h.1.output"]
    check_upstream(model, later, resolve_masked(model, masked))  # downstream: fine


def snapshot(model):
    return [(k, v.clone()) for k, v in model.state_dict().items()]


def identical(model, before) -> bool:
    after = list(model.state_dict().items())
    return [k for k, _ in after] == [k for k, _ in before] and all(torch.equal(a, b) for (_, a), (_, b) in
                                                                   zip(after, before))


def test_parametrizations_come_off_exactly_even_after_an_error():
    model = tiny_model("llama", layers=2)
    before, targets = snapshot(model), MLP_1["llama"]
    weight = model.get_submodule(targets[0]).weight
    with pytest.raises(RuntimeError, match="boom"):
        with parametrized(model, {t: HardConcrete(model.get_submodule(t).weight.shape) for t in targets}):
            assert parametrize.is_parametrized(model.get_submodule(targets[0]), "weight")
            raise RuntimeError("boom")
    assert identical(model, before)
    assert model.get_submodule(targets[0]).weight is weight  # the same parameter object, not a copy
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert type(model.get_submodule(targets[0])) is torch.nn.Linear


@pytest.mark.parametrize("complement", [False, True])
def test_ablate_zeroes_the_subnetwork_or_the_rest(complement):
    model = tiny_model("gpt2", layers=2)
    before = snapshot(model)
    rng = np.random.default_rng(0)
    mask = {p: rng.random(model.get_submodule(p).weight.shape) < 0.3 for p in MLP_1["gpt2"]}
    original = {p: model.get_submodule(p).weight.detach().numpy().copy() for p in mask}
    with ablate(model, mask, complement=complement) as same:
        assert same is model
        for p, keep in mask.items():
            zeroed = keep if not complement else ~keep
            np.testing.assert_array_equal(model.get_submodule(p).weight.detach().numpy(),
                                          np.where(zeroed, 0.0, original[p]))
    assert identical(model, before)


def test_ablate_refuses_a_mask_of_another_shape():
    model = tiny_model("gpt2", layers=2)
    with pytest.raises(ValueError, match="mask for 'transformer.h.0.mlp.c_fc' has shape"):
        with ablate(model, {"transformer.h.0.mlp.c_fc": np.ones((3, 3), bool)}):
            pass


def test_nested_masks_compose_and_come_off_exactly():
    model = tiny_model("gpt2", layers=2)
    before, path = snapshot(model), MLP_1["gpt2"][0]
    rng = np.random.default_rng(0)
    shape = model.get_submodule(path).weight.shape
    a, b = rng.random(shape) < 0.5, rng.random(shape) < 0.5
    original = model.get_submodule(path).weight.detach().numpy().copy()
    with ablate(model, {path: a}):
        with ablate(model, {path: b}, complement=True):  # zero a, then everything but b
            np.testing.assert_array_equal(model.get_submodule(path).weight.detach().numpy(),
                                          np.where(a | ~b, 0.0, original))
        np.testing.assert_array_equal(model.get_submodule(path).weight.detach().numpy(), np.where(a, 0.0, original))
    assert identical(model, before)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


class Double(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def test_a_users_parametrization_survives_a_mask():
    model = tiny_model("gpt2", layers=2)
    path = MLP_1["gpt2"][0]
    owner = model.get_submodule(path)
    original = owner.weight.detach().numpy().copy()
    parametrize.register_parametrization(owner, "weight", Double())
    keep = np.random.default_rng(0).random(original.shape) < 0.5
    with ablate(model, {path: keep}):
        np.testing.assert_array_equal(owner.weight.detach().numpy(), np.where(keep, 0.0, 2 * original))
    assert len(owner.parametrizations.weight) == 1 and isinstance(owner.parametrizations.weight[0], Double)
    np.testing.assert_array_equal(owner.weight.detach().numpy(), 2 * original)


def test_masked_modules_after_the_site_are_refused_by_name():
    model = tiny_model("gpt2", layers=2)
    site = resolve_sites(model, ["transformer.h.0.output"])["transformer.h.0.output"]
    with pytest.raises(ValueError, match=r"\['transformer.h.1.mlp.c_fc', 'transformer.h.1.mlp.c_proj'\] run after "
                                         r"site 'transformer.h.0.output'"):
        check_upstream(model, site, resolve_masked(model, [("mlp", [0, 1])]))
    check_upstream(model, site, resolve_masked(model, [("mlp", [0])]))  # upstream only: fine


def test_masking_both_aliases_of_a_tied_weight_is_refused():
    model = tiny_model("gpt2", layers=1)
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(ValueError, match="'transformer.wte' and 'lm_head' share one weight"):
        resolve_masked(model, ["transformer.wte", "lm_head"])
    assert resolve_masked(model, ["transformer.wte"]) == ["transformer.wte"]
