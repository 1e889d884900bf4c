import pytest

from lm_probe import SiteError
from lm_probe.core.sites import parse_site, resolve_sites


@pytest.mark.parametrize(
    "spec, parts, attr",
    [
        ("model.layers.3.output", ("model", "layers", 3), "output"),
        ("model.layers[-1].mlp.output", ("model", "layers", -1, "mlp"), "output"),
        ("transformer.h.5.mlp.input", ("transformer", "h", 5, "mlp"), "input"),
        ("model.layers.-2.output", ("model", "layers", -2), "output"),
        (" lm_head.output ", ("lm_head",), "output"),
    ],
)
def test_parse(spec, parts, attr):
    assert parse_site(spec) == (parts, attr)


@pytest.mark.parametrize("spec", ["model.layers.3", "model.layers.3.out", "", "model..layers.output", "model.la-yers.output"])
def test_parse_rejects(spec):
    with pytest.raises(SiteError) as err:
        parse_site(spec)
    assert repr(spec.strip() if spec.strip() else spec) in str(err.value) or "non-empty" in str(err.value)


def test_missing_attr_suggests_output():
    with pytest.raises(SiteError, match=r"'model.layers.3.output'"):
        parse_site("model.layers.3")


def test_resolve_negative_index_and_layer(llama):
    sites = resolve_sites(llama._module, ["model.layers[-1].output", "model.layers.3.mlp.output", "lm_head.output"])
    assert sites["model.layers[-1].output"].name == "model.layers.3.output"
    assert sites["model.layers[-1].output"].layer == 3
    assert sites["model.layers.3.mlp.output"].layer == 3
    assert sites["lm_head.output"].layer is None


def test_unknown_site_quotes_input_and_suggests(gpt2):
    with pytest.raises(SiteError) as err:
        resolve_sites(gpt2._module, ["transformer.h.2.mpl.output"])
    message = str(err.value)
    assert "'transformer.h.2.mpl.output'" in message
    assert "'transformer.h.2.mlp.output'" in message


def test_llama_path_on_gpt2_names_close_paths(gpt2):
    with pytest.raises(SiteError, match=r"GPT2LMHeadModel\) has no module .model.layers.1.*.transformer.h.1.output."):
        resolve_sites(gpt2._module, ["model.layers.1.output"])


def test_index_out_of_range(gpt2):
    with pytest.raises(SiteError, match=r"index 4 is out of range .* 4 entries"):
        resolve_sites(gpt2._module, ["transformer.h.4.output"])


def test_execution_order_ranks(llama):
    specs = ["model.layers.1.input", "model.layers.1.mlp.output", "model.layers.1.output",
             "model.layers.2.input", "model.layers.0.self_attn.output", "model.norm.output", "lm_head.output"]
    sites = resolve_sites(llama._module, specs)
    ordered = sorted(specs, key=lambda s: sites[s].rank)
    assert ordered == ["model.layers.0.self_attn.output", "model.layers.1.input", "model.layers.1.mlp.output",
                       "model.layers.1.output", "model.layers.2.input", "model.norm.output", "lm_head.output"]
