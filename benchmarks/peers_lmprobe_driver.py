"""The lmprobe side of ``benchmarks/peers.py``: run in lmprobe's own environment, never in ours.

``python peers_lmprobe_driver.py IN.json OUT.json`` reads the model folder, the layers, the
poolings, the threads and the examples (train texts and labels, test texts) from ``IN.json``,
and writes to ``OUT.json`` the wall and CPU seconds (``time.process_time``, all threads) of
each step and each probe's test predictions. It
imports nothing of lm_probe, so that the two tools never share a process.

The steps follow lmprobe's own ``Probe.sweep_layers`` and ``LayerSweepResult.predict``
(one extraction pass for all layers, cached, then one probe per layer from the cache),
written out with lmprobe's public calls so that each layer's fit and predict can be timed:

1. load: the model and tokenizer (lmprobe keeps them in a process-wide cache);
2. per pooling: ``Probe(layers=LAYERS).warmup(train)`` (the forward passes), then per layer
   ``Probe(layers=i).fit(train, labels)`` (pooling from the cache, ``StandardScaler``,
   ``LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000)``), then ``warmup(test)`` and
   per layer ``predict(test)``. The second pooling finds every activation in the cache.

The activation cache is a fresh temporary folder (``LMPROBE_CACHE_DIR``), removed at the end.
For the feature check, the pooled rows of ``check_layer`` for the first ``check_n`` test
texts are read with ``Probe._extract_and_pool``, a private method (lmprobe exposes no
public call that returns pooled features).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

POOLS = {"last": "last_token", "mean": "mean"}  # lm_probe's pooling names -> lmprobe's


def now() -> list[float]:
    """``[wall, cpu]`` seconds; the difference of two is what a step took."""
    return [time.perf_counter(), time.process_time()]


def since(start: list[float]) -> list[float]:
    return [b - a for a, b in zip(start, now())]


def add(total: list[float], start: list[float]) -> None:
    total[:] = [t + d for t, d in zip(total, since(start))]


def main(inp: str, out: str) -> None:
    spec = json.loads(open(inp).read())
    cache = tempfile.mkdtemp(prefix="lmprobe_cache_")
    os.environ["LMPROBE_CACHE_DIR"] = cache  # read when lmprobe.cache is imported
    try:
        result = run(spec)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    with open(out, "w") as f:
        json.dump(result, f)


def run(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    import lmprobe
    from lmprobe import Probe
    from lmprobe.backends import _get_local_model

    path, layers, bs = spec["model"], spec["layers"], spec["batch_size"]
    common = dict(model=path, device="cpu", batch_size=bs, random_state=spec["seed"])
    train, labels, test = spec["train_texts"], [int(y) for y in spec["train_labels"]], spec["test_texts"]
    clock = now()
    _get_local_model(path, "cpu", torch.float32)  # what Probe loads lazily on first use, cached
    seconds = {"load": since(clock), "extract": [0.0, 0.0]}
    per_layer, predictions, features = {}, {}, {}
    for pool in spec["pools"]:
        warm = Probe(layers=layers, pooling=POOLS[pool], normalize_layers=False, **common)
        clock = now()
        warm.warmup(train)
        add(seconds["extract"], clock)
        probes = {}
        for i in layers:
            clock = now()
            probes[i] = Probe(layers=i, pooling=POOLS[pool], **common).fit(train, labels)
            per_layer[f"{i}/{pool}"] = since(clock)
        clock = now()
        warm.warmup(test)
        add(seconds["extract"], clock)
        for i in layers:
            clock = now()
            predictions[f"{i}/{pool}"] = [int(p) for p in probes[i].predict(test)]
            add(per_layer[f"{i}/{pool}"], clock)
        check = probes[spec["check_layer"]]._extract_and_pool(test[:spec["check_n"]], POOLS[pool])[0]
        features[pool] = check.tolist()
    seconds["probes"] = [sum(step[j] for step in per_layer.values()) for j in range(2)]
    return {"version": lmprobe.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "seconds": seconds, "per_layer_s": per_layer, "predictions": predictions, "features": features}


if __name__ == "__main__":
    main(*sys.argv[1:3])
