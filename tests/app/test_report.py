"""report.html: self-contained, every section present, every figure renders in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lm_probe import load_model
from lm_probe.app.experiment import load_experiment
from lm_probe.app.outputs import run_plan
from lm_probe.app.plan import plan_experiment
from lm_probe.app.report import load_run, render_report, write_report

from conftest import tiny_experiment_folder

EXPERIMENT = """
name = "tiny report"
out = "run"
[model]
name = "tiny"
[data]
path = "toy.csv"
max_length = 24
[sites]
kind = "resid_post"
[probes]
pool = ["mean", "last"]
control = true
num_epochs = 1
baseline = "random_init"
[geometry]
[gauges]
n_samples = 24
knn = 5
n_eigs = 8
"""
#: accuracy and selectivity (the random-init baseline dashed), compression by layer where the probes
#: measured an online codelength, spectrum metrics, CKA heatmap, diffusion spectra, spectral gap
N_FIGURES = 5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    tiny_experiment_folder(root, family="gpt2", layers=3, n=80, seed=3)
    (root / "exp.toml").write_text(EXPERIMENT)
    run_plan(plan_experiment(load_experiment(root / "exp.toml"), progress=False))
    return root / "run"


@pytest.fixture(scope="module")
def n_figures(run_dir) -> int:
    """:data:`N_FIGURES`, plus the compression figure where the probes measured an online codelength."""
    return N_FIGURES + int("compression" in pd.read_csv(run_dir / "metrics.csv", nrows=1).columns)


@pytest.fixture(scope="module")
def page(run_dir) -> str:
    return (run_dir / "report.html").read_text()


def test_self_contained(page, n_figures):
    sources = re.findall(r"""\bsrc\s*=\s*["']([^"']*)""", page)
    assert len(sources) == n_figures and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.findall(r"""\bhref\s*=\s*["']?\s*(?:https?:|//)""", page), "no link leaves the page"
    assert not re.search(r"<link\b|@import|url\(|<iframe|<object|<embed", page)
    assert all(s.startswith("<script>") for s in re.findall(r"<script[^>]*>", page)), "inline scripts only"


def test_sections_and_metadata(page, run_dir):
    for section in ('id="metadata"', 'id="probes"', 'id="geometry"', 'id="gauges"'):
        assert section in page
    for alt in ("probe metrics by layer", "spectrum metrics by layer", "CKA heatmap", "diffusion spectra",
                "spectral gap by layer"):
        assert f'alt="{alt}"' in page
    assert "GPT2LMHeadModel, 3 layers, hidden size 32" in page
    assert "selectivity = accuracy - control-task accuracy" in page
    assert "dashed lines: the same probes on a randomly initialized copy of the model" in page
    assert "<th>baseline_accuracy</th>" in page  # the metrics table
    assert "6 (classification), each with a control-task twin" in page
    assert "transformer.h.2.output/last" in page  # the metrics table
    assert "error bars: 95% percentile bootstrap interval" in page
    for column in ("accuracy_lo", "accuracy_hi", "selectivity_lo", "auroc", "ece", "recall_at_fpr"):
        assert f"<th>{column}</th>" in page, column
    record = load_run(run_dir)
    assert list(record.cka.index) == ["transformer.h.0.output", "transformer.h.1.output", "transformer.h.2.output"]
    assert record.gauge["eigenvalues"].map(len).tolist() == [8, 8, 8]


def test_rebuilt_from_the_files_alone(run_dir, page, tmp_path):
    """lm-probe report RUN_DIR gives the same page from metrics.csv, geometry/, gauges/ and run.json."""
    from lm_probe.app.cli import main

    assert main(["report", str(run_dir), "--output", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").read_text() == page


def test_sections_that_did_not_run_say_so(run_dir):
    record = load_run(run_dir)
    record.geometry = record.cka = record.gauge = None
    record.figures = []
    html = render_report(record)
    assert "Geometry did not run here (no [geometry] table in the experiment file)" in html
    assert "No diffusion gauge ran here" in html
    assert html.count("<img ") == 2  # the probes' metrics by layer and their compression by layer
    assert 'alt="compression by layer"' in html


def test_not_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a run folder: it has no run.json"):
        write_report(tmp_path)


# ---------------------------------------------------------------- headless Chromium
def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and Path("/usr/bin/chromium").exists():
        found = "/usr/bin/chromium"
    if found is None:
        if os.environ.get("LM_PROBE_REQUIRE_CHROMIUM") == "1":
            pytest.fail("LM_PROBE_REQUIRE_CHROMIUM=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium); "
                    "set LM_PROBE_REQUIRE_CHROMIUM=1 to make this a failure")
    return found


def _headless(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def _figures_loaded(tmp_path: Path, html: Path) -> str:
    dom = _headless(tmp_path, "--virtual-time-budget=5000", "--dump-dom", html.as_uri()).stdout
    match = re.search(r'<body[^>]*data-figures="([^"]*)"', dom)
    assert match, f"no body in Chromium's DOM: {dom[:300]!r}"
    return match.group(1)


def test_every_figure_renders_in_chromium(run_dir, tmp_path, n_figures):
    assert _figures_loaded(tmp_path, run_dir / "report.html") == f"{n_figures}/{n_figures}"
    shots = Path(os.environ.get("LM_PROBE_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "report.png"
    shot.unlink(missing_ok=True)
    _headless(tmp_path, f"--screenshot={shot}", "--window-size=1280,3600", (run_dir / "report.html").as_uri())
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (3600, 1280)
    assert pixels.std() > 20, "the screenshot is not blank"
    dark = (pixels < 128).mean(axis=1) > 0.01  # rows with text or plot lines
    assert dark[: 1200].mean() > 0.2 and dark[1200: 2400].mean() > 0.2, "content all the way down"


def test_the_figure_check_can_fail(run_dir, tmp_path, n_figures):
    """A corrupted image is counted as not rendered (so the check above means something)."""
    page = (run_dir / "report.html").read_text()
    broken = re.sub(r'src="data:image/png;base64,[A-Za-z0-9+/]{40}', 'src="data:image/png;base64,AAAA', page,
                    count=1)
    assert broken != page
    (tmp_path / "broken.html").write_text(broken)
    assert _figures_loaded(tmp_path, tmp_path / "broken.html") == f"{n_figures - 1}/{n_figures}"


def test_compression_by_layer_where_the_metrics_carry_it(run_dir):
    """The compression figure joins the probes' section once ``metrics`` has a compression
    column; the plot draws each probe's value, and the random-init copy's dashed."""
    from lm_probe.app.plots import plot_compression_by_layer

    record = load_run(run_dir)
    record.figures = []
    metrics = record.metrics.drop(columns=["compression", "baseline_compression"], errors="ignore")
    with pytest.raises(ValueError, match="no 'compression' column"):
        plot_compression_by_layer(metrics)
    layers = metrics["layer"].to_numpy(float)
    record.metrics = metrics.assign(compression=1.5 + layers, baseline_compression=1.1 + 0 * layers)
    html = render_report(record)
    assert 'alt="compression by layer"' in html and html.count("<img ") == N_FIGURES + 1
    fig = plot_compression_by_layer(record.metrics)
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    trained, random_init = lines["transformer.h.*.output (mean)"], lines["transformer.h.*.output (mean), random init"]
    assert trained.get_ydata().tolist() == [1.5, 2.5, 3.5] and random_init.get_ydata().tolist() == [1.1] * 3
    assert random_init.get_linestyle() == "--" and random_init.get_color() == trained.get_color()


def test_the_accuracy_plot_draws_the_random_init_baseline_dashed(run_dir):
    from lm_probe.app.plots import plot_accuracy_by_layer

    metrics = load_run(run_dir).metrics
    fig = plot_accuracy_by_layer(metrics)
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    mean = metrics[metrics["pool"] == "mean"].sort_values("layer")
    baseline = lines["transformer.h.*.output (mean), random init"]
    np.testing.assert_allclose(baseline.get_ydata(), mean["baseline_accuracy"].to_numpy(float))
    assert baseline.get_linestyle() == "--"




def test_accuracy_error_bars_span_the_bootstrap_interval():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.container import ErrorbarContainer

    from lm_probe.app.plots import plot_probe_metrics_by_layer

    metrics = pd.DataFrame({"site": [f"model.layers.{i}.output" for i in range(3)], "pool": "mean",
                            "layer": [0, 1, 2], "accuracy": [0.6, 0.7, 0.8], "accuracy_lo": [0.5, 0.65, 0.81],
                            "accuracy_hi": [0.7, 0.75, 0.9]})
    fig = plot_probe_metrics_by_layer(metrics, ("accuracy",))
    bars = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1
    segments = bars[0].lines[2][0].get_segments()
    # each bar from lo to hi; a lower bound above the point (0.81 > 0.8) is drawn from the point
    np.testing.assert_allclose([(s[0][1], s[1][1]) for s in segments], [(0.5, 0.7), (0.65, 0.75), (0.8, 0.9)])
