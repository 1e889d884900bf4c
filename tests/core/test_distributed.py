"""Data parallelism (issue 18): two torchrun ranks with batch_size=b give what one process gives
with batch_size=2b; mismatched ranks fail at start; a failing rank ends the run.

The two-rank runs launch ``torchrun --nproc-per-node 2`` (gloo, CPU, one thread per rank) on
tests/core/ddp_child.py, whose ``run`` is also the single-process reference.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ddp_child
from lm_probe import ActivationStore, ProbeRunner
from lm_probe.core.distributed import DistributedMismatchError, _differences, shard_rows
from lm_probe.core.sources import TraceSource

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240


def torchrun(scenario: str, out: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run ddp_child.py on 2 ranks; returns the finished process and its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(ddp_child.__file__)), scenario, str(out)]
    start = time.monotonic()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    return done, time.monotonic() - start


def test_shards_are_contiguous_cover_the_batch_and_differ_by_at_most_one():
    for n in range(1, 12):
        for world in (1, 2, 3, 4):
            parts = [np.arange(n)[shard_rows(n, world, r)] for r in range(world)]
            expected = np.array_split(np.arange(n), world)  # numpy's own split, the reference
            assert [p.tolist() for p in parts] == [e.tolist() for e in expected]


def test_differences_name_each_key_and_rank():
    lines = _differences([{"seed": 0, "sites": ["a"]}, {"seed": 0, "sites": ["b"]}])
    assert lines == ["sites: rank 0 has ['a'], rank 1 has ['b']"]
    assert _differences([{"seed": 1}, {"seed": 1}]) == []
    assert issubclass(DistributedMismatchError, ValueError)


def test_one_process_is_not_wrapped_and_distributed_true_needs_a_group(llama):
    assert not torch.distributed.is_initialized()
    runner = ProbeRunner(llama, ddp_child.configs(), progress=False)
    assert isinstance(runner.source, TraceSource) and runner.world == 1
    with pytest.raises(ValueError, match="init_process_group"):
        ProbeRunner(llama, ddp_child.configs(), progress=False, distributed=True)


def test_two_ranks_equal_one_process_with_the_doubled_batch(tmp_path):
    done, _ = torchrun("equal", tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in (0, 1)]
    one = ddp_child.run(batch_size=16, folder=tmp_path / "one")
    assert [r["world"] for r in ranks] == [2, 2] and one["world"] == 1
    assert [r["wrote"] for r in ranks] == [True, False] and one["wrote"]
    for got in ranks:
        # activations: the 13 test rows (one global batch smaller than 2b: shards of 7 and 6), every
        # token, and a single example (rank 1's shard is empty)
        for key in ("acts", "tokens", "one"):
            assert got[key].keys() == one[key].keys()
            for request, rows in one[key].items():
                assert got[key][request].shape == rows.shape
                np.testing.assert_allclose(got[key][request], rows, rtol=0, atol=1e-6)
        assert got["cache"] == one["cache"] == 91  # the replay cache holds every fit row on each rank
        for name, probe in one["probes"].items():
            mine = got["probes"][name]
            # the same early-stopping decisions, at the same steps, and the same predictions
            assert (mine["n_steps"], mine["stop"], mine["best_step"]) == (
                probe["n_steps"], probe["stop"], probe["best_step"])
            np.testing.assert_array_equal(mine["predictions"], probe["predictions"])
            np.testing.assert_allclose(mine["coef"], probe["coef"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(mine["intercept"], probe["intercept"], rtol=1e-5, atol=1e-6)
        for col in ("accuracy", "f1", "n_steps", "n_scored", "control_accuracy", "selectivity"):
            np.testing.assert_array_equal(got["metrics"][col].to_numpy(float), one["metrics"][col].to_numpy(float))
        np.testing.assert_allclose(got["metrics"]["loss"], one["metrics"]["loss"], rtol=1e-5)
        for key in ("geometry_fit", "geometry_collect"):
            for site, values in one[key].items():
                np.testing.assert_allclose(got[key][site], values, rtol=1e-5, atol=1e-9)
    assert one["probes"]["l1"]["stop"] == "patience"  # early stopping was exercised
    # rank 0 alone wrote the store and the saved probes: the same as one process's
    two_store = ActivationStore.open(tmp_path / "store").run("default")
    one_store = ActivationStore.open(tmp_path / "one" / "store").run("default")
    np.testing.assert_array_equal(two_store.example_ids, one_store.example_ids)
    np.testing.assert_array_equal(two_store.labels, one_store.labels)
    np.testing.assert_allclose(two_store.array("model.layers.2.output")[:], one_store.array("model.layers.2.output")[:],
                               rtol=0, atol=1e-6)
    saved = ProbeRunner.load(tmp_path / "probes")
    for name, probe in one["probes"].items():
        np.testing.assert_allclose(saved[name].coef_, probe["coef"], rtol=1e-5, atol=1e-6)
    # both ranks ran the same probe updates on the same rows: bit for bit the same weights
    for name in one["probes"]:
        np.testing.assert_array_equal(ranks[0]["probes"][name]["coef"], ranks[1]["probes"][name]["coef"])


def test_mismatched_sites_fail_at_start_on_every_rank(tmp_path):
    done, _ = torchrun("mismatch", tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("DistributedMismatchError") >= 2  # raised on both ranks
    assert "set up differently" in done.stderr and "model.layers.0.output" in done.stderr


def test_other_data_on_a_rank_fails_at_its_first_batch_before_its_rows_are_used(tmp_path):
    done, _ = torchrun("data", tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("DistributedMismatchError: the ranks made different batches") >= 2


def test_an_exception_on_rank_1_ends_both_ranks(tmp_path):
    done, seconds = torchrun("raise", tmp_path)
    assert done.returncode != 0
    assert "RuntimeError: boom on rank 1" in done.stderr
    assert seconds < 60  # torchrun ends rank 0 at once, well before the 60 s collective timeout


def test_a_gauge_measuring_a_model_shards_its_subset_over_the_ranks(tmp_path):
    """DiffusionGauge.measure under 2 ranks with batch_size 4: each rank runs half of the 20 subset
    examples forward, and both get the spectra of one process with batch_size 8."""
    done, _ = torchrun("gauge", tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    one = ddp_child.gauge(batch_size=8)
    assert one["rows"] == 20 and len(one["eigenvalues"]) == 2
    for rank in (0, 1):
        got = pickle.loads((tmp_path / f"gauge{rank}.pkl").read_bytes())
        assert got["rows"] == 10 and got["sites"] == one["sites"]  # batches of 8, 8, 4: shares of 4, 4, 2
        np.testing.assert_allclose(got["eigenvalues"], one["eigenvalues"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(got["gap"], one["gap"], rtol=0, atol=1e-9)
