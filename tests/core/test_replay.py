"""Each example traced once (issue 13): the replay cache, one pass for every consumer,
fresh results, and the non-finite policy."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest
import torch

from lm_probe import Cache, Geometry, LogitLens, ProbeConfig, ProbeDataset, ProbeRunner
from lm_probe.core.consumer import PooledBatch
from lm_probe.core.replay import ReplayCache

from conftest import count_calls

FIT = dict(batch_size=16, num_epochs=3, val_size=0.1, eval_every=2, patience=1000)
CONFIGS = [ProbeConfig("model.layers.1.output", name="l1"),
           ProbeConfig("model.layers.3.output", pool="last", name="l3-last", control=True)]


def n_batches(n, size=16):
    return -(-n // size)


def weights(runner):
    return {name: (p.coef_.copy(), np.atleast_1d(p.intercept_).copy()) for name, p in runner.probes.items()}


def test_three_epochs_trace_each_example_once(llama, toy):
    train, test = toy
    n_val = int(np.ceil(0.1 * len(train)))
    n_fit = len(train) - n_val
    calls, handle = count_calls(llama._module)
    try:
        cached = ProbeRunner(llama, CONFIGS, progress=False).fit_probes(train, test, **FIT)
        once = calls["n"]
        calls["n"] = 0
        traced = ProbeRunner(llama, CONFIGS, progress=False).fit_probes(train, test, cache=None, **FIT)
    finally:
        handle.remove()
    assert once == n_batches(n_fit) + n_batches(n_val) + n_batches(len(test))
    assert calls["n"] == 3 * n_batches(n_fit) + n_batches(n_val) + n_batches(len(test))  # today's re-tracing
    assert all(p.n_steps_ == 3 * n_batches(n_fit) for p in cached.probes.values())
    # the same rows in the same order each epoch: the same probes (replayed rows were pooled in
    # other batch compositions when re-traced, hence float tolerance), the same predictions
    for name, (coef, intercept) in weights(cached).items():
        np.testing.assert_allclose(coef, weights(traced)[name][0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(intercept, weights(traced)[name][1], rtol=1e-4, atol=1e-6)
    for col in ("accuracy", "f1", "control_accuracy", "n_steps"):
        np.testing.assert_array_equal(cached.metrics[col].to_numpy(float), traced.metrics[col].to_numpy(float))
    np.testing.assert_allclose(cached.metrics["loss"], traced.metrics["loss"], rtol=1e-5)
    assert cached.cache_info_["nbytes_in_memory"] == n_fit * 32 * 4 * 2 and cached.cache_info_["nbytes_spilled"] == 0


def test_a_stopped_probe_is_not_replayed_and_its_site_not_kept(llama, toy):
    train, _ = toy
    geometry = Geometry(["model.layers.0.output"])  # keeps the first epoch going after the probe stops
    runner = ProbeRunner(llama, [ProbeConfig("model.layers.2.output")], consumers=[geometry], progress=False)
    deep, handle = count_calls(llama._module.model.layers[2])
    shallow, handle0 = count_calls(llama._module.model.layers[0])
    try:
        runner.fit_probes(train, num_epochs=3, val_size=0, batch_size=16, max_steps=4)
    finally:
        handle.remove(), handle0.remove()
    assert deep["n"] == 4, "layer 2 is traced only while a probe reads it"
    assert shallow["n"] == n_batches(len(train)) and geometry.n_rows_ == len(train)
    assert runner["model.layers.2.output"].n_steps_ == 4
    assert runner.cache_info_["requests"] == [], "the stopped probe's rows were dropped, not replayed"


def test_token_probes_replay_their_token_rows(llama):
    from lm_probe.testing import tiny_tokenizer
    from test_token_probes import tagged

    words, tags = tagged(120, seed=3)
    data = ProbeDataset.from_tagged(words, tags, tiny_tokenizer())
    train, test = data.tt_split(0.25, seed=0)
    configs = [ProbeConfig("model.layers.1.output", pool="none", control=True)]
    cached = ProbeRunner(llama, configs, progress=False).fit_probes(train, test, **FIT)
    traced = ProbeRunner(llama, configs, progress=False).fit_probes(train, test, cache=None, **FIT)
    fit, _ = train.tt_split(0.1, seed=0)
    assert cached.cache_info_["nbytes_in_memory"] == sum(len(r) for r in fit.ids) * 32 * 4
    for name, (coef, _) in weights(cached).items():
        np.testing.assert_allclose(coef, weights(traced)[name][0], rtol=1e-4, atol=1e-6)
    for col in ("accuracy", "control_accuracy", "n_steps", "n_scored"):
        np.testing.assert_array_equal(cached.metrics[col].to_numpy(float), traced.metrics[col].to_numpy(float))


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_spilled_cache_gives_the_same_probes(llama, toy, tmp_path, backend):
    train, test = toy
    ram = ProbeRunner(llama, CONFIGS, progress=False, backend=backend).fit_probes(train, test, **FIT)
    disk = ProbeRunner(llama, CONFIGS, progress=False, backend=backend).fit_probes(
        train, test, cache=Cache(memory_budget=0, spill_dir=tmp_path), **FIT)
    assert disk.cache_info_["nbytes_in_memory"] == 0 and disk.cache_info_["nbytes_spilled"] > 0
    assert disk.cache_info_["spill_folder"].startswith(str(tmp_path))
    assert list(tmp_path.iterdir()) == [], "the spill folder is removed when fit_probes returns"
    for name, (coef, intercept) in weights(ram).items():
        np.testing.assert_array_equal(coef, weights(disk)[name][0])
        np.testing.assert_array_equal(intercept, weights(disk)[name][1])
    pd.testing.assert_frame_equal(ram.metrics, disk.metrics)


def _fill(cache, data, requests, hidden, batch=64):
    for lo in range(0, len(data), batch):
        index = np.arange(lo, min(lo + batch, len(data)))
        rows = {r: np.random.default_rng(lo).standard_normal((len(index), hidden)).astype(np.float32)
                for r in requests}
        cache.update(PooledBatch(rows, data.labels[index], index=index, n_tokens=np.ones(len(index), int)))


class _Reads:
    """A stand-in trainer that reads given requests and is always active."""

    active = True

    def __init__(self, requests):
        self.requests = tuple(requests)


@pytest.mark.parametrize("budget_mib, spilled", [(64, False), (1, True)])
def test_cache_memory_stays_within_its_budget(tmp_path, budget_mib, spilled):
    n, hidden = 4096, 256
    requests = [(f"s{i}", "mean") for i in range(4)]  # 4 x 4096 x 256 x 4 bytes = 16 MiB of rows
    data = ProbeDataset([np.array([3, 4])] * n, np.arange(n) % 2)
    cache = ReplayCache(data, [_Reads(requests)], Cache(memory_budget=budget_mib * 2**20, spill_dir=tmp_path))
    tracemalloc.start()
    try:
        _fill(cache, data, requests, hidden)
        batch = next(data.batches(100, shuffle=True))
        rows = cache.read(batch, data, requests)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = n * hidden * 4 * len(requests)
    assert cache.nbytes_in_memory + cache.nbytes_spilled == total
    if spilled:
        assert cache.nbytes_in_memory <= 2**20 and peak < 2 * 2**20, peak
    else:
        assert cache.nbytes_in_memory == total and peak >= total
    # the rows come back where they were written
    expect = np.random.default_rng(0).standard_normal((64, hidden)).astype(np.float32)
    first = batch.index < 64
    np.testing.assert_array_equal(rows[requests[0]][first], expect[batch.index[first]])
    cache.close()
    assert list(tmp_path.iterdir()) == []



def test_geometry_on_fit_probes_sees_one_pass_whatever_the_epochs(llama, toy):
    """Geometry riding a 3-epoch fit equals collect() over the fit split: the same rows once."""
    train = toy[0].subset(np.arange(120))
    sites = ["model.layers.1.output", "model.layers.3.output"]
    # batches of one example: activations do not depend on the batch's padding, so the two
    # passes see bit-identical rows, in different orders
    riding = Geometry(sites, pool="none", sample_limit=64)
    ProbeRunner(llama, CONFIGS, consumers=[riding], progress=False).fit_probes(
        train, **{**FIT, "batch_size": 1, "eval_every": 20})
    fit, _ = train.tt_split(0.1, seed=0)
    alone = Geometry(sites, pool="none", sample_limit=64)
    ProbeRunner(llama, progress=False).collect(fit, [alone], batch_size=1)
    assert riding.n_rows_ == alone.n_rows_ == sum(len(r) for r in fit.ids)
    assert riding.n_examples_ == alone.n_examples_ == len(fit)
    for s in sites:
        for a, b in zip(riding._moments[s], alone._moments[s]):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    # the sample is a function of which rows were seen, not of their order: identical
    sa, sb = riding.sample, alone.sample
    assert all(sa[s].shape == (64, 32) for s in sites)
    for s in sites:
        np.testing.assert_array_equal(sa[s], sb[s])
    pd.testing.assert_frame_equal(riding.compute().metrics, alone.compute().metrics, rtol=1e-9)


def test_each_fit_starts_fresh_and_replaces_the_metrics(llama, toy, tmp_path):
    train, test = toy
    runner = ProbeRunner(llama, CONFIGS, progress=False)
    runner.fit_probes(train, test, **FIT)
    first = weights(runner)
    assert runner.metrics is not None
    runner.fit_probes(train, **FIT)  # no test set: no metrics, not the previous ones
    assert runner.metrics is None
    again = weights(runner)
    for name in first:  # the same seed from fresh state: the same probes (not trained further)
        np.testing.assert_array_equal(first[name][0], again[name][0])
    runner.save(tmp_path / "saved")
    assert ProbeRunner.load(tmp_path / "saved").metrics is None


def _plant(data, i, marker):
    ids = [r.copy() for r in data.ids]
    ids[i] = np.append(ids[i], marker)
    return ProbeDataset(ids, data.labels, pad_token_id=data.pad_token_id, padding_side=data.padding_side,
                        example_ids=data.example_ids)


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_a_non_finite_example_is_left_out_and_counted_everywhere(gpt2, toy, backend):
    """A NaN planted in one test and one training example (through a hook on the embedding):
    training completes, each row is counted once, and the test metrics equal those of the
    test set without that example."""
    train, test = toy
    marker = 1  # <unk>: never in the toy texts
    bad_train, bad_test = _plant(train, 5, marker), _plant(test, 7, marker)

    def nan_rows(module, args, output):
        output[(args[0] == marker).any(1)] = float("nan")
        return output

    handle = gpt2._module.transformer.wte.register_forward_hook(nan_rows)
    configs = [ProbeConfig("transformer.h.1.output", name="mean"), ProbeConfig("transformer.h.2.output", pool="last",
                                                                               name="last", control=True)]
    try:
        geometry = Geometry(["transformer.h.1.output", "transformer.h.2.output"])
        lens = LogitLens(["transformer.h.1.output", "transformer.h.3.output"])
        runner = ProbeRunner(gpt2, configs, consumers=[geometry, lens], backend=backend, progress=False)
        runner.fit_probes(bad_train, bad_test, **FIT)
        clean = ProbeRunner(gpt2, configs, backend=backend, progress=False)
        clean.fit_probes(bad_train, test.subset(np.delete(np.arange(len(test)), 7)), **FIT)
    finally:
        handle.remove()
    m, c = runner.metrics, clean.metrics
    assert (m["n_nonfinite"] == 1).all() and (c["n_nonfinite"] == 0).all()
    assert (m["n_nonfinite_fit"] == 1).all(), "the training row is counted once, not once per epoch"
    assert (m["n_steps"] > 0).all() and (m["n_scored"] == len(test) - 1).all()
    cols = ["accuracy", "loss", "f1", "matthews", "control_accuracy", "selectivity", "n_scored", "n_steps"]
    pd.testing.assert_frame_equal(m[cols], c[cols])
    fit = train.tt_split(0.1, seed=0)[0]
    assert train.example_ids[5] in fit.example_ids  # the planted training example is traced in the first epoch
    assert geometry.n_nonfinite_ == lens.n_nonfinite_ == 1
    assert geometry.n_rows_ == lens.n_examples_ == len(fit) - 1


def test_replayed_epochs_are_plainly_shuffled(llama, toy, monkeypatch):
    """The traced epoch groups similar lengths (less padding); replayed epochs have no padding
    to save, so each is a plain seeded shuffle (seed + epoch), with and without the cache."""
    from lm_probe.core.batching import batch_order
    from lm_probe.probes.probe import Probe
    from lm_probe.probes.checks import split_validation

    train, _ = toy
    seen = []
    original = Probe.update
    record = lambda self, batch: self.name == "l1" and seen.append((batch.epoch, batch.index.tolist()))  # noqa: E731
    monkeypatch.setattr(Probe, "update", lambda self, batch: (record(self, batch), original(self, batch))[1])
    fit, _ = split_validation(train, 0.1, 0)
    lengths = np.array([len(r) for r in fit.ids])
    expected = [(e, b.tolist()) for e in range(3) for b in batch_order(lengths, 16, shuffle=True, seed=e,
                                                                       by_length=e == 0)]
    assert expected[:3] != [(e, b.tolist()) for e in range(1) for b in batch_order(lengths, 16, shuffle=True,
                                                                                   seed=0)][:3]
    for cache in (Cache(), None):
        seen.clear()
        one = [ProbeConfig("model.layers.1.output", name="l1", alpha="auto")]  # one probe: no twins
        ProbeRunner(llama, one, progress=False).fit_probes(train, cache=cache, **FIT)
        assert seen == expected
