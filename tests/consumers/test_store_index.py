"""A store's runs: queries, rename and remove, the hub path (offline), the old format and its conversion."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta

import datasets
import huggingface_hub
import numpy as np
import pandas as pd
import pytest

from lm_probe import ActivationStore, ProbeConfig, ProbeRunner
from lm_probe.app.cli import main, store_convert_command
from lm_probe.consumers.store import LegacyRun, StoredRun
from lm_probe.consumers.store_run import METADATA_FILE

SITES = ["model.layers.0.output", "model.layers.1.output"]


@pytest.fixture
def three_runs(llama, gpt2, toy, tmp_path):
    """A store with runs 'a' (llama, mean, task=sentiment), 'b' (llama, last, tag 'baseline') and 'c' (gpt2)."""
    data = toy[1].subset(range(24))
    root = tmp_path / "store"
    ProbeRunner(llama, progress=False).collect(data, [ActivationStore(root, SITES, run="a",
                                                                      tags={"task": "sentiment"})])
    ProbeRunner(llama, progress=False).collect(data, [ActivationStore(root, SITES[1:], run="b", pool="last",
                                                                      tags=["baseline"])])
    ProbeRunner(gpt2, progress=False).collect(data, [ActivationStore(root, ["transformer.h.0.output"], run="c",
                                                                     tags={"task": "sentiment"})])
    return data, root


def names(runs):
    return [r.name for r in runs]


def test_queries_by_model_site_tag_and_creation_time(three_runs):
    _, root = three_runs
    index = ActivationStore.open(root)
    table = index.table
    assert table["run"].tolist() == ["a", "b", "c"] and table["pool"].tolist() == ["mean", "last", "mean"]
    assert table["n_examples"].tolist() == [24, 24, 24] and set(table["format"]) == {"arrow"}
    llama_hash = index.run("a").metadata["model"]["config_hash"]
    gpt2_hash = index.run("c").metadata["model"]["config_hash"]
    assert llama_hash != gpt2_hash
    assert names(index.runs(model=llama_hash)) == ["a", "b"] and names(index.runs(model=gpt2_hash)) == ["c"]
    assert names(index.runs(model="nobody")) == []
    assert names(index.runs(site="model.layers.1.output")) == ["a", "b"]
    assert names(index.runs(site="transformer.h.0.output")) == ["c"]
    assert names(index.runs(tag={"task": "sentiment"})) == ["a", "c"] and names(index.runs(tag="baseline")) == ["b"]
    assert names(index.runs(tag="task", model=gpt2_hash)) == ["c"]
    created = {name: datetime.fromisoformat(index.run(name).metadata["created"]) for name in "abc"}
    assert created["a"] < created["b"] < created["c"]
    assert names(index.runs(created_after=created["a"])) == ["b", "c"]
    assert names(index.runs(created_after=created["b"].isoformat())) == ["c"]  # an ISO string works too
    assert names(index.runs(created_before=created["b"])) == ["a"]
    assert names(index.runs(created_after=datetime.now() + timedelta(minutes=1))) == []  # naive: local time
    assert names(index.runs(created_after=datetime.now() - timedelta(hours=1))) == ["a", "b", "c"]


def test_rename_and_remove(three_runs):
    _, root = three_runs
    run = ActivationStore.open(root).run("a")
    with pytest.raises(FileExistsError, match="already has a run 'b'"):
        run.rename("b")
    with pytest.raises(ValueError, match="plain folder name"):
        run.rename("../elsewhere")
    run.rename("sentiment-a")
    assert run.name == "sentiment-a" and run.path == root / "sentiment-a" and not (root / "a").exists()
    assert names(ActivationStore.open(root).runs()) == ["b", "c", "sentiment-a"]
    assert json.loads(datasets.load_from_disk(str(root / "sentiment-a")).info.description)["run"] == "sentiment-a"
    reopened = ActivationStore.open(root).run("sentiment-a")
    np.testing.assert_array_equal(reopened.array(SITES[0])[:], run.array(SITES[0])[:])
    victim = ActivationStore.open(root).run("b")
    with pytest.raises(ValueError, match=r"deletes run 'b' .* call run.remove\(confirm=True\)"):
        victim.remove()
    assert (root / "b").exists()
    victim.remove(confirm=True)
    assert not (root / "b").exists() and names(ActivationStore.open(root).runs()) == ["c", "sentiment-a"]


def test_push_to_hub_and_open_a_hub_path_offline(three_runs, tmp_path, monkeypatch):
    """The hub calls write to a local folder laid out as the repository would be."""
    data, root = three_runs
    hub = tmp_path / "hub" / "org" / "acts"
    calls = []

    def push(self, repo_id, **kwargs):
        calls.append(("push", repo_id, self.num_rows, kwargs))
        self.to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))

    def upload(self, *, path_or_fileobj, path_in_repo, repo_id, repo_type, **kwargs):
        calls.append(("upload", repo_id, path_in_repo, repo_type))
        (hub / path_in_repo).write_bytes(path_or_fileobj)

    monkeypatch.setattr(datasets.Dataset, "push_to_hub", push)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", upload)
    run = ActivationStore.open(root).run("a")
    run.push_to_hub("org/acts", private=True, token="hf_x")
    assert calls[0][:3] == ("push", "org/acts", 24) and calls[0][3]["private"] is True
    assert calls[0][3]["token"] == "hf_x" and calls[1] == ("upload", "org/acts", METADATA_FILE, "dataset")
    remote = StoredRun.open(f"hub:{hub}", cache_dir=tmp_path / "cache")
    assert remote.path is None and remote.metadata == run.metadata and remote.n_examples == 24
    for site in SITES:
        np.testing.assert_array_equal(remote.read(data.example_ids, [(site, "mean")])[(site, "mean")],
                                      run.read(data.example_ids, [(site, "mean")])[(site, "mean")])
    with pytest.raises(ValueError, match="cannot remove run 'a': it was opened from hub:"):
        remote.remove(confirm=True)
    configs = lambda: [ProbeConfig(SITES[1])]
    train, test = data.tt_split(0.25, seed=0)
    fit = dict(batch_size=8, num_epochs=2)
    from_hub = ProbeRunner.from_store(remote, configs(), progress=False).fit_probes(train, test, **fit).metrics
    local = ProbeRunner.from_store(run, configs(), progress=False).fit_probes(train, test, **fit).metrics
    pd.testing.assert_frame_equal(from_hub, local)


def write_old_run(folder, rows, labels, ids, chunk_rows):
    """A run in the first store format, written by hand: chunk folders of .npy files and a manifest."""
    chunks = []
    for k, start in enumerate(range(0, len(labels), chunk_rows)):
        chunk = folder / f"chunk_{k:05d}"
        chunk.mkdir(parents=True)
        part = {**{f"site_{j}": r[start:start + chunk_rows] for j, r in enumerate(rows.values())},
                "labels": labels[start:start + chunk_rows], "example_ids": ids[start:start + chunk_rows]}
        for name, value in part.items():
            np.save(chunk / f"{name}.npy", value)
        chunks.append({"folder": chunk.name, "rows": len(part["labels"]),
                       "bytes": {name: os.path.getsize(chunk / f"{name}.npy") for name in part}})
    meta = {"schema_version": 1, "run": folder.name, "pool": "mean", "tags": {"task": "old"},
            "model": {"name": "tiny-llama", "config_hash": "0123456789abcdef"}, "tokenizer": "tiny",
            "sites": [{"spec": s, "name": s, "layer": int(s.split(".")[2])} for s in rows],
            "dataset_fingerprint": "feedfacefeedface", "lm_probe": "0.1.0", "created": "2026-01-02T03:04:05+0000",
            "n_examples": len(labels), "chunks": chunks}
    (folder / "metadata.json").write_text(json.dumps(meta))
    return meta


def test_old_format_is_read_with_a_warning_and_converted_by_the_cli(llama, toy, tmp_path, logs, capsys):
    data = toy[1].subset(range(30))
    rows = ProbeRunner(llama, progress=False).pooled(data, [(s, "mean") for s in SITES])
    rows = {s: rows[(s, "mean")] for s in SITES}
    root = tmp_path / "store"
    old_meta = write_old_run(root / "old", rows, data.labels, data.example_ids, chunk_rows=8)
    old = ActivationStore.open(root).run("old")
    assert isinstance(old, LegacyRun) and old.n_examples == 30
    assert any("old format" in m and f"lm-probe store convert {root / 'old'}" in m for m in logs)
    assert ActivationStore.open(root).table["format"].tolist() == ["old (npy)"]
    for s in SITES:
        np.testing.assert_array_equal(old.read(data.example_ids, [(s, "mean")])[(s, "mean")], rows[s])

    assert store_convert_command(root) == [root / "old"]  # what `lm-probe store convert` runs
    assert "converted run 'old': 30 examples x 2 sites" in capsys.readouterr().out
    logs.clear()
    new = ActivationStore.open(root).run("old")
    assert isinstance(new, StoredRun) and not any("old format" in m for m in logs)
    assert not list((root / "old").glob("chunk_*")) and not (root / "old" / "metadata.json").exists()
    np.testing.assert_array_equal(new.example_ids, data.example_ids)
    np.testing.assert_array_equal(new.labels, data.labels)
    for s in SITES:
        np.testing.assert_array_equal(new.read(data.example_ids, [(s, "mean")])[(s, "mean")], rows[s])
    kept = ("run", "pool", "tags", "model", "tokenizer", "dataset_fingerprint", "lm_probe", "created", "n_examples")
    assert {k: new.metadata[k] for k in kept} == {k: old_meta[k] for k in kept}
    assert new.metadata["converted_from"] == "store schema 1" and new.metadata["schema_version"] == 2
    ds = datasets.load_from_disk(str(root / "old"))
    assert ds.num_rows == 30 and ds.column_names == [*SITES, "example_id", "label"]
    assert store_convert_command(root) == [] and "no old-format runs" in capsys.readouterr().out


def test_the_convert_command_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = {SITES[0]: rng.normal(size=(10, 4)).astype(np.float32)}
    write_old_run(tmp_path / "store" / "one", rows, rng.integers(0, 2, 10), np.arange(100, 110), chunk_rows=4)
    assert main(["store", "convert", str(tmp_path / "store" / "one")]) == 0  # a run folder works too
    assert "converted run 'one': 10 examples x 1 sites" in capsys.readouterr().out
    np.testing.assert_array_equal(StoredRun.open(tmp_path / "store" / "one").array(SITES[0])[:], rows[SITES[0]])
    assert main(["store", "convert", str(tmp_path / "missing")]) == 1
    assert "lm-probe: error: no store or run folder at" in capsys.readouterr().err


def test_a_run_that_did_not_finish_or_is_not_a_run(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "data-00000.arrow").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no state.json: .* did not finish"):
        StoredRun.open(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="no stored run at .*'hub:org/name'"):
        StoredRun.open(tmp_path / "missing")


def test_convert_refuses_a_run_with_unreadable_chunks_unless_told(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = {SITES[0]: rng.normal(size=(10, 4)).astype(np.float32)}
    root = tmp_path / "store"
    write_old_run(root / "one", rows, rng.integers(0, 2, 10), np.arange(10), chunk_rows=4)
    bad = root / "one" / "chunk_00001" / "labels.npy"
    bad.write_bytes(bad.read_bytes()[:-8])
    assert main(["store", "convert", str(root)]) == 1
    err = capsys.readouterr().err
    assert "run 'one'" in err and "1 unreadable chunks" in err and "lose their 4 rows" in err
    assert "--drop-unreadable" in err
    assert isinstance(StoredRun.open(root / "one"), LegacyRun) and (root / "one" / "chunk_00001").exists()
    assert main(["store", "convert", "--drop-unreadable", str(root)]) == 0
    assert "(4 rows of unreadable chunks left out)" in capsys.readouterr().out
    run = StoredRun.open(root / "one")
    assert isinstance(run, StoredRun) and run.n_examples == 6
    assert run.metadata["lost_rows"] == 4 and run.metadata["complete"] is False
    assert list(run.metadata["lost_chunks"]) == ["chunk_00001"]
    np.testing.assert_array_equal(run.array(SITES[0])[:], np.r_[rows[SITES[0]][:4], rows[SITES[0]][8:]])
    assert sorted(p.name for p in root.iterdir()) == ["one"]  # no staging or backup folder left


def test_an_old_format_run_is_renamed_and_removed_but_converted_before_pushing(tmp_path):
    rng = np.random.default_rng(1)
    rows = {SITES[0]: rng.normal(size=(6, 4)).astype(np.float32)}
    root = tmp_path / "store"
    write_old_run(root / "old", rows, rng.integers(0, 2, 6), np.arange(6), chunk_rows=4)
    run = StoredRun.open(root / "old")
    with pytest.raises(ValueError, match="plain folder name"):
        run.rename("../out")
    assert run.rename("renamed") is run and run.path == root / "renamed" and not (root / "old").exists()
    again = StoredRun.open(root / "renamed")
    assert isinstance(again, LegacyRun) and again.name == "renamed"
    np.testing.assert_array_equal(again.array(SITES[0])[:], rows[SITES[0]])
    for action in (lambda: again.push_to_hub("org/x"), lambda: again.dataset):
        with pytest.raises(ValueError, match="old format: .* convert first with `lm-probe store convert .*renamed`"):
            action()
    with pytest.raises(ValueError, match="confirm=True"):
        again.remove()
    again.remove(confirm=True)
    assert not (root / "renamed").exists()


def test_a_run_with_unreadable_metadata_is_skipped_with_a_warning(three_runs, logs):
    _, root = three_runs
    (root / "b" / "dataset_info.json").write_text("{not json")
    index = ActivationStore.open(root)
    assert index.table["run"].tolist() == ["a", "c"] and names(index.runs()) == ["a", "c"]
    assert any("run 'b' is skipped, its metadata is unreadable" in m for m in logs)
