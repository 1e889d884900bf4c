"""RouterStats on tiny random Mixtral and Qwen2-MoE models, against the routing recomputed in
float64 from each router's weights and its input, every example run alone without padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lm_probe
from lm_probe import ProbeDataset, ProbeRunner, RouterStats
from lm_probe.core.architectures import sites
from lm_probe.core.consumer import RunContext
from lm_probe.testing import tiny_model, tiny_tokenizer

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def build(family: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=64, num_experts_per_tok=2, initializer_range=0.3, pad_token_id=0)
    if family == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM
        return MixtralForCausalLM(MixtralConfig(intermediate_size=24, num_local_experts=4, **common)).eval()
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=24, moe_intermediate_size=8, num_experts=4,
                                                  **common)).eval()
    if family == "olmoe":
        from transformers import OlmoeConfig, OlmoeForCausalLM
        return OlmoeForCausalLM(OlmoeConfig(intermediate_size=8, num_experts=4, eos_token_id=1, **common)).eval()
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=8,
                                              shared_expert_intermediate_size=12, num_experts=4,
                                              decoder_sparse_step=1, **{"mlp_only_layers": [], **extra},
                                              **common)).eval()


@pytest.fixture(scope="module", params=FAMILIES)
def moe(request):
    return request.param, lm_probe.load_model(build(request.param), tokenizer=tiny_tokenizer(pad=True))


def examples(n: int = 11, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 64, rng.integers(2, 9)) for _ in range(n)]


def reference(hf: torch.nn.Module, ids: list[np.ndarray], k: int = 2) -> list[dict]:
    """Per router, in block order: loads, entropy (bits), CV, mean top-1 probability, by hand."""
    gates = [m for name, m in hf.named_modules() if name.endswith("mlp.gate")]
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(gates))}
    hooks = [g.register_forward_pre_hook(lambda _m, a, i=i: inputs[i].append(a[0].detach().reshape(-1, 16)))
             for i, g in enumerate(gates)]
    with torch.no_grad():
        for x in ids:  # each example alone: no padding anywhere
            hf(input_ids=torch.as_tensor(x)[None])
    for h in hooks:
        h.remove()
    out = []
    for i, gate in enumerate(gates):
        logits = torch.cat(inputs[i]).double().numpy() @ gate.weight.detach().double().numpy().T
        load, top1, p1 = np.zeros(logits.shape[1]), np.zeros(logits.shape[1]), []
        for row in logits:
            p = np.exp(row - row.max())
            p /= p.sum()
            order = sorted(range(len(p)), key=lambda e: -p[e])
            for e in order[:k]:
                load[e] += 1
            top1[order[0]] += 1
            p1.append(p[order[0]])
        load /= load.sum()
        out.append({"n": len(logits), "load": load, "top1": top1 / len(logits), "p1": np.mean(p1),
                    "entropy": -sum(q * np.log2(q) for q in load if q > 0),
                    "cv": np.sqrt(np.mean((load - load.mean()) ** 2)) / load.mean()})
    return out


def collect(model, ids, side="right", batch_size=4, **kwargs) -> RouterStats:
    stats = RouterStats(**kwargs)
    data = ProbeDataset(ids, np.zeros(len(ids), np.int64), pad_token_id=0, padding_side=side)
    ProbeRunner(model, progress=False).collect(data, [stats], batch_size=batch_size)
    return stats


def test_router_sites(moe):
    family, model = moe
    assert sites(model, "router") == ["model.layers.0.mlp.gate.output", "model.layers.1.mlp.gate.output"]
    assert sites(model, "router", layers=-1) == ["model.layers.1.mlp.gate.output"]


def test_dense_layers_of_a_moe_model_are_skipped():
    model = build("qwen2_moe", mlp_only_layers=[0])
    assert sites(model, "router") == ["model.layers.1.mlp.gate.output"]
    with pytest.raises(ValueError, match=r"no router; Qwen2MoeForCausalLM routes in blocks \[1\]"):
        sites(model, "router", layers=[0])


def test_model_without_routers_gives_a_clear_error():
    model = lm_probe.load_model(tiny_model(), tokenizer=tiny_tokenizer(pad=True))
    with pytest.raises(ValueError, match="no mixture-of-experts router"):
        sites(model, "router")
    with pytest.raises(ValueError, match="no mixture-of-experts router"):
        RouterStats().start(RunContext(model=model))


@pytest.mark.parametrize("side", ["right", "left"])
def test_stats_equal_the_routing_recomputed_from_the_weights(moe, side):
    family, model = moe
    ids = examples()
    table = collect(model, ids, side).compute()
    ref = reference(model._module, ids)
    assert list(table["layer"]) == [0, 1] and list(table["top_k"]) == [2, 2]
    for row, r in zip(table.itertuples(), ref):
        assert row.n_tokens == r["n"] == sum(len(x) for x in ids)
        np.testing.assert_allclose(row.load, r["load"], atol=1e-12)
        np.testing.assert_allclose(row.top1_load, r["top1"], atol=1e-12)
        assert row.entropy_bits == pytest.approx(r["entropy"], abs=1e-12)
        assert row.cv == pytest.approx(r["cv"], abs=1e-12)
        assert row.mean_top1_prob == pytest.approx(r["p1"], abs=1e-6)
        assert row.max_entropy_bits == pytest.approx(2.0)
        assert not np.allclose(row.load, 0.25)  # random routing is not balanced: the check has teeth


def test_padding_is_excluded(moe):
    family, model = moe
    ids = examples(6, seed=3)
    alone = collect(model, ids, batch_size=1).compute()  # no padding at all
    for side in ("right", "left"):
        padded = collect(model, ids, side, batch_size=6).compute()
        for a, b in zip(alone.itertuples(), padded.itertuples()):
            assert a.n_tokens == b.n_tokens
            np.testing.assert_array_equal(a.load, b.load)
            assert a.mean_top1_prob == pytest.approx(b.mean_top1_prob, abs=1e-6)


def test_one_site_and_bad_sites(moe):
    family, model = moe
    table = collect(model, examples(4), sites=["model.layers[-1].mlp.gate.output"]).compute()
    assert list(table["layer"]) == [1]
    with pytest.raises(ValueError, match="not one"):
        RouterStats(["model.layers.0.output"]).start(RunContext(model=model))
    with pytest.raises(ValueError, match="top_k"):
        RouterStats(top_k=0)
    with pytest.raises(ValueError, match="top_k=5 exceeds the 4 experts"):
        RouterStats(top_k=5).start(RunContext(model=model))
    with pytest.raises(ValueError, match="needs both sites= and top_k="):
        RouterStats(top_k=2).start(RunContext())


def test_remote_execution_gives_the_same_stats():
    model = lm_probe.load_model(build("mixtral"), tokenizer=tiny_tokenizer(pad=True))
    ids = examples(6)
    data = ProbeDataset(ids, np.zeros(len(ids), np.int64), pad_token_id=0)
    local, remote = RouterStats(), RouterStats()
    ProbeRunner(model, progress=False).collect(data, [local], batch_size=3)
    ProbeRunner(model, progress=False, remote="local").collect(data, [remote], batch_size=3)
    np.testing.assert_array_equal(np.stack(local.compute()["load"]), np.stack(remote.compute()["load"]))
