"""The script each rank runs in tests/core/test_distributed.py (``torchrun --nproc-per-node 2``),
and the same run in one process for the reference.

``python ddp_child.py SCENARIO OUT``: ``equal`` writes this rank's results to
``OUT/rank<r>.pkl``; ``mismatch`` gives rank 1 other sites; ``data`` other examples; ``raise`` makes a consumer raise on
rank 1 at its second batch; ``gauge`` writes ``OUT/gauge<r>.pkl``, a DiffusionGauge.measure of a model.
"""

from __future__ import annotations

import os
import pickle
import sys
from datetime import timedelta
from pathlib import Path

from lm_probe import ActivationStore, DiffusionGauge, Geometry, ProbeConfig, ProbeDataset, ProbeRunner, load_model
from lm_probe.consumers.store import StoredRun
from lm_probe.core.consumer import Consumer, NotComputedError
from lm_probe.testing import tiny_model, tiny_tokenizer, toy_texts

SITES = ["model.layers.1.output", "model.layers.3.output"]
FIT = dict(num_epochs=4, val_size=0.1, eval_every=1, patience=2, min_delta=1e-2, n_boot=0)


def model():
    return load_model(tiny_model("llama", layers=4, hidden=32, seed=0), tokenizer=tiny_tokenizer())


def data(n, seed):
    """Toy sentiment examples, padded on the left (as the llama fixtures)."""
    tok = tiny_tokenizer()
    tok.pad_token, tok.padding_side = "<eos>", "left"
    texts, labels = toy_texts(n, seed=seed)
    return ProbeDataset.from_texts(texts, labels, tokenizer=tok, max_length=32)


def configs(sites=SITES):
    # l1: one probe (its own early stopping is checked); l3: the default SGD twins, with a control task
    return [ProbeConfig(sites[0], name="l1", alpha="auto"), ProbeConfig(sites[1], pool="last", name="l3", control=True)]


def run(batch_size, folder, **runner_kwargs):
    """Fit (train 102: fit 91, validation 11; test 13), then pool a 1-example and the test set,
    collect a geometry and a store (``folder/store``) over the test set and save the probes
    (``folder/probes``). Returns plain results."""
    train, test, one = data(102, 0), data(13, 1), data(1, 2)
    geometry = Geometry(["model.layers.2.output"])
    runner = ProbeRunner(model(), configs(), consumers=[geometry], progress=False, **runner_kwargs)
    runner.fit_probes(train, test, batch_size=batch_size, **FIT)
    acts = runner.pooled(test, batch_size=batch_size)
    tokens = runner.pooled(test, [("model.layers.1.output", "none")], batch_size=batch_size)
    collected = Geometry(["model.layers.2.output"])
    store = ActivationStore(Path(folder, "store"), ["model.layers.2.output"], shard_rows=5)
    runner.collect(test, [collected, store], batch_size=batch_size)
    runner.save(Path(folder, "probes"))
    try:
        wrote = isinstance(store.compute(), StoredRun)
    except NotComputedError:  # the ranks other than 0 write nothing
        wrote = False
    return {
        "metrics": runner.metrics,
        "probes": {name: dict(coef=p.coef_, intercept=p.intercept_, n_steps=p.n_steps_,
                              stop=str(p.stopped_reason_), best_step=p.best_step_,
                              predictions=p.predict(acts[(p.config.site, p.config.pool)]))
                   for name, p in runner.probes.items()},
        "acts": acts, "tokens": tokens,
        "one": runner.pooled(one, batch_size=batch_size),
        "geometry_fit": geometry.compute().eigenvalues,
        "geometry_collect": collected.compute().eigenvalues,
        "cache": runner.cache_info_["examples"],
        "world": runner.world, "wrote": wrote,
    }


def gauge(batch_size):
    """``DiffusionGauge.measure`` on a transformers model (as during training): its spectra and the
    examples this process's model ran forward."""
    hf = tiny_model("llama", layers=4, hidden=32, seed=0)
    rows = []
    hf.model.embed_tokens.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    g = DiffusionGauge(SITES, n_samples=20, knn=5, n_eigs=6, data=data(30, 3), batch_size=batch_size, seed=0)
    g.measure(hf, step=1)
    return {"eigenvalues": [list(e) for e in g.trajectory["eigenvalues"]], "rows": sum(rows),
            "gap": g.trajectory["spectral_gap"].tolist(), "sites": g.trajectory["site"].tolist()}


class RaiseOnRank1(Consumer):
    """Raises at its second batch on rank 1."""

    def __init__(self, rank):
        self.rank, self.seen = rank, 0

    def site_specs(self):
        return [SITES[0]]

    def update(self, batch):
        self.seen += 1
        if self.rank == 1 and self.seen == 2:
            raise RuntimeError("boom on rank 1")

    def compute(self):
        return self.seen

    def reset(self):
        self.seen = 0


def main(scenario, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    if scenario == "equal":
        result = run(batch_size=8, folder=out)
        Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    elif scenario == "mismatch":
        sites = SITES if rank == 0 else ["model.layers.0.output", SITES[1]]
        ProbeRunner(model(), configs(sites), progress=False)
    elif scenario == "data":  # the same runner, other examples on rank 1
        runner = ProbeRunner(model(), configs(), progress=False)
        runner.evaluate(data(20, rank), batch_size=4)
    elif scenario == "gauge":
        Path(out, f"gauge{rank}.pkl").write_bytes(pickle.dumps(gauge(batch_size=4)))
    elif scenario == "raise":
        runner = ProbeRunner(model(), [], consumers=[RaiseOnRank1(rank)], progress=False)
        runner.collect(data(40, 0), batch_size=4)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
