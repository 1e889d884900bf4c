"""ProbeCallback: gauges, geometry and probes measured while Lightning trains a tiny model on CPU."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

L = pytest.importorskip("lightning")
from torch.utils.data import DataLoader  # noqa: E402

from lm_probe import (DiffusionGauge, Geometry, ProbeConfig, ProbeDataset, ProbeRunner, SiteError, Trigger,  # noqa: E402
                      load_model)
from lm_probe.integrations.lightning import ProbeCallback  # noqa: E402
from lm_probe.testing import tiny_model, tiny_tokenizer, toy_texts  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SITE = "transformer.h.2.output"  # GPT-2's hidden_states[3] (the last entry has ln_f applied)


class TinyLM(L.LightningModule):
    """A tiny random GPT-2 trained as a language model; block 0 frozen in eval mode."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__()
        self.model = tiny_model("gpt2", seed=seed).train()
        self.model.transformer.h[0].eval()

    def training_step(self, batch, batch_idx):
        return self.model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def collate(rows):
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.nn.functional.pad(torch.as_tensor(r), (0, width - len(r))) for r in rows])
    mask = torch.stack([(torch.arange(width) < len(r)).long() for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def data():
    texts, labels = toy_texts(64, seed=5)
    return ProbeDataset.from_texts(texts, labels, tokenizer=tiny_tokenizer())


def loader(data, batch_size=8):
    return DataLoader(list(data.ids), batch_size=batch_size, collate_fn=collate)


def trainer(callbacks, **kwargs):
    settings = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                    enable_checkpointing=False, num_sanity_val_steps=0)
    return L.Trainer(callbacks=callbacks, **{**settings, **kwargs})


def gauge(n=24, **kwargs):
    return DiffusionGauge([SITE], n_samples=n, knn=5, n_eigs=4, **kwargs)


def markov_operator(X, knn):
    """The sparse k-NN Markov operator with adaptive bandwidths, by hand in float64."""
    n = len(X)
    d = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
    order = np.argsort(d, 1)[:, 1:knn + 1]  # the knn nearest others
    sigma = d[np.arange(n), order[:, -1]]
    near = np.zeros((n, n), bool)
    near[np.arange(n)[:, None], order] = True
    K = np.where(near | near.T | np.eye(n, dtype=bool), np.exp(-d ** 2 / np.outer(sigma, sigma)), 0.0)
    return K / K.sum(1, keepdims=True)


class Spy(L.Callback):
    """After the ProbeCallback: snapshots the weights at the steps asked for, records every
    forward of the model outside training (the callback's measurements) and each step's modes."""

    def __init__(self, at_steps):
        self.at_steps, self.weights, self.modes = at_steps, {}, []
        self.forwards: list[tuple[bool, frozenset]] = []

    def setup(self, trainer, pl_module, stage):
        def hook(module, args, kwargs):
            if not module.training:
                ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
                rows = frozenset(tuple(i[m.bool()].tolist()) for i, m in zip(ids, mask))
                self.forwards.append((torch.is_grad_enabled(), rows))
        pl_module.model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.at_steps:
            self.weights[trainer.global_step] = copy.deepcopy(pl_module.model.state_dict())
        self.modes.append({name: m.training for name, m in pl_module.named_modules()})


def test_every_n_steps_operator_subset_modes_probes_and_geometry(data):
    module = TinyLM()
    spy = Spy(at_steps={2})
    cb = ProbeCallback(data, trigger=Trigger(every_n_steps=2, at_start=True), gauges=gauge(),
                       geometry=Geometry([f"transformer.h.{i}.output" for i in (1, 2)]),
                       probes=[ProbeConfig("transformer.h.1.output")], fit_kwargs=dict(num_epochs=2, val_size=0))
    trainer([cb, spy], max_steps=4).fit(module, loader(data))
    assert cb.firings == [(0, "start"), (2, "step"), (4, "step")]
    steps = [s for s, _ in cb.trajectory]
    assert steps == [0, 2, 4] and all(op.shape == (24, 24) and isinstance(op, np.ndarray) for _, op in cb.trajectory)

    # the operator at step 2 equals a recomputation from the weights of step 2 (HF hidden states, numpy)
    fresh = tiny_model("gpt2", seed=1)
    fresh.load_state_dict(spy.weights[2])
    expected_ids = np.sort(np.random.default_rng(0).choice(len(data), 24, replace=False))
    X = np.stack([fresh(input_ids=torch.as_tensor(data.ids[i])[None], output_hidden_states=True)
                  .hidden_states[3][0].detach().double().mean(0).numpy() for i in expected_ids])
    np.testing.assert_allclose(dict(cb.trajectory)[2], markov_operator(X, knn=5), atol=1e-5)
    assert not np.allclose(dict(cb.trajectory)[0], dict(cb.trajectory)[4], atol=1e-4), "weights moved"

    # each measurement: the same seeded examples, no gradient, and every submodule's mode kept
    subset = frozenset(tuple(data.ids[i].tolist()) for i in expected_ids)
    measured = [rows for _, rows in spy.forwards]
    assert len(spy.forwards) == 3 * 2 and not any(grad for grad, _ in spy.forwards)  # 24 rows in 2 batches of 16
    assert [a | b for a, b in zip(measured[::2], measured[1::2])] == [subset] * 3
    assert all(m["model"] and not m["model.transformer.h.0"] and m["model.transformer.h.1"] for m in spy.modes)

    # probes and geometry, one row per measurement
    probes, geometry = cb.probe_metrics, cb.geometry_metrics
    assert probes["step"].tolist() == [0, 2, 4] and set(probes["probe"]) == {"transformer.h.1.output"}
    train, test = data.subset(expected_ids).tt_split(0.25, seed=0)  # the same probe, fitted on step 2's model
    alone = ProbeRunner(load_model(fresh, tokenizer=tiny_tokenizer()), [ProbeConfig("transformer.h.1.output")],
                        progress=False).fit_probes(train, test, batch_size=16, n_boot=0, num_epochs=2, val_size=0)
    at_step_2 = probes[probes["step"] == 2].iloc[0]
    assert at_step_2["n_scored"] == len(test) == 6
    assert at_step_2[["accuracy", "loss"]].tolist() == pytest.approx(alone.metrics.iloc[0][["accuracy", "loss"]].tolist(),
                                                                    abs=1e-6)
    assert geometry[["step", "site"]].values.tolist() == [[s, f"transformer.h.{i}.output"] for s in (0, 2, 4)
                                                          for i in (1, 2)]
    assert (geometry["n_rows"] == 24).all()
    at2 = geometry[(geometry["step"] == 2) & (geometry["site"] == SITE)].iloc[0]
    eig = np.linalg.eigvalsh(np.cov(X.T, ddof=0))[::-1]  # the geometry's participation ratio, by hand
    assert at2["d_pr"] == pytest.approx(eig.sum() ** 2 / (eig ** 2).sum(), rel=1e-4)


def test_epochs_validation_and_checkpoints_fire_when_lightning_does(data, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    epochs = ProbeCallback(data, trigger=Trigger(every_n_epochs=2), gauges=gauge())
    validation = ProbeCallback(data, trigger=Trigger(on_validation=True), gauges=gauge())
    saves = ProbeCallback(data, trigger=Trigger(on_checkpoint=True), gauges=gauge())
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, save_on_train_epoch_end=False)
    trainer([epochs, validation, saves, checkpoint], max_epochs=4, enable_checkpointing=True, limit_train_batches=2,
            limit_val_batches=1, num_sanity_val_steps=1).fit(TinyLM(), loader(data), loader(data))
    assert epochs.firings == [(4, "epoch_end"), (8, "epoch_end")]
    assert validation.firings == [(2, "validation"), (4, "validation"), (6, "validation"), (8, "validation")], \
        "each validation, not the sanity check at step 0"
    written = sorted(int(re.search(r"step=(\d+)", p.name).group(1)) for p in tmp_path.glob("*.ckpt"))
    assert written == [3, 6] and saves.firings == [(3, "checkpoint"), (6, "checkpoint")]
    assert [s for s, _ in saves.get_trajectory(SITE)] == [3, 6]


def test_a_resumed_run_continues_firings_trajectory_and_tables(data, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps, folder, ckpt_path=None):
        steps = ProbeCallback(data, trigger=Trigger(every_n_steps=2, at_start=True), gauges=gauge(),
                              geometry=Geometry([SITE]), probes=[ProbeConfig(SITE)],
                              fit_kwargs=dict(num_epochs=2, val_size=0))
        saves = ProbeCallback(data, trigger=Trigger(on_checkpoint=True), gauges=gauge())
        each_step = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1)
        module = TinyLM()
        for m in module.modules():  # no dropout: a resumed run does not restore the random state
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        trainer([steps, saves, each_step], max_steps=max_steps, enable_checkpointing=True).fit(
            module, loader(data, batch_size=64), ckpt_path=ckpt_path)  # a step an epoch: the same batch each step
        return steps, saves

    whole, whole_saves = run(10, tmp_path / "whole")
    run(6, tmp_path / "cut")
    (ckpt,) = (tmp_path / "cut").glob("*step=6.ckpt")
    assert torch.load(ckpt, weights_only=True)["callbacks"]  # plain tensors and python values
    resumed, resumed_saves = run(10, tmp_path / "resumed", ckpt_path=ckpt)
    assert whole.firings == [(0, "start"), (2, "step"), (4, "step"), (6, "step"), (8, "step"), (10, "step")]
    assert resumed.firings == whole.firings and resumed_saves.firings == whole_saves.firings
    assert [s for s, _ in whole_saves.firings] == list(range(1, 11))  # step 6's, taken in the checkpoint it measures
    for got, want in [(resumed.trajectory, whole.trajectory), (resumed_saves.trajectory, whole_saves.trajectory)]:
        assert [s for s, _ in got] == [s for s, _ in want]
        for (_, a), (_, b) in zip(got, want):
            np.testing.assert_allclose(a, b, atol=1e-6)
    for got, want in [(resumed.probe_metrics, whole.probe_metrics), (resumed.geometry_metrics, whole.geometry_metrics)]:
        assert got["step"].tolist() == want["step"].tolist() == [0, 2, 4, 6, 8, 10]
        numeric = want.select_dtypes("number").columns
        np.testing.assert_allclose(got[numeric].to_numpy(float), want[numeric].to_numpy(float), atol=1e-6)
    got, want = resumed.gauges[0].trajectory, whole.gauges[0].trajectory  # the gauge's own table, eigenvalues too
    assert got[["step", "epoch", "event"]].values.tolist() == want[["step", "epoch", "event"]].values.tolist()
    np.testing.assert_allclose(np.stack(got["eigenvalues"]), np.stack(want["eigenvalues"]), atol=1e-6)


def test_one_measurement_per_step_and_a_model_attribute(data):
    class Wrapped(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = TinyLM()

        def training_step(self, batch, batch_idx):
            return self.net.training_step(batch, batch_idx)

        def configure_optimizers(self):
            return self.net.configure_optimizers()

    cb = ProbeCallback(data, trigger=Trigger(every_n_steps=2, every_n_epochs=1, on_end=True), gauges=gauge(),
                       model="net.model")
    trainer([cb], max_steps=4, limit_train_batches=2).fit(Wrapped(), loader(data))
    assert cb.firings == [(2, "step"), (4, "step")], "the epoch ends and the end at steps 2 and 4 add nothing"


def test_clear_errors_before_training(data):
    with pytest.raises(ValueError, match="nothing to measure"):
        ProbeCallback(data, trigger=Trigger(on_end=True))
    with pytest.raises(ValueError, match="n_samples=30 but the gauges' n_samples are \\[24\\]"):
        ProbeCallback(data, trigger=Trigger(on_end=True), gauges=gauge(), n_samples=30)
    with pytest.raises(ValueError, match="pool='none'"):
        ProbeCallback(data, trigger=Trigger(on_end=True), probes=[ProbeConfig(SITE, pool="none")])
    few = data.subset(np.arange(8))
    with pytest.raises(ValueError, match="cannot split 8 examples"):  # probes' split checked before training
        ProbeCallback(few, trigger=Trigger(on_end=True), probes=[ProbeConfig(SITE)], test_size=0.05)
    with pytest.raises(ValueError, match="cannot hold out val_size=0.1 of the 9 training examples for validation"):
        ProbeCallback(data, trigger=Trigger(on_end=True), probes=[ProbeConfig(SITE)], n_samples=12)  # 9 fit, 3 test
    with pytest.raises(ValueError, match="val_size=0.05 of the 18 training"):  # fit_kwargs' val_size is the one checked
        ProbeCallback(data, trigger=Trigger(on_end=True), probes=[ProbeConfig(SITE)], n_samples=24,
                      fit_kwargs=dict(val_size=0.05))
    ProbeCallback(data, trigger=Trigger(on_end=True), probes=[ProbeConfig(SITE)], n_samples=12,
                  fit_kwargs=dict(val_size=0))  # no validation: nothing to split
    with pytest.raises(TypeError, match="trigger must be a Trigger"):
        ProbeCallback(data, trigger="every step", gauges=gauge())
    cb = ProbeCallback(data, trigger=Trigger(every_n_steps=1), gauges=DiffusionGauge(["transformer.h.9.output"],
                                                                                    n_samples=24, knn=5))
    module = TinyLM()
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(SiteError, match="transformer.h.9.output"):
        trainer([cb], max_steps=2).fit(module, loader(data))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items()), "no training step ran"
    with pytest.raises(ValueError, match="no gauge measures site"):
        ProbeCallback(data, trigger=Trigger(on_end=True), probes=[ProbeConfig(SITE)]).get_trajectory()


def test_lightning_stays_optional():
    code = ("import json, sys\n"
            "import lm_probe, lm_probe.integrations\n"
            "loaded = 'lightning' in sys.modules\n"
            "sys.modules['lightning'] = None  # as if it were not installed\n"
            "try:\n"
            "    import lm_probe.integrations.lightning\n"
            "    message = ''\n"
            "except ImportError as err:\n"
            "    message = str(err)\n"
            "print(json.dumps([loaded, message]))")
    # ... and once installed, lm_probe.integrations hands it out at first use
    assert __import__("lm_probe.integrations", fromlist=["x"]).ProbeCallback is ProbeCallback
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    loaded, message = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded is False and 'pip install "lm_probe[lightning]"' in message
