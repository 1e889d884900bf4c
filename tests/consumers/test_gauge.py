"""Diffusion gauges through the runner and during training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lm_probe import DiffusionGauge, NotComputedError, ProbeConfig, ProbeDataset, ProbeRunner, Trigger
from lm_probe.app.plots import plot_diffusion_spectra, plot_spectral_gap
from lm_probe.functional.diffusion import diffuse
from lm_probe.integrations import GaugeCallback
from lm_probe.testing import tiny_model, tiny_tokenizer, toy_texts

from conftest import count_calls

SITES = [f"model.layers.{i}.output" for i in range(4)]


def test_gauge_in_fit_probes_pools_its_subset_once_for_all_sites(llama, toy):
    train, test = toy
    gauge = DiffusionGauge(SITES, n_samples=60, knn=5, n_eigs=8, batch_size=16,
                           trigger=Trigger(every_n_steps=5, on_end=True))
    runner = ProbeRunner(llama, [ProbeConfig("model.layers.1.output")], consumers=[gauge], progress=False)
    calls, handle = count_calls(llama._module)
    try:
        runner.fit_probes(train, test, num_epochs=1, batch_size=16, val_size=0.1, eval_every=100, patience=100)
    finally:
        handle.remove()
    steps = runner["model.layers.1.output"].n_steps_
    n_val = int(np.ceil(0.1 * len(train)))
    subset_batches = -(-60 // 16)
    assert calls["n"] == -(-n_val // 16) + steps + -(-len(test) // 16) + subset_batches, "one pooling, all sites"
    traj = gauge.trajectory
    fired = sorted(traj["step"].unique())
    assert fired == sorted(set(range(5, steps + 1, 5)) | {steps})  # every 5 steps, plus the end, never step 0
    assert traj.groupby("step").size().eq(4).all()
    assert traj["layer"].tolist()[:4] == [0, 1, 2, 3]
    # the recorded spectrum is diffuse() on the pooled subset (HF hidden states, independently)
    sub = gauge._subset
    X = np.stack([llama._module(input_ids=torch.from_numpy(ids)[None], output_hidden_states=True)
                  .hidden_states[3][0].detach().double().mean(0).numpy() for ids in sub.ids])
    ref = diffuse(X, knn=5, n_eigs=8)
    row = traj[(traj["site"] == "model.layers.2.output") & (traj["step"] == fired[0])].iloc[0]
    np.testing.assert_allclose(row["eigenvalues"], ref.eigenvalues, atol=1e-5)
    assert row["eigenvalues"][0] == pytest.approx(1.0, abs=1e-9) and row["spectral_gap"] > 0
    op = gauge.operator("model.layers.2.output", fired[0])
    assert op.shape == (60, 60) and np.allclose(np.asarray(op.sum(1)).ravel(), 1.0)


def test_gauge_rows_do_not_keep_the_forward_deeper(gpt2, toy):
    train, _ = toy
    gauge = DiffusionGauge(["transformer.h.3.output"], n_samples=30, knn=4, n_eigs=4, trigger=Trigger(on_end=True))
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.0.output")], consumers=[gauge], progress=False)
    deep, handle = count_calls(gpt2._module.transformer.h[3])
    try:
        runner.fit_probes(train, num_epochs=1, batch_size=16, val_size=0.1)
    finally:
        handle.remove()
    assert deep["n"] == -(-30 // 16), "block 3 runs only to pool the gauge's subset"


def test_measure_tracks_a_model_being_trained():
    tok = tiny_tokenizer()
    texts, labels = toy_texts(80, seed=3)
    data = ProbeDataset.from_texts(texts, labels, tokenizer=tok)
    model = tiny_model("gpt2", seed=1)
    gauge = DiffusionGauge(["transformer.h.1.output", "transformer.h.3.output"], n_samples=40, knn=5, n_eigs=6,
                           data=data)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = next(data.batches(32))
    for step in range(4):
        gauge.measure(model, step=step)
        model.train()
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    traj = gauge.trajectory
    first, last = (traj[traj["step"] == s].iloc[0]["eigenvalues"] for s in (0, 3))
    assert not np.allclose(first, last, atol=1e-4), "the spectrum moves as the weights change"
    assert [(s, site) for s, site, _ in gauge.get_trajectory()][:3] == [
        (0, "transformer.h.1.output"), (0, "transformer.h.3.output"), (1, "transformer.h.1.output")]
    assert model.training, "measure restores train mode"


def test_gauge_callback_with_hf_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    tok = tiny_tokenizer()
    texts, labels = toy_texts(64, seed=4)
    data = ProbeDataset.from_texts(texts, labels, tokenizer=tok)
    model = tiny_model("llama", seed=2)
    train_rows = [{"input_ids": ids.tolist(), "labels": ids.tolist()} for ids in data.ids]

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    gauge = DiffusionGauge(["model.layers.0.output", "model.layers.3.output"], n_samples=32, knn=4, n_eigs=5,
                           trigger=Trigger(every_n_steps=3, on_end=True, at_start=True))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=5e-2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_rows, data_collator=collate,
                      callbacks=[GaugeCallback(gauge, model, data)])
    trainer.train()
    traj = gauge.trajectory
    assert sorted(traj["step"].unique()) == [0, 3, 6], "start, every 3 steps; the end at step 6 is not repeated"
    at = lambda s: traj[(traj["step"] == s) & (traj["site"] == "model.layers.3.output")].iloc[0]["eigenvalues"]
    assert not np.allclose(at(0), at(6), atol=1e-4)


class GapRatio(DiffusionGauge):
    def extra_metrics(self, result):
        return {"lambda_2": float(result.eigenvalues[1]), "gap_ratio": float(result.eigenvalues[2] / result.eigenvalues[1])}


def test_custom_gauges_add_columns(gpt2, toy):
    train, _ = toy
    sub = GapRatio(["transformer.h.1.output"], n_samples=40, knn=5, n_eigs=4)
    fn = DiffusionGauge(["transformer.h.1.output"], n_samples=40, knn=5, n_eigs=4,
                        extra_metrics=lambda r: {"trace": float(r.operator.diagonal().sum())})
    ProbeRunner(gpt2, consumers=[sub, fn], progress=False).collect(train)
    row = sub.trajectory.iloc[0]
    assert row["lambda_2"] == pytest.approx(1 - row["spectral_gap"])
    assert fn.trajectory.iloc[0]["trace"] > 0  # self loops on the diagonal


def test_plots(gpt2, toy, tmp_path):
    train, _ = toy
    gauge = DiffusionGauge([f"transformer.h.{i}.output" for i in range(4)], n_samples=40, knn=5, n_eigs=6)
    ProbeRunner(gpt2, consumers=[gauge], progress=False).collect(train)
    plot_diffusion_spectra(gauge.trajectory, path=tmp_path / "spectra.png")
    plot_spectral_gap(gauge.trajectory, x="layer", path=tmp_path / "gap.png")
    assert (tmp_path / "spectra.png").stat().st_size > 5000 and (tmp_path / "gap.png").stat().st_size > 5000


def test_bad_input(gpt2, toy):
    train, _ = toy
    with pytest.raises(ValueError, match="knn=40 must be at least 1 and below n_samples=40"):
        DiffusionGauge(["transformer.h.1.output"], n_samples=40, knn=40)
    big = DiffusionGauge(["transformer.h.1.output"], n_samples=10_000)
    calls, handle = count_calls(gpt2._module)
    try:
        with pytest.raises(ValueError, match=r"n_samples=10000 is larger than the \d+ examples"):
            ProbeRunner(gpt2, [ProbeConfig("transformer.h.0.output")], consumers=[big], progress=False).fit_probes(train)
    finally:
        handle.remove()
    assert calls["n"] == 0
    with pytest.raises(NotComputedError):
        DiffusionGauge(["transformer.h.1.output"]).trajectory
    with pytest.raises(ValueError, match="pass data="):
        DiffusionGauge(["transformer.h.1.output"]).measure(gpt2, step=0)


class FakeRun:
    def __init__(self):
        self.logged = []

    def log(self, data, step):
        self.logged.append((step, data))


def test_wandb_payload_per_step_and_site(gpt2, toy):
    train, _ = toy
    run = FakeRun()
    gauge = DiffusionGauge(["transformer.h.1.output", "transformer.h.2.output"], n_samples=40, knn=5, n_eigs=3,
                           wandb_run=run)
    ProbeRunner(gpt2, consumers=[gauge], progress=False).collect(train)
    (step, data), = run.logged
    row = gauge.trajectory.iloc[1]
    assert data["gauge/transformer.h.2.output/spectral_gap"] == pytest.approx(row["spectral_gap"])
    assert [data[f"gauge/transformer.h.2.output/eig_{i}"] for i in range(3)] == pytest.approx(list(row["eigenvalues"]))
    assert all(np.isfinite(v) and abs(v) <= 1 + 1e-9 for k, v in data.items() if "/eig_" in k)


def test_wandb_offline_run(gpt2, toy, tmp_path, monkeypatch):
    """A real W&B run in offline mode: the run file holds each key and its JSON value."""
    import json
    import time

    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train, _ = toy
    run = wandb.init(project="lm-probe-test", dir=str(tmp_path), mode="offline")
    try:
        gauge = DiffusionGauge(["transformer.h.1.output"], n_samples=40, knn=5, n_eigs=3, wandb_run=run)
        ProbeRunner(gpt2, consumers=[gauge], progress=False).collect(train)
    finally:
        run.finish()
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    key = b"gauge/transformer.h.1.output/spectral_gap"
    deadline = time.monotonic() + 30  # W&B's background writer may flush after finish() returns
    while key not in path.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    raw = path.read_bytes()
    gap = float(gauge.trajectory.iloc[0]["spectral_gap"])
    assert b"gauge/transformer.h.1.output/spectral_gap" in raw and json.dumps(gap).encode() in raw
    assert b"gauge/transformer.h.1.output/eig_2" in raw


def test_record_takes_rows_pooled_elsewhere():
    rng = np.random.default_rng(0)
    rows = {"a": rng.normal(size=(30, 8)), "b": rng.normal(size=(30, 5))}
    gauge = DiffusionGauge(["a", "b"], n_samples=30, knn=4, n_eigs=5)
    table = gauge.record(rows, 7, epoch=1, event="checkpoint", layers={"a": 0, "b": 1})
    assert table[["step", "epoch", "event", "site", "layer"]].values.tolist() == [
        [7, 1, "checkpoint", "a", 0], [7, 1, "checkpoint", "b", 1]]
    for site, row in zip("ab", table.itertuples()):
        np.testing.assert_allclose(row.eigenvalues, diffuse(rows[site], knn=4, n_eigs=5).eigenvalues, atol=1e-12)
    with pytest.raises(ValueError, match=r"n_samples is 30, got rows per site \{'b': 29\}"):
        gauge.record({"a": rows["a"], "b": rows["b"][:29]}, 8)
    with pytest.raises(ValueError, match=r"no rows for the gauge's sites \['b'\]"):
        gauge.record({"a": rows["a"]}, 8)
