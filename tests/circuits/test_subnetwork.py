"""SubnetworkProbe on a tiny GPT-2 with a planted feature: one MLP neuron carries the label
(see ``planted.py``), so the right subnetwork is known in advance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch.nn.utils import parametrize

from lm_probe import ProbeDataset
from lm_probe.circuits import NotFittedError, SubnetworkProbe, ablate
from lm_probe.testing import tiny_model, tiny_tokenizer, toy_texts

from planted import MLP, NEURON, SITE, planted_data, planted_model, planted_tokens
from test_targets import MLP_1, identical, model_of, snapshot

FC, PROJ = f"{MLP}.c_fc", f"{MLP}.c_proj"


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    train, val = planted_data(240).tt_split(0.3, seed=0)
    return model, train, val


@pytest.fixture(scope="module", params=["hard_concrete", "continuous_sparsification"])
def fitted(planted, request):
    model, train, val = planted
    before = snapshot(model)
    probe = SubnetworkProbe(model, SITE, masked=[MLP], method=request.param, l0_lambda=1.0, epochs=10).fit(train, val)
    return probe, before


def mean_pooled_mlp_output(model, data: ProbeDataset) -> tuple[np.ndarray, np.ndarray]:
    """The reference rows: the MLP's output from a plain forward hook, mean-pooled in float64."""
    rows = []
    hook = model.get_submodule(MLP).register_forward_hook(lambda m, a, out: rows.append(out.detach().double()))
    batch = data[:]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hook.remove()
    mask = batch["attention_mask"].double().unsqueeze(-1)
    return ((rows[0] * mask).sum(1) / mask.sum(1)).numpy(), batch["labels"].numpy()


def test_it_keeps_the_planted_neuron_and_little_else(fitted):
    probe, _ = fitted
    fc, proj = probe.mask_[FC], probe.mask_[PROJ]
    assert fc.shape == (32, 128) and proj.shape == (128, 32) and fc.dtype == bool
    assert fc[0, NEURON], "the one input weight the neuron reads the label through"
    assert proj[NEURON].sum() >= 4, "the neuron's output row"
    others = np.delete(fc, NEURON, axis=1).sum() + np.delete(proj, NEURON, axis=0).sum()
    assert others <= 0.005 * (fc.size + proj.size)
    assert probe.kept_fraction_ < 0.02
    assert probe.kept_fraction_ == pytest.approx((fc.sum() + proj.sum()) / (fc.size + proj.size))
    assert probe.kept_ == pytest.approx({FC: fc.mean(), PROJ: proj.mean()})


def test_it_reaches_the_plain_probes_accuracy(fitted, planted):
    probe, _ = fitted
    model, train, val = planted
    x, y = mean_pooled_mlp_output(model, train)
    xv, yv = mean_pooled_mlp_output(model, val)
    plain = LogisticRegression(C=100, max_iter=5000).fit(x, y).score(xv, yv)
    assert plain >= 0.95
    assert probe.metrics_["accuracy"] >= plain - 0.02
    assert set(probe.metrics_) >= {"accuracy", "f1", "loss", "kept_fraction", "kept"}


def test_with_no_penalty_it_keeps_everything_and_the_plain_accuracy(planted):
    model, train, val = planted
    x, y = mean_pooled_mlp_output(model, train)
    xv, yv = mean_pooled_mlp_output(model, val)
    plain = LogisticRegression(C=100, max_iter=5000).fit(x, y).score(xv, yv)
    probe = SubnetworkProbe(model, SITE, masked=[MLP], l0_lambda=0.0, epochs=3).fit(train, val)
    assert probe.kept_fraction_ == 1.0
    assert probe.metrics_["accuracy"] >= plain - 0.02


def test_ablating_the_found_subnetwork_drops_the_probe_to_chance(fitted, planted):
    probe, _ = fitted
    model, _, val = planted
    chance = max(np.mean(val.labels), 1 - np.mean(val.labels))
    with ablate(model, probe.mask_):
        assert probe.score(val, use_mask=False)["accuracy"] <= chance + 0.05
    with ablate(model, probe.mask_, complement=True):  # the subnetwork alone: as the masked probe
        assert probe.score(val, use_mask=False)["accuracy"] >= 0.95


def test_the_model_is_bit_identical_after_fit(fitted, planted):
    _, before = fitted
    model = planted[0]
    assert identical(model, before)
    assert not model.training and not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters()), "requires_grad flags restored"


def test_the_model_is_bit_identical_after_an_error_inside_fit(planted, monkeypatch):
    model, train, val = planted
    before, calls = snapshot(model), []
    original = SubnetworkProbe._loss

    def failing(self, x, y):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in the third step")
        return original(self, x, y)

    monkeypatch.setattr(SubnetworkProbe, "_loss", failing)
    model.get_submodule(FC).weight.requires_grad_(False)  # a flag the user set stays as set
    try:
        with pytest.raises(RuntimeError, match="boom"):
            SubnetworkProbe(model, SITE, masked=[MLP], epochs=2).fit(train, val)
        assert identical(model, before)
        assert not any(parametrize.is_parametrized(m) for m in model.modules())
        assert [n for n, p in model.named_parameters() if not p.requires_grad] == [f"{FC}.weight"]
    finally:
        model.get_submodule(FC).weight.requires_grad_(True)


def test_with_nothing_masked_it_is_plain_probing():
    model = tiny_model("gpt2", layers=2, seed=1)
    texts, labels = toy_texts(400, seed=0)
    train, val = ProbeDataset.from_texts(texts, labels, tiny_tokenizer(pad=True)).tt_split(0.3, seed=0)
    probe = SubnetworkProbe(model, "transformer.h.1.output", masked=None, epochs=30, patience=5).fit(train, val)
    assert probe.mask_ == {} and probe.kept_fraction_ == 1.0
    with torch.no_grad():  # the reference: HF's own hidden states, mean-pooled, and scikit-learn
        rows = []
        for data in (train, val):
            batch = data[:]
            hidden = model(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                           output_hidden_states=True).hidden_states[2].double()
            mask = batch["attention_mask"].double().unsqueeze(-1)
            rows.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
    plain = LogisticRegression(max_iter=5000).fit(rows[0], train.labels).score(rows[1], val.labels)
    assert abs(probe.metrics_["accuracy"] - plain) <= 0.05
    assert plain > 0.7


def test_token_level_labels_find_the_same_neuron():
    model = planted_model()
    train, val = planted_tokens(160).tt_split(0.3, seed=0)
    # mask_init=1 starts near the keep threshold (logit 0), so ten epochs suffice here
    probe = SubnetworkProbe(model, SITE, masked=[MLP], epochs=10, mask_init=1.0).fit(train, val)
    assert probe.mask_[FC][0, NEURON] and probe.mask_[PROJ][NEURON].any() and probe.kept_fraction_ < 0.02
    assert probe.metrics_["accuracy"] >= 0.98
    assert sum(probe.metrics_["support"].values()) == sum((t != -100).sum() for t in val.token_labels)


@pytest.mark.parametrize("family", ["llama", "bert", "neox"])
def test_it_runs_on_each_architecture_and_restores_it(family):
    model = model_of(family)
    before = snapshot(model)
    texts, labels = toy_texts(60, seed=0)
    train, val = ProbeDataset.from_texts(texts, labels, tiny_tokenizer(pad=True)).tt_split(0.3, seed=0)
    site = {"llama": "model.layers.1.output", "bert": "bert.encoder.layer.1.output",
            "neox": "gpt_neox.layers.1.output"}[family]
    probe = SubnetworkProbe(model, site, masked=[("mlp", 1)], head="mlp", epochs=2).fit(train, val)
    assert list(probe.mask_) == MLP_1[family]
    assert all(probe.mask_[p].shape == model.get_submodule(p).weight.shape for p in probe.mask_)
    assert 0 <= probe.metrics_["accuracy"] <= 1 and len(probe.history_) == 2
    assert identical(model, before)


def test_save_and_load_round_trip_without_pickle(fitted, planted, tmp_path):
    probe, _ = fitted
    model, _, val = planted
    folder = probe.save(tmp_path / "probe")
    with np.load(folder / "arrays.npz", allow_pickle=False) as arrays:
        assert arrays[f"mask/{FC}"].dtype == bool
    assert json.loads((folder / "probe.json").read_text())["params"]["method"] == probe.method
    loaded = SubnetworkProbe.load(folder, model)
    assert all(np.array_equal(loaded.mask_[p], probe.mask_[p]) for p in probe.mask_)
    np.testing.assert_array_equal(loaded.predict_proba(val)[0], probe.predict_proba(val)[0])
    assert loaded.kept_ == probe.kept_ and loaded.best_epoch_ == probe.best_epoch_
    assert loaded.codelength_ == probe.codelength_ and loaded.score(val)["n_coded"] == probe.score(val)["n_coded"]


def test_bad_settings_and_unfitted_use_are_refused(planted):
    model, _, val = planted
    with pytest.raises(ValueError, match="method 'l1' is unknown"):
        SubnetworkProbe(model, SITE, masked=[MLP], method="l1")
    with pytest.raises(ValueError, match="head 'tree' is unknown"):
        SubnetworkProbe(model, SITE, masked=[MLP], head="tree")
    with pytest.raises(ValueError, match="nothing to learn"):
        SubnetworkProbe(model, "transformer.h.0.attn.output", masked=[MLP])
    with pytest.raises(NotFittedError, match="call fit"):
        SubnetworkProbe(model, SITE, masked=[MLP]).score(val)


def test_online_codelength_of_the_joint_training():
    """Issue 17's online code: the first epoch's batches, each coded before the probe steps on
    it, the first with the uniform code. One batch holding every row is coded uniformly
    (n log2 K bits exactly); on informative rows later batches cost less than uniform
    (compression above 1), and with the labels shuffled they do not; with warm_start the head
    has seen every label first, and a circuit probe reads by centroids of all rows: no code."""
    model = tiny_model("gpt2", layers=2, seed=1)
    texts, labels = toy_texts(400, seed=0)
    data = ProbeDataset.from_texts(texts, labels, tiny_tokenizer(pad=True))
    train, val = data.tt_split(0.3, seed=0)
    site = "transformer.h.1.output"
    one = SubnetworkProbe(model, site, masked=None, epochs=1, batch_size=len(train), warm_start=False).fit(train, val)
    assert one.codelength_.n_coded == len(train)
    assert one.metrics_["codelength_bits"] == pytest.approx(len(train) * np.log2(2))
    assert one.metrics_["compression"] == pytest.approx(1.0)
    fit = dict(masked=None, epochs=1, batch_size=8, lr=0.05, warm_start=False)
    learned = SubnetworkProbe(model, site, **fit).fit(train, val)
    assert learned.metrics_["n_coded"] == len(train) and learned.metrics_["compression"] > 1.3
    shuffled = ProbeDataset.from_texts([texts[i] for i in train.example_ids],
                                       np.random.default_rng(0).permutation(train.labels), tiny_tokenizer(pad=True))
    noise = SubnetworkProbe(model, site, **fit).fit(shuffled, val)
    assert noise.metrics_["compression"] < 1.05
    warm = SubnetworkProbe(model, site, masked=[f"transformer.h.0.mlp"], epochs=1, l0_lambda=0.1).fit(train, val)
    assert np.isnan(warm.metrics_["codelength_bits"]) and "warm_start" in warm.codelength_.reason
    from lm_probe.circuits import CircuitProbe
    circuit = CircuitProbe(model, site, masked=["transformer.h.0.mlp"], epochs=1).fit(train, val)
    assert np.isnan(circuit.metrics_["compression"]) and "centroids" in circuit.codelength_.reason


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padded_rows_equal_single_example_forwards(family):
    """Position ids follow the attention mask: a left-padded example reads as it would alone
    (the reference: Hugging Face's hidden states of each example without padding)."""
    model = tiny_model(family, layers=2, seed=1)
    tok = tiny_tokenizer(pad=True)
    tok.padding_side = "left"
    data = ProbeDataset.from_texts(*toy_texts(12, seed=0), tok)
    probe = SubnetworkProbe(model, model_of_block_0_output(family), pool="last", standardize=False)
    batch = next(data.batches(12))
    assert (batch.attention_mask[:, 0] == 0).any()  # some rows really are left-padded
    with torch.no_grad():
        rows = probe._rows(model, batch, "last")[0]
        reference = torch.stack([model(input_ids=ids[keep.bool()][None], output_hidden_states=True).hidden_states[1][0, -1]
                                 for ids, keep in zip(batch.input_ids, batch.attention_mask)])
    torch.testing.assert_close(rows, reference, atol=1e-4, rtol=1e-4)


def model_of_block_0_output(family: str) -> str:
    return {"gpt2": "transformer.h.0.output", "llama": "model.layers.0.output"}[family]


def test_fit_restores_every_submodules_mode(planted):
    model, train, val = planted
    model.eval()
    dropout = model.get_submodule(MLP).dropout
    dropout.train()
    try:
        SubnetworkProbe(model, SITE, masked=[MLP], epochs=1).fit(train, val)
        assert dropout.training and not model.training
        assert not any(m.training for m in model.modules() if m is not dropout)
    finally:
        model.eval()


def test_a_non_finite_objective_at_the_first_epoch_is_a_clear_error(planted):
    class NaNLoss(SubnetworkProbe):
        def _loss(self, x, y):
            return super()._loss(x, y) * float("nan")

    model, train, val = planted
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match="non-finite at epoch 0.*lower lr"):
        NaNLoss(model, SITE, masked=[MLP], epochs=2, warm_start=False).fit(train, val)
    assert identical(model, before)


def test_labels_the_training_set_lacks_are_refused(planted):
    model, train, val = planted
    texts, labels = toy_texts(40, seed=3)
    other = ProbeDataset.from_texts(texts, np.where(np.arange(40) % 4 == 0, 2, labels), tiny_tokenizer(pad=True))
    with pytest.raises(ValueError, match=r"val has labels \[2\] that the training set lacks"):
        SubnetworkProbe(model, SITE, masked=[MLP], epochs=1).fit(train, other)
    probe = SubnetworkProbe(model, SITE, masked=[MLP], epochs=1).fit(train, val)
    with pytest.raises(ValueError, match=r"data has labels \[2\]"):
        probe.score(other)


def test_load_refuses_masks_of_another_shape(fitted, planted, tmp_path):
    probe, _ = fitted
    model = planted[0]
    folder = probe.save(tmp_path / "probe")
    with np.load(folder / "arrays.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays[f"mask/{FC}"] = arrays[f"mask/{FC}"][:, :-1]  # as if found on a model with a narrower MLP
    np.savez(folder / "arrays.npz", **arrays)
    with pytest.raises(ValueError, match=f"mask for '{FC}' has shape .*another model"):
        SubnetworkProbe.load(folder, model)
