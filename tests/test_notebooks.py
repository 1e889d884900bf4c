"""The notebooks in ``notebooks/``: their saved outputs are real, and they still run.

Two kinds of test:

* cheap checks of the committed files: every code cell ran, in order, at the full setting,
  with no error, and at least one plot is embedded as a PNG (so nobody commits a cleared,
  half-run or broken notebook);
* each notebook executed end to end at its small setting (``LM_PROBE_NOTEBOOK_SMALL=1``,
  read by its first code cell) in a temporary working folder, with checks on the numbers
  its last cell collects in ``summary``. These use the embedded SmolLM2 model, so they are
  marked slow.

The kernel is this interpreter (``sys.executable``), through a kernel spec written to a
temporary folder, so the tests do not depend on which ``python3`` kernel Jupyter would find.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = [
    "01_quickstart",
    "02_token_probes_and_controls",
    "03_geometry",
    "04_diffusion_gauges",
    "05_logit_lens_and_store",
    "06_deployed_probes",
    "07_subnetwork_probing",
]
KERNEL = "lm_probe_notebook_test"
SUMMARY_MARK = "LM_PROBE_SUMMARY "


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def outputs(nb, output_type=None):
    return [o for c in code_cells(nb) for o in c.outputs if output_type in (None, o.output_type)]


def images(nb):
    return [o for o in outputs(nb) if "image/png" in o.get("data", {})]


def errors(nb):
    """Error outputs, and tracebacks printed to stderr."""
    found = [f"{o.ename}: {o.evalue}" for o in outputs(nb, "error")]
    found += [o.text for o in outputs(nb, "stream") if o.name == "stderr" and "Traceback" in o.text]
    return found


# ---------------------------------------------------------------------- committed files
def test_every_notebook_is_listed():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES
    listing = (NOTEBOOKS / "README.md").read_text()
    assert all(f"{name}.ipynb" in listing for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_its_full_run_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    cells = code_cells(nb)
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), \
        "every code cell ran once, top to bottom, in one kernel"
    assert not errors(nb)
    assert images(nb), "at least one plot is embedded as a PNG"
    assert "os.environ.get(\"LM_PROBE_NOTEBOOK_SMALL\")" in cells[0].source, "the first cell holds the settings"
    printed = "".join(o.text for o in cells[0].outputs if o.output_type == "stream")
    assert printed.startswith("SMALL=False"), "the saved outputs come from the full setting"
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "a title and intro first"


# ---------------------------------------------------------------------- small runs
@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> Path:
    """A kernel spec running this interpreter with the small setting switched on."""
    root = tmp_path_factory.mktemp("kernels")
    (root / KERNEL).mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lm_probe notebook tests",
        "language": "python",
        "env": {"LM_PROBE_NOTEBOOK_SMALL": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline"},
    }
    (root / KERNEL / "kernel.json").write_text(json.dumps(spec))
    return root


def run_small(name: str, kernel_specs: Path, workdir: Path) -> dict:
    """Execute a notebook at its small setting in ``workdir``; return its ``summary``."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        f"import json\nprint({SUMMARY_MARK!r} + json.dumps(summary, default=str))"))
    km = AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_specs)]))
    NotebookClient(nb, km=km, timeout=600, record_timing=False,
                   resources={"metadata": {"path": str(workdir)}}).execute(cleanup_kc=True)  # raises on an error
    assert not errors(nb)
    assert images(nb), "the plots were drawn"
    printed = "".join(o.text for o in code_cells(nb)[0].outputs if o.output_type == "stream")
    assert printed.startswith("SMALL=True"), "the kernel saw LM_PROBE_NOTEBOOK_SMALL=1"
    line = next(line for o in nb.cells[-1].outputs if o.output_type == "stream"
                for line in o.text.splitlines() if line.startswith(SUMMARY_MARK))
    return json.loads(line[len(SUMMARY_MARK):])


@pytest.mark.slow
def test_quickstart(kernel_specs, tmp_path):
    s = run_small("01_quickstart", kernel_specs, tmp_path)
    assert s["n_test"] == 48
    assert s["best_accuracy"] > 0.6 and s["best_accuracy"] > s["chance"] + 0.1
    assert s["best_layer"] in (0, 3, 6, 9, 12)
    # the reviewer's table: the trained model's probes code the labels shorter than uniform and
    # than the random-init copy's, and the majority baseline is the chance the notebook computed
    assert s["review_mean_compression"] > 1.0 > s["review_mean_baseline_compression"]
    assert s["review_mean_accuracy"] > s["review_mean_baseline_accuracy"]
    assert s["review_majority"] == pytest.approx(s["chance"], abs=1e-12)


@pytest.mark.slow
def test_token_probes_and_controls(kernel_specs, tmp_path):
    s = run_small("02_token_probes_and_controls", kernel_specs, tmp_path)
    assert s["n_test_tokens"] > 200
    assert s["min_accuracy"] > s["majority_share"] + 0.2, "word class is linearly decodable at every layer"
    assert s["max_control_accuracy"] < s["min_accuracy"]
    assert s["min_selectivity"] > 0.1
    assert 0 < s["unseen_test_words"] < 0.5


@pytest.mark.slow
def test_geometry(kernel_specs, tmp_path):
    s = run_small("03_geometry", kernel_specs, tmp_path)
    assert s["layer0_top1_share"] < 0.5
    assert s["mid_top1_share"] > 0.95, "massive activations: one direction carries the variance"
    assert s["mid_d_pr_token_l2"] > 10 * s["mid_d_pr_raw"], "and they are carried by a few tokens' norms"
    assert s["mid_first_token_norm_ratio"] > 10
    assert s["cka_diag_error"] < 1e-9 and s["cka_asymmetry"] < 1e-9
    assert s["cka_consecutive_max_diff"] < 0.1, "the heatmap agrees with Geometry's streamed CKA"


@pytest.mark.slow
def test_diffusion_gauges(kernel_specs, tmp_path):
    s = run_small("04_diffusion_gauges", kernel_specs, tmp_path)
    assert 0 <= s["frozen_min_gap"] <= s["frozen_max_gap"] <= 1
    assert s["frozen_p_cross_length_min"] < 0.5, "some layer's graph follows review length (chance: 0.75)"
    assert s["train_steps"] == 40
    assert s["loss_last_10"] < s["loss_first"]
    assert s["gap_end_mean"] < s["gap_start_mean"] / 5, "training splits the probe set into clusters"
    assert s["p_cross_sentiment_end_mean"] < s["p_cross_sentiment_start_mean"] / 2


@pytest.mark.slow
def test_logit_lens_and_store(kernel_specs, tmp_path):
    s = run_small("05_logit_lens_and_store", kernel_specs, tmp_path)
    assert s["final_layer_agreement"] == 1.0, "on the last block the lens is the model's own readout"
    assert s["max_head_error"] < 1e-4
    assert s["store_examples"] == 48
    assert s["store_vs_live_max_accuracy_diff"] == 0 and s["store_vs_live_max_loss_diff"] < 1e-5
    assert not list(tmp_path.iterdir()), "the store and the saved probes go to a temporary folder"


@pytest.mark.slow
def test_deployed_probes(kernel_specs, tmp_path):
    s = run_small("06_deployed_probes", kernel_specs, tmp_path)
    assert s["n_test"] == 14 and s["loaded_equals_trained"], "the loaded probes predict as the trained ones"
    assert set(s["predicted"]) == {"mean@15", "last@15"}
    assert all(set(v) <= {"rotten", "fresh"} and len(v) == 3 for v in s["predicted"].values())
    assert s["n_tokens_scored"] == 31, "every real token of the three sentences, nothing else"
    assert all(1 <= n <= 8 for n in s["n_generated"].values())
    assert s["mean_score"]["negative"]["last@15"] < 0.5 < s["mean_score"]["positive"]["last@15"]
    assert s["monitor_vs_score_tokens_max_diff"] < 1e-4, "the monitor's scores are score_tokens' on the finished text"
    assert not list(tmp_path.iterdir()), "the saved probes go to a temporary folder"


@pytest.mark.slow
def test_subnetwork_probing(kernel_specs, tmp_path):
    s = run_small("07_subnetwork_probing", kernel_specs, tmp_path)
    assert s["n_test"] == 30
    assert 0 < s["kept_fractions"][0] < 1, "the masks pruned some of the MLP weights, not all"
    assert all(0 <= a <= 1 for a in s["accuracies"])
    assert s["ablation"]["intact model"] == s["plain_accuracy"]
    assert set(s["ablation"]) == {"intact model", "subnetwork removed", "as many random weights removed",
                                  "only the subnetwork kept", "only as many random weights kept"}
    assert 0 < s["circuit"]["kept fraction"] < 1, "the circuit probe pruned some of the MLP weights, not all"
    assert set(s["circuit"]) == {"circuit's nearest-centroid test accuracy", "kept fraction",
                                 "plain probe, circuit removed", "plain probe, only the circuit kept"}
