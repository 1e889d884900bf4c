"""``torchrun --nproc-per-node 2 -m lm_probe run exp.toml`` (issue 18): the run folder equals the one
of a single-process ``lm-probe run`` of the same experiment with the doubled batch_size; rank 0
alone writes it; a bad experiment fails on both ranks with the one-line error before any forward.

The reference is the single-process command (run in this process); the two ranks are gloo CPU
processes of one thread, launched with torchrun by subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lm_probe.app.cli import main

from conftest import tiny_experiment_folder

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120

EXPERIMENT = """
out = "{out}"
[model]
name = "tiny"
[data]
path = "toy.csv"
max_length = 24
test_size = 0.25
batch_size = {batch_size}
[sites]
paths = ["model.layers.{{0..1}}.output"]
[probes]
pool = ["mean", "last"]
num_epochs = 2
eval_every = 1
patience = 2
control = true
[geometry]
sample_limit = 256
[gauges]
n_samples = 24
knn = 5
n_eigs = 8
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_ddp")
    tiny_experiment_folder(root, family="llama", layers=2, n=70, seed=5)
    (root / "one.toml").write_text(EXPERIMENT.format(out="one", batch_size=16))
    (root / "two.toml").write_text(EXPERIMENT.format(out="two", batch_size=8))
    (root / "typo.toml").write_text(EXPERIMENT.format(out="typo", batch_size=8).replace("patience", "patiense"))
    return root


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "lm_probe", "run", "--no-progress", *args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)


def files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def test_two_ranks_write_the_folder_of_one_process_with_the_doubled_batch(folder):
    done = torchrun(str(folder / "two.toml"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert main(["run", "--no-progress", str(folder / "one.toml")]) == 0
    one, two = folder / "one", folder / "two"
    # one set of files, and the same files as one process (rank 1 wrote nothing of its own)
    assert files(two) == files(one) and "metrics.csv" in files(two) and "geometry/eigenvalues.npz" in files(two)
    # rank 0 alone printed the plan and the files it wrote
    assert done.stdout.count("experiment: ") == 1 and done.stdout.count(f"wrote {two / 'metrics.csv'}") == 1
    a, b = pd.read_csv(one / "metrics.csv", index_col=0), pd.read_csv(two / "metrics.csv", index_col=0)
    assert list(a.index) == list(b.index) and list(a.columns) == list(b.columns) and len(a) == 4
    for column in a.columns:
        if pd.api.types.is_numeric_dtype(a[column]):
            np.testing.assert_allclose(b[column], a[column], rtol=1e-5, atol=1e-7, err_msg=column)
        else:
            assert list(b[column]) == list(a[column]), column
    for name in ("cka_matrix.csv", "metrics.csv"):
        x, y = pd.read_csv(one / "geometry" / name), pd.read_csv(two / "geometry" / name)
        numeric = x.select_dtypes("number").columns
        np.testing.assert_allclose(y[numeric], x[numeric], rtol=1e-5, atol=1e-7, err_msg=name)
    x, y = np.load(one / "geometry" / "eigenvalues.npz"), np.load(two / "geometry" / "eigenvalues.npz")
    assert sorted(x.files) == sorted(y.files)
    for key in x.files:
        np.testing.assert_allclose(y[key], x[key], rtol=1e-5, atol=1e-9)
    x, y = pd.read_csv(one / "gauges" / "eigenvalues.csv"), pd.read_csv(two / "gauges" / "eigenvalues.csv")
    np.testing.assert_allclose(y["eigenvalue"], x["eigenvalue"], rtol=1e-5, atol=1e-9)
    meta = json.loads((two / "run.json").read_text())
    assert meta["data"]["batch_size"] == 8 and meta["data"]["n_examples"] == 70


def test_a_bad_experiment_fails_on_both_ranks_with_the_one_line_error(folder):
    done = torchrun(str(folder / "typo.toml"))
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("lm-probe: error: ")]
    assert len(lines) == 2 and lines[0] == lines[1], done.stderr[-4000:]
    assert "unknown key 'patiense' in [probes]; did you mean 'patience'?" in lines[0]
    assert "lm_probe/app" not in done.stderr and not (folder / "typo").exists()  # torchrun's own traceback only


def test_an_output_folder_that_holds_a_run_stops_both_ranks_before_any_forward(folder, tmp_path):
    held = tmp_path / "held"
    held.mkdir()
    (held / "metrics.csv").write_text("probe\n")
    done = torchrun("--out", str(held), str(folder / "two.toml"))
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("lm-probe: error: ")]
    assert len(lines) == 2 and all(f"the output folder {held} already holds a run" in x for x in lines)
    assert sorted(p.name for p in held.iterdir()) == ["metrics.csv"]


def test_a_missing_experiment_file_is_reported_by_both_ranks(folder):
    missing = torchrun(str(folder / "missing.toml"))
    lines = [line for line in missing.stderr.splitlines() if line.startswith("lm-probe: error: ")]
    assert missing.returncode != 0 and len(lines) == 2 and "does not exist" in lines[0]
