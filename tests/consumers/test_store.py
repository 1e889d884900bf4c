"""Activation store: chunked writes, memory-mapped reads, training from a store."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lm_probe import ActivationStore, ProbeConfig, ProbeDataset, ProbeRunner

SITES = ["model.layers.0.output", "model.layers[-1].output"]


@pytest.fixture
def stored(llama, toy, tmp_path):
    train, _ = toy
    data = train  # the store holds the whole training set, in chunks of 50 examples
    store = ActivationStore(tmp_path / "store", SITES, run="toy", tags={"task": "sentiment"}, chunk_rows=50)
    ProbeRunner(llama, progress=False).collect(data, [store], batch_size=16)
    return store, data, tmp_path / "store"


def test_rows_equal_the_live_pooled_activations_memory_mapped(stored, llama):
    store, data, root = stored
    run = ActivationStore.open(root).run("toy")
    live = ProbeRunner(llama, progress=False).pooled(data, [(s, "mean") for s in SITES])
    for site in SITES:
        arr = run.array(site)
        assert arr.shape == (len(data), 32) and isinstance(arr.parts[0], np.memmap)
        np.testing.assert_allclose(arr[np.argsort(run.example_ids)], live[(site, "mean")], atol=1e-6)
    np.testing.assert_array_equal(run.labels[np.argsort(run.example_ids)], data.labels)
    meta = run.metadata
    assert len(meta["chunks"]) == -(-len(data) // 50) and meta["n_examples"] == len(data)
    assert meta["sites"][1] == {"spec": "model.layers[-1].output", "name": "model.layers.3.output", "layer": 3}
    assert meta["model"]["model_type"] == "llama" and len(meta["model"]["config_hash"]) == 16
    assert (meta["model"]["num_hidden_layers"], meta["model"]["hidden_size"]) == (4, 32)
    assert meta["tags"] == {"task": "sentiment"} and meta["dataset_fingerprint"] and meta["lm_probe"]


def test_from_store_trains_like_the_live_run(stored, llama, toy):
    _, data, root = stored
    train, test = data.tt_split(0.25, seed=1)  # parts of the stored data keep their example ids
    configs = lambda: [ProbeConfig("model.layers.0.output", name="a"), ProbeConfig("model.layers[-1].output", name="b")]
    fit = dict(batch_size=16, num_epochs=2, eval_every=3, patience=3)
    live = ProbeRunner(llama, configs(), seed=4, progress=False).fit_probes(train, test, **fit).metrics
    run = ActivationStore.open(root).run("toy")
    offline = ProbeRunner.from_store(run, configs(), seed=4, progress=False).fit_probes(train, test, **fit).metrics
    pd.testing.assert_series_equal(offline["accuracy"], live["accuracy"])
    pd.testing.assert_series_equal(offline["n_steps"], live["n_steps"])
    np.testing.assert_allclose(offline["loss"], live["loss"], rtol=1e-4)


def test_query_runs_by_model_site_and_tag(stored, llama, toy, tmp_path):
    _, data, root = stored
    other = ActivationStore(root, ["model.layers.1.output"], run="other", pool="last", tags={"task": "x"})
    ProbeRunner(llama, progress=False).collect(data.subset(range(20)), [other])
    index = ActivationStore.open(root)
    assert sorted(index.table["run"]) == ["other", "toy"]
    assert [r.name for r in index.runs(tag={"task": "sentiment"})] == ["toy"]
    assert [r.name for r in index.runs(site="model.layers.1.output")] == ["other"]
    assert [r.name for r in index.runs(site="model.layers.3.output")] == ["toy"]
    hash_ = index.run("toy").metadata["model"]["config_hash"]
    assert len(index.runs(model=hash_)) == 2 and index.runs(model="gpt2") == []


def test_wrong_model_or_site_is_refused(stored):
    _, _, root = stored
    index = ActivationStore.open(root)
    with pytest.raises(ValueError, match="was collected with model .* not 'gpt2'"):
        index.run("toy", model="gpt2")
    with pytest.raises(ValueError, match="no site 'model.layers.2.output'; it stores"):
        index.run("toy", sites=["model.layers.2.output"])
    with pytest.raises(ValueError, match="stores pool='mean', but .* pool='last'"):
        ProbeRunner.from_store(index.run("toy"), [ProbeConfig("model.layers.0.output", pool="last")])


def test_existing_run_is_not_overwritten_unless_asked(stored, llama):
    _, data, root = stored
    again = ActivationStore(root, SITES, run="toy")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ProbeRunner(llama, progress=False).collect(data, [again])
    assert ActivationStore.open(root).run("toy").metadata["n_examples"] == len(data)
    ProbeRunner(llama, progress=False).collect(data.subset(range(10)), [ActivationStore(root, SITES, run="toy",
                                                                                         overwrite=True)])
    assert ActivationStore.open(root).run("toy").metadata["n_examples"] == 10


def test_truncated_chunk_is_reported_and_the_rest_readable(stored, logs):
    _, data, root = stored
    victim = root / "toy" / "chunk_00001" / "site_0.npy"
    victim.write_bytes(victim.read_bytes()[:-100])
    run = ActivationStore.open(root).run("toy")
    assert list(run.bad_chunks) == ["chunk_00001"] and "truncated" in run.bad_chunks["chunk_00001"]
    assert any("chunk_00001 is unreadable" in m for m in logs)
    assert len(run.example_ids) == len(data) - 50 and run.array(SITES[0]).shape[0] == len(data) - 50
    lost = int(json.loads((root / "toy" / "metadata.json").read_text())["chunks"][1]["rows"])
    assert lost == 50
    with pytest.raises(KeyError, match="not in run 'toy' .1 chunks were unreadable"):
        run.read([int(np.setdiff1d(data.example_ids, run.example_ids)[0])], [(SITES[0], "mean")])


def test_bad_store_arguments():
    with pytest.raises(ValueError, match="one row per example"):
        ActivationStore("x", SITES, pool="none")
    with pytest.raises(ValueError, match="non-empty"):
        ActivationStore("x", [])
