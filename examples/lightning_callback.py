"""ProbeCallback in a short Lightning run: a tiny random GPT-2 trained as a language model on CPU.

    pip install "lm_probe[lightning]"
    python examples/lightning_callback.py

Gauges, geometry and a probe are measured on the same 64 seeded examples at the start, every
4 steps and at each checkpoint save; the README's Lightning section shows this script's output.
"""

from __future__ import annotations

import tempfile
import time

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lm_probe import DiffusionGauge, Geometry, ProbeConfig, ProbeDataset, Trigger
from lm_probe.integrations.lightning import ProbeCallback
from lm_probe.testing import tiny_model, tiny_tokenizer, toy_texts


class LM(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.train()

    def training_step(self, batch, batch_idx):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return self.model(**batch, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def collate(rows):
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.nn.functional.pad(torch.as_tensor(r), (0, width - len(r))) for r in rows])
    mask = (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


def main() -> None:
    texts, labels = toy_texts(256, seed=0)
    data = ProbeDataset.from_texts(texts, labels, tokenizer=tiny_tokenizer())
    sites = ["transformer.h.1.output", "transformer.h.2.output"]
    callback = ProbeCallback(
        data, trigger=Trigger(every_n_steps=4, at_start=True, on_checkpoint=True),
        gauges=DiffusionGauge(["transformer.h.2.output"], n_samples=64, knn=8, n_eigs=8),
        geometry=Geometry(sites), probes=[ProbeConfig(s) for s in sites], seed=0,
    )
    torch.manual_seed(0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        saves = ModelCheckpoint(dirpath=folder, every_n_train_steps=6, save_top_k=-1)
        trainer = L.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[callback, saves])
        trainer.fit(LM(tiny_model("gpt2", seed=1)), DataLoader(list(data.ids), batch_size=16, shuffle=True,
                                                                 collate_fn=collate))
    print(f"{time.perf_counter() - started:.1f} s; measured at {callback.firings}")
    for step, operator in callback.trajectory:
        print(f"step {step:2d}: operator {operator.shape}, rows sum to 1: {np.allclose(operator.sum(1), 1)}")
    gauge = callback.gauges[0].trajectory[["step", "spectral_gap", "entropy"]]
    probes = callback.probe_metrics.pivot(index="step", columns="probe", values="accuracy")
    geometry = callback.geometry_metrics.pivot(index="step", columns="site", values="d_pr")
    table = gauge.set_index("step").join(probes.add_prefix("acc ")).join(geometry.add_prefix("d_pr "))
    print(table.rename(columns=lambda c: c.replace("transformer.", "")).round(4).to_string())


if __name__ == "__main__":
    main()
