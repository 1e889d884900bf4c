"""Activation store: Arrow shards written during the pass, read memory-mapped, trained from."""

from __future__ import annotations

import hashlib
import json
import shutil

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from lm_probe import ActivationStore, ProbeConfig, ProbeDataset, ProbeRunner
from lm_probe.consumers.store import StoredRun
from lm_probe.consumers.store_index import StoreIndex
from lm_probe.consumers.store_shards import ShardWriter, write_info
from lm_probe.testing import NEGATIVE, POSITIVE, tiny_tokenizer, toy_texts

SITES = ["model.layers.0.output", "model.layers[-1].output"]
HF_SITES = {"model.layers.0.output": 1, "model.layers.2.output": 3}  # site -> index in HF hidden_states


def hidden_states(model, ids):
    """HF ``output_hidden_states`` of one example run alone (no padding), float64."""
    with torch.no_grad():
        out = model._module(input_ids=torch.from_numpy(ids)[None], output_hidden_states=True)
    return [h[0].double().numpy() for h in out.hidden_states]


@pytest.fixture(scope="module")
def stored_once(llama, toy, tmp_path_factory):
    data = toy[0]  # the store holds the whole training set (300 examples), in shards of 50 rows
    root = tmp_path_factory.mktemp("stored") / "store"
    store = ActivationStore(root, SITES, run="toy", tags={"task": "sentiment"}, shard_rows=50)
    ProbeRunner(llama, progress=False).collect(data, [store], batch_size=16)
    return data, root


@pytest.fixture
def stored(stored_once, tmp_path):
    """``(data, store folder)``: a copy of the stored run that a test may change."""
    data, root = stored_once
    shutil.copytree(root, tmp_path / "store")
    return data, tmp_path / "store"


def test_mean_rows_equal_hf_hidden_states_and_datasets_opens_the_run(llama, toy, tmp_path):
    data = toy[0].subset(range(40))
    store = ActivationStore(tmp_path, list(HF_SITES), run="mean", shard_rows=16, tags=["baseline"])
    ProbeRunner(llama, progress=False).collect(data, [store], batch_size=8)
    ds = datasets.load_from_disk(str(tmp_path / "mean"))  # datasets' own loader
    assert ds.column_names == [*HF_SITES, "example_id", "label", "n_tokens", "token_hash"] and ds.num_rows == 40
    assert ds.features["model.layers.0.output"] == datasets.List(datasets.Value("float32"), length=32)
    order = np.argsort(ds["example_id"])
    np.testing.assert_array_equal(np.asarray(ds["example_id"])[order], data.example_ids)
    np.testing.assert_array_equal(np.asarray(ds["label"])[order], data.labels)
    np.testing.assert_array_equal(np.asarray(ds["n_tokens"])[order], [len(ids) for ids in data.ids])
    blake = [int.from_bytes(hashlib.blake2b(ids.astype("<i8").tobytes(), digest_size=8).digest(), "little", signed=True)
             for ids in data.ids]
    np.testing.assert_array_equal(np.asarray(ds["token_hash"])[order], blake)
    for site, k in HF_SITES.items():
        reference = np.stack([hidden_states(llama, ids)[k].mean(0) for ids in data.ids])
        np.testing.assert_allclose(np.asarray(ds[site], np.float64)[order], reference, atol=1e-5)
    meta = json.loads(ds.info.description)
    assert meta["pool"] == "mean" and meta["run"] == "mean" and meta["tags"] == {"baseline": True}
    assert meta["model"]["model_type"] == "llama" and len(meta["model"]["config_hash"]) == 16
    assert meta["sites"][1] == {"spec": "model.layers.2.output", "name": "model.layers.2.output", "layer": 2,
                                "column": "model.layers.2.output", "hidden": 32}
    assert meta["dataset_fingerprint"] and meta["lm_probe"] and meta["schema_version"] == 2
    assert meta["tokenizer"] is not None and meta["created"].endswith("+00:00")
    assert [s["rows"] for s in meta["shards"]] == [16, 16, 8] and meta["n_examples"] == meta["n_rows"] == 40


def test_token_rows_are_every_real_token_with_position_and_token_id(llama, toy, tmp_path):
    data = toy[0].subset(range(30))  # left-padded batches: padding must not be stored
    store = ActivationStore(tmp_path, list(HF_SITES), pool="none", run="tokens", shard_rows=64)
    ProbeRunner(llama, progress=False).collect(data, [store], batch_size=8)
    ds = datasets.load_from_disk(str(tmp_path / "tokens"))
    assert ds.column_names == [*HF_SITES, "example_id", "position", "token_id", "label"]
    assert ds.num_rows == sum(len(ids) for ids in data.ids)
    frame = ds.to_pandas()
    for i, ids, label in zip(data.example_ids, data.ids, data.labels):
        rows = frame[frame["example_id"] == i]
        assert rows["position"].tolist() == list(range(len(ids)))
        assert rows["token_id"].tolist() == ids.tolist()
        assert (rows["label"] == label).all()
        states = hidden_states(llama, ids)
        for site, k in HF_SITES.items():
            np.testing.assert_allclose(np.stack(rows[site].to_list()), states[k], atol=1e-5)
    run = StoredRun(tmp_path / "tokens")
    assert run.n_examples == 30 and len(run.example_ids) == ds.num_rows
    np.testing.assert_array_equal(run.positions, frame["position"])
    np.testing.assert_array_equal(run.token_ids, frame["token_id"])
    got = run.read(data.example_ids[[4, 2]], [("model.layers.0.output", "none")])[("model.layers.0.output", "none")]
    want = np.concatenate([hidden_states(llama, data.ids[i])[1] for i in (4, 2)])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_the_writer_holds_at_most_one_shard(llama, toy, tmp_path, monkeypatch):
    held, written, add, write = [], [], ShardWriter.add, ShardWriter._write

    def spy_add(self, columns):
        add(self, columns)
        held.append(self.buffered_rows)

    def spy_write(self, n):
        written.append(n)
        write(self, n)

    monkeypatch.setattr(ShardWriter, "add", spy_add)
    monkeypatch.setattr(ShardWriter, "_write", spy_write)
    data = toy[0]
    ProbeRunner(llama, progress=False).collect(data, [ActivationStore(tmp_path, SITES, shard_rows=50)], batch_size=16)
    assert len(held) == -(-len(data) // 16) and max(held) < 50  # never a full shard in memory after a batch
    assert written == [50] * 6 and held[-1] == 0  # 300 rows: six shards, written as they filled


def test_rows_are_memory_mapped(stored):
    data, root = stored
    before = pa.total_allocated_bytes()
    run = ActivationStore.open(root).run("toy")
    arr = run.array(SITES[0])
    assert arr.shape == (len(data), 32) and len(arr.parts) == 6
    assert pa.total_allocated_bytes() == before, "the shards are mapped, not read into Arrow buffers"
    assert not arr.parts[0].flags.owndata and not arr.parts[0].flags.writeable


def test_from_store_trains_like_the_live_run(stored, llama):
    data, root = stored
    train, test = data.tt_split(0.25, seed=1)  # parts of the stored data keep their example ids
    configs = lambda: [ProbeConfig("model.layers.0.output", name="a"), ProbeConfig("model.layers[-1].output", name="b")]
    fit = dict(batch_size=16, num_epochs=2, eval_every=3, patience=3)
    live = ProbeRunner(llama, configs(), seed=4, progress=False).fit_probes(train, test, **fit).metrics
    run = ActivationStore.open(root).run("toy")
    offline = ProbeRunner.from_store(run, configs(), seed=4, progress=False).fit_probes(train, test, **fit).metrics
    pd.testing.assert_series_equal(offline["accuracy"], live["accuracy"])
    pd.testing.assert_series_equal(offline["n_steps"], live["n_steps"])
    np.testing.assert_allclose(offline["loss"], live["loss"], rtol=1e-4)


def test_token_probes_from_store_train_like_the_live_run(llama, tmp_path):
    texts, _ = toy_texts(120, seed=3)
    words = [t.split() for t in texts]
    tags = [["POS" if w in POSITIVE else "NEG" if w in NEGATIVE else "O" for w in ws] for ws in words]
    data = ProbeDataset.from_tagged(words, tags, tiny_tokenizer())
    train, test = data.tt_split(0.25, seed=0)
    store = ActivationStore(tmp_path, ["model.layers.1.output"], pool="none", run="tok", shard_rows=100)
    ProbeRunner(llama, progress=False).collect(data, [store], batch_size=16)
    run = StoredRun(tmp_path / "tok")
    np.testing.assert_array_equal(run.labels, data.flat_token_labels())  # the token labels, example by example
    configs = lambda: [ProbeConfig("model.layers.1.output", pool="none")]
    fit = dict(batch_size=16, num_epochs=2, eval_every=5, patience=4)
    live = ProbeRunner(llama, configs(), seed=2, progress=False).fit_probes(train, test, **fit).metrics
    offline = ProbeRunner.from_store(run, configs(), seed=2, progress=False).fit_probes(train, test, **fit).metrics
    assert live["accuracy"].iloc[0] > 0.8 and live["n_scored"].iloc[0] > 100
    pd.testing.assert_series_equal(offline["accuracy"], live["accuracy"])
    pd.testing.assert_series_equal(offline["n_scored"], live["n_scored"])
    np.testing.assert_allclose(offline["loss"], live["loss"], rtol=1e-4)
    shorter = ProbeDataset([ids[:-1] for ids in data.ids], token_labels=[t[:-1] for t in data.token_labels],
                           example_ids=data.example_ids)  # not the tokens that were collected
    with pytest.raises(ValueError, match="other texts/tokenization: example id .* tokens in the run and .* in the data"):
        ProbeRunner.from_store(run, configs(), progress=False).pooled(shorter)
    swapped = ProbeDataset([ids[::-1] for ids in data.ids], token_labels=data.token_labels,
                           example_ids=data.example_ids)  # as many tokens, other ids
    with pytest.raises(ValueError, match="example id .* has other token ids in the run than in the data"):
        ProbeRunner.from_store(run, configs(), progress=False).pooled(swapped)


def test_a_truncated_or_corrupted_shard_is_reported_and_the_rest_readable(stored, logs):
    data, root = stored
    intact = ActivationStore.open(root).run("toy").read(data.example_ids, [(SITES[0], "mean")])[(SITES[0], "mean")]
    truncated, corrupted = root / "toy" / "data-00001-of-00006.arrow", root / "toy" / "data-00004-of-00006.arrow"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    raw = bytearray(corrupted.read_bytes())
    raw[:64] = b"\xff" * 64  # same size, unreadable header
    corrupted.write_bytes(bytes(raw))
    run = ActivationStore.open(root).run("toy")
    assert sorted(run.bad_shards) == [truncated.name, corrupted.name]
    assert "truncated" in run.bad_shards[truncated.name]
    assert any(f"shard {truncated.name} is unreadable" in m for m in logs)
    assert any(f"shard {corrupted.name} is unreadable" in m for m in logs)
    assert len(run.example_ids) == run.n_examples == len(data) - 100
    assert run.array(SITES[0]).shape[0] == len(data) - 100
    lost = np.setdiff1d(data.example_ids, run.example_ids)
    assert len(lost) == 100
    with pytest.raises(KeyError, match="not in run 'toy' .2 shards were unreadable"):
        run.read([int(lost[0])], [(SITES[0], "mean")])
    kept = run.example_ids  # every row left equals the row read before the damage
    np.testing.assert_array_equal(run.read(kept, [(SITES[0], "mean")])[(SITES[0], "mean")],
                                  intact[[list(data.example_ids).index(i) for i in kept]])


def test_a_flipped_bit_in_a_shard_is_caught_only_with_verify(stored, logs):
    data, root = stored
    key = (SITES[0], "mean")
    intact = ActivationStore.open(root).run("toy").read(data.example_ids, [key])[key]
    shards = StoredRun(root / "toy").metadata["shards"]
    assert all(s["sha256"] == hashlib.sha256((root / "toy" / s["file"]).read_bytes()).hexdigest() for s in shards)
    damaged = root / "toy" / shards[2]["file"]  # rows 100..149
    raw = bytearray(damaged.read_bytes())
    at = bytes(raw).find(intact[100, 0].tobytes())  # the first float of the site's data in that shard
    raw[at + 3] ^= 0x7F  # sign and exponent bits: same size, readable, wrong value
    damaged.write_bytes(bytes(raw))
    unverified = ActivationStore.open(root).run("toy")  # the default checks miss it: documented
    assert unverified.bad_shards == {}
    assert unverified.read([int(data.example_ids[100])], [key])[key][0, 0] != intact[100, 0]
    run = ActivationStore.open(root).run("toy", verify=True)
    assert run.bad_shards == {damaged.name: "checksum mismatch"}
    assert any(f"shard {damaged.name} is unreadable (checksum mismatch)" in m for m in logs)
    assert len(run.example_ids) == len(data) - 50
    np.testing.assert_array_equal(run.read(run.example_ids, [key])[key],
                                  intact[[list(data.example_ids).index(i) for i in run.example_ids]])
    meta = dict(run.metadata, shards=[{k: v for k, v in s.items() if k != "sha256"} for s in shards])
    write_info(root / "toy", meta)  # a run written before checksums
    assert StoredRun.open(root / "toy", verify=True).bad_shards == {}
    assert any("written without shard checksums" in m for m in logs)


def test_wrong_model_or_site_is_refused(stored):
    _, root = stored
    index = ActivationStore.open(root)
    with pytest.raises(ValueError, match="was collected with model .* not 'gpt2'"):
        index.run("toy", model="gpt2")
    with pytest.raises(ValueError, match="no site 'model.layers.2.output'; it stores"):
        index.run("toy", sites=["model.layers.2.output"])
    with pytest.raises(ValueError, match="stores pool='mean', but .* pool='last'"):
        ProbeRunner.from_store(index.run("toy"), [ProbeConfig("model.layers.0.output", pool="last")])


def test_existing_run_is_not_overwritten_unless_asked(stored, llama):
    data, root = stored
    again = ActivationStore(root, SITES, run="toy")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ProbeRunner(llama, progress=False).collect(data, [again])
    assert ActivationStore.open(root).run("toy").n_examples == len(data)
    ProbeRunner(llama, progress=False).collect(data.subset(range(10)), [ActivationStore(root, SITES, run="toy",
                                                                                         overwrite=True)])
    assert ActivationStore.open(root).run("toy").n_examples == 10


def test_bad_store_arguments(monkeypatch):
    monkeypatch.delenv("LM_PROBE_STORE", raising=False)
    with pytest.raises(ValueError, match="non-empty"):
        ActivationStore("x", [])
    with pytest.raises(ValueError, match="clash with the store's own columns"):
        ActivationStore("x", ["label"])
    with pytest.raises(ValueError, match="shard_rows must be at least 1"):
        ActivationStore("x", SITES, shard_rows=0)
    with pytest.raises(ValueError, match="unknown pool"):
        ActivationStore("x", SITES, pool="median")
    with pytest.raises(ValueError, match="no store folder: pass path=... or set the LM_PROBE_STORE"):
        ActivationStore(sites=SITES)
    with pytest.raises(ValueError, match="LM_PROBE_STORE"):
        StoreIndex()


def test_the_store_folder_defaults_to_lm_probe_store(llama, toy, tmp_path, monkeypatch):
    monkeypatch.setenv("LM_PROBE_STORE", str(tmp_path / "env_store"))
    store = ActivationStore(sites=SITES, run="from_env")
    ProbeRunner(llama, progress=False).collect(toy[1].subset(range(12)), [store])
    assert (tmp_path / "env_store" / "from_env" / "state.json").exists()
    assert [r.name for r in StoreIndex().runs()] == ["from_env"] and ActivationStore.open().run("from_env")


@pytest.mark.parametrize("run", ["../precious", "", ".", "..", "a/b", ".hidden", None])
def test_a_run_name_is_a_plain_folder_name(run, tmp_path):
    with pytest.raises(ValueError, match="a run name is a plain folder name"):
        ActivationStore(tmp_path / "store", SITES, run=run, overwrite=True)


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(llama, toy, tmp_path):
    data, root = toy[1].subset(range(8)), tmp_path / "store"
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="refusing to delete .*notes: it holds files but is not a stored run"):
        ProbeRunner(llama, progress=False).collect(data, [ActivationStore(root, SITES, run="notes", overwrite=True)])
    assert (root / "notes" / "thesis.tex").read_text() == "years of work"
    outside = tmp_path / "elsewhere"
    (outside / "run").mkdir(parents=True)
    (outside / "run" / "state.json").write_text("{}")
    (root / "link").symlink_to(outside / "run")  # a link out of the store is not the store's run
    with pytest.raises(ValueError, match="not a run folder inside the store"):
        ProbeRunner(llama, progress=False).collect(data, [ActivationStore(root, SITES, run="link", overwrite=True)])
    assert (outside / "run" / "state.json").exists()


def test_another_dataset_with_the_same_example_ids_is_refused(llama, tmp_path):
    tok = tiny_tokenizer()
    a, b = (ProbeDataset.from_texts(*toy_texts(20, seed=seed), tokenizer=tok) for seed in (0, 7))
    np.testing.assert_array_equal(a.example_ids, b.example_ids)  # both 0..19
    ProbeRunner(llama, progress=False).collect(a, [ActivationStore(tmp_path, SITES[:1], run="a")])
    runner = ProbeRunner.from_store(StoredRun(tmp_path / "a"), [ProbeConfig(SITES[0])], progress=False)
    with pytest.raises(ValueError, match="run 'a' was collected from other texts/tokenization: example id .* "
                                         "collect again or pass the dataset it was collected from"):
        runner.pooled(b, [(SITES[0], "mean")])
    live = ProbeRunner(llama, progress=False).pooled(a, [(SITES[0], "mean")])[(SITES[0], "mean")]
    np.testing.assert_allclose(runner.pooled(a, [(SITES[0], "mean")])[(SITES[0], "mean")], live, atol=1e-6)


def test_a_pass_that_fails_leaves_the_old_run_as_it_was(stored, llama, monkeypatch):
    data, root = stored
    before = ActivationStore.open(root).run("toy").array(SITES[0])[:]
    update, calls = ActivationStore.update, []

    def crash_at_batch_2(self, batch):
        calls.append(batch.step)
        if len(calls) == 2:
            raise RuntimeError("crash mid-pass")
        update(self, batch)

    monkeypatch.setattr(ActivationStore, "update", crash_at_batch_2)
    with pytest.raises(RuntimeError, match="crash mid-pass"):
        ProbeRunner(llama, progress=False).collect(data, [ActivationStore(root, SITES, run="toy", overwrite=True,
                                                                          shard_rows=10)], batch_size=16)
    index = ActivationStore.open(root)
    assert list(index._runs) == ["toy"] and index.leftovers == [root / ".toy.writing"]
    np.testing.assert_array_equal(index.run("toy").array(SITES[0])[:], before)  # intact and readable
    monkeypatch.setattr(ActivationStore, "update", update)
    with pytest.raises(FileExistsError, match="overwrite=True"):  # the name still holds the old run
        ProbeRunner(llama, progress=False).collect(data, [ActivationStore(root, SITES, run="toy")])
    ProbeRunner(llama, progress=False).collect(data.subset(range(10)), [ActivationStore(root, SITES, run="toy",
                                                                                         overwrite=True)])
    assert ActivationStore.open(root).run("toy").n_examples == 10 and sorted(p.name for p in root.iterdir()) == ["toy"]


def test_token_run_shards_hold_whole_examples_and_a_lost_shard_loses_whole_examples(llama, toy, tmp_path):
    data = toy[1].subset(range(40))
    store = ActivationStore(tmp_path, SITES[:1], pool="none", run="t", shard_rows=25)
    ProbeRunner(llama, progress=False).collect(data, [store], batch_size=16)
    frame = datasets.load_from_disk(str(tmp_path / "t")).to_pandas()
    shards = StoredRun(tmp_path / "t").metadata["shards"]
    shard_of = np.repeat(np.arange(len(shards)), [s["rows"] for s in shards])
    assert all(len(set(shard_of[frame["example_id"] == i])) == 1 for i in data.example_ids)  # never split
    assert all(s["rows"] <= 25 for s in shards) and sum(s["rows"] for s in shards) == len(frame)
    lost_file = tmp_path / "t" / shards[1]["file"]
    lost_file.write_bytes(lost_file.read_bytes()[:-50])
    run = StoredRun(tmp_path / "t")
    lost = set(frame["example_id"][shard_of == 1])
    assert run.n_examples == len(data) - len(lost) and lost.isdisjoint(run.example_ids)
    for i, ids in zip(data.example_ids, data.ids):  # every example left has all its tokens
        if i not in lost:
            assert (run.example_ids == i).sum() == len(ids)
    with pytest.raises(KeyError, match="is not in run 't' .1 shards were unreadable"):
        run.read([min(lost)], [(SITES[0], "none")])


@pytest.mark.parametrize("pool", ["mean", "none"])
def test_a_pass_cut_by_max_tokens_is_recorded_as_incomplete(llama, toy, tmp_path, pool):
    data = toy[1].subset(range(20))
    budget = int(sum(len(ids) for ids in data.ids[:7])) + 2  # seven whole examples and two tokens of the 8th
    ProbeRunner(llama, progress=False).collect(data, [ActivationStore(tmp_path, SITES[:1], run="cut", pool=pool)],
                                               batch_size=4, max_tokens=budget)
    ProbeRunner(llama, progress=False).collect(data, [ActivationStore(tmp_path, SITES[:1], run="all", pool=pool)])
    run = StoredRun(tmp_path / "cut")
    assert run.metadata["complete"] is False and run.metadata["max_tokens"] == budget
    assert run.n_examples == (7 if pool == "mean" else 8)  # pooled rows only of examples pooled whole
    assert run.metadata["n_tokens"] == (budget - 2 if pool == "mean" else budget)
    assert StoredRun(tmp_path / "all").metadata["complete"] is True
    table = ActivationStore.open(tmp_path).table.set_index("run")
    assert table.loc["cut", "complete"] == False and table.loc["cut", "max_tokens"] == budget  # noqa: E712
    assert table.loc["all", "complete"] == True and pd.isna(table.loc["all", "max_tokens"])  # noqa: E712


def test_a_run_written_alongside_fit_probes_holds_the_training_split_and_says_so(llama, toy, tmp_path):
    """fit_probes shows its consumers the fit rows only: the validation rows it holds out are
    not in the run, and training from it on the same data names that and the fix."""
    train = toy[0].subset(np.arange(80))
    store = ActivationStore(tmp_path, SITES, run="fit")
    runner = ProbeRunner(llama, [ProbeConfig(SITES[0])], consumers=[store], seed=2, progress=False)
    runner.fit_probes(train, batch_size=16, num_epochs=1, val_size=0.1)
    run = ActivationStore.open(tmp_path).run("fit")
    assert run.n_examples == 72  # 80 examples, 8 held out for validation
    with pytest.raises(KeyError, match=r"holds 72 examples.*alongside fit_probes.*runner\.collect"):
        ProbeRunner.from_store(run, [ProbeConfig(SITES[0])], seed=2, progress=False).fit_probes(
            train, batch_size=16, num_epochs=1)
