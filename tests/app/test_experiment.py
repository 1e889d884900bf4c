"""Experiment files: parsing, checks before any forward, sweeps, outputs equal to the Python API."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lm_probe import DiffusionGauge, Geometry, ProbeConfig, ProbeDataset, ProbeRunner, load_model
from lm_probe.app.braces import expand_braces, parse_layers
from lm_probe.app.experiment import load_experiment, parse_experiment
from lm_probe.app.outputs import cka_matrix, run_plan, seed_summary
from lm_probe.app.plan import plan_experiment
from lm_probe.app.problems import ExperimentError
from lm_probe.app.tables import read_table
from lm_probe.functional.spectra import linear_cka
from lm_probe.testing import toy_texts

from conftest import tiny_experiment_folder

BATCH = 32


# ---------------------------------------------------------------- shared material
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with a tiny saved model and the same toy data as CSV, JSONL and a saved dataset."""
    import datasets

    root = tmp_path_factory.mktemp("experiment")
    texts, labels = tiny_experiment_folder(root, family="llama", layers=4, n=120, seed=1, text_column="review")
    (root / "toy.jsonl").write_text("".join(json.dumps({"review": t, "label": int(y)}) + "\n"
                                            for t, y in zip(texts, labels)))
    datasets.Dataset.from_dict({"review": texts, "label": labels.tolist()}).save_to_disk(str(root / "toy_saved"))
    return root


@pytest.fixture(scope="module")
def model(workdir):
    return load_model(str(workdir / "tiny"))


def experiment_text(**tables: str) -> str:
    """A small valid experiment; keyword arguments replace whole tables (text after the header)."""
    parts = {
        "top": 'seed = 0\nout = "out"',
        "model": 'name = "tiny"',
        "data": 'path = "toy.csv"\ntext_column = "review"\nmax_length = 32\ntest_size = 0.25\nbatch_size = 32',
        "sites": 'paths = ["model.layers.{1..2}.output"]',
        "probes": 'pool = ["mean", "last"]\nalpha = [1e-4, 1e-3]\nnum_epochs = 2\neval_every = 2\npatience = 3',
        "geometry": "sample_limit = 512",
        "gauges": "n_samples = 24\nknn = 5\nn_eigs = 8",
    }
    parts.update(tables)
    text = parts.pop("top") + "\n"
    return text + "".join(f"\n[{name}]\n{body}\n" for name, body in parts.items() if body is not None)


def write(folder: Path, text: str, name: str = "exp.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def errors(workdir: Path, text: str, match: str, model=None) -> None:
    """The file fails with an ExperimentError matching ``match``, before any forward pass."""
    calls = {"n": 0}

    def count(*_):
        calls["n"] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        with pytest.raises(ExperimentError, match=match):
            exp = load_experiment(write(workdir, text, "bad.toml"), out=workdir / "never")
            plan_experiment(exp, model=model, progress=False)
    finally:
        handle.remove()
    assert calls["n"] == 0, "errors must come before any forward pass"
    assert not (workdir / "never").exists()


FULL_PROBES = ('pool = ["mean", "last"]\nalpha = [1e-4, 1e-3]\ncontrol = true\nnum_epochs = 2\neval_every = 2\n'
               "patience = 3")


@pytest.fixture(scope="module")
def full_run(workdir, model):
    """One complete run (seed 0): 8 probes and their 8 control twins, geometry and a gauge,
    with the model's forward passes counted. Shared by the tests below."""
    text = experiment_text(probes=FULL_PROBES)
    exp = load_experiment(write(workdir, text, "full.toml"), out=workdir / "runs" / "full")
    plan = plan_experiment(exp, model=model, progress=False)
    calls = {"n": 0}
    handle = model._module.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        run_plan(plan)
    finally:
        handle.remove()
    return plan, workdir / "runs" / "full", calls["n"]


# ---------------------------------------------------------------- ranges and layers
def test_brace_ranges_expand_inclusively():
    assert expand_braces("model.layers.{0..3}.output") == [f"model.layers.{i}.output" for i in range(4)]
    assert expand_braces("h.{0..6..3}.x") == ["h.0.x", "h.3.x", "h.6.x"]
    assert expand_braces("h.{0..1}.{attn,mlp}.output") == ["h.0.attn.output", "h.0.mlp.output",
                                                          "h.1.attn.output", "h.1.mlp.output"]
    assert expand_braces("model.layers.-1.output") == ["model.layers.-1.output"]
    assert expand_braces("h.{-2..-1}.output") == ["h.-2.output", "h.-1.output"]


@pytest.mark.parametrize("pattern, match", [
    ("h.{3..1}.output", r"is empty: first \(3\) is after last \(1\)"),
    ("h.{0..4..0}.output", "step must be at least 1"),
    ("h.{0-3}.output", r"cannot expand \{0-3\}"),
    ("h.{0..3.output", "unbalanced braces"),
    ("h.{a,}.output", r"cannot expand \{a,\}"),
])
def test_bad_brace_ranges(pattern, match):
    with pytest.raises(ExperimentError, match=match):
        expand_braces(pattern)


def test_layers_values():
    assert parse_layers("0..9..3") == [0, 3, 6, 9]
    assert parse_layers("{1..2}") == [1, 2]
    assert parse_layers("all") == "all"
    assert parse_layers(-1) == [-1]
    assert parse_layers([0, 2]) == [0, 2]
    with pytest.raises(ExperimentError, match="use 'all', an index"):
        parse_layers("first-three")


# ---------------------------------------------------------------- keys and types
@pytest.mark.parametrize("tables, match", [
    ({"top": "sed = 0"}, r"unknown table or key 'sed' in the top level; did you mean 'seed'\?"),
    ({"model": 'nmae = "tiny"'}, r"unknown key 'nmae' in \[model\]; did you mean 'name'\?"),
    ({"data": 'path = "toy.csv"\ntext_colum = "review"'}, r"unknown key 'text_colum' in \[data\]; did you mean "
                                                          "'text_column'"),
    ({"sites": 'kinds = "resid_post"'}, r"unknown key 'kinds' in \[sites\]; did you mean 'kind'\?"),
    ({"probes": "lerning_rate = 'constant'"}, r"unknown key 'lerning_rate' in \[probes\]; did you mean "
                                              r"'learning_rate'\? valid: .*alpha"),
    ({"geometry": "sample_limt = 100"}, r"unknown key 'sample_limt' in \[geometry\]; did you mean 'sample_limit'"),
    ({"gauges": "n_sample = 10"}, r"unknown key 'n_sample' in \[gauges\]; did you mean 'n_samples'"),
])
def test_unknown_keys_are_named_at_every_level(tmp_path, tables, match):
    with pytest.raises(ExperimentError, match=match):
        load_experiment(write(tmp_path, experiment_text(**tables)))


@pytest.mark.parametrize("tables, match", [
    ({"data": 'path = "toy.csv"\nbatch_size = "16"'}, r"\[data\]: batch_size must be an integer, got '16'"),
    ({"probes": 'pool = "avg"'}, r"\[probes\]: pool = 'avg' is not one of 'mean', 'last', 'first', 'max'"),
    ({"probes": 'pool = ["mean", "avg"]'}, r"pool \(each item\) = 'avg' is not one of"),
    ({"probes": "control = 1"}, r"control must be true/false or a list, got 1"),
    ({"probes": "num_epochs = [1, 2]"}, r"num_epochs must be an integer, got \[1, 2\]"),
    ({"probes": "alpha = []"}, r"alpha = \[\] sweeps over nothing"),
    ({"probes": "alpha = [0.1, 0.1]"}, "lists a value twice"),
    ({"probes": "random_state = 3"}, "'random_state' cannot be set: it is set from seed/seeds"),
    ({"probes": 'head = "mlp"\neta0 = 0.1'}, r"'eta0' is not an argument of the estimator of head \['mlp'\]"),
    ({"probes": "num_epochs = 0"}, r"\[probes\]: num_epochs = 0 must be at least 1"),
    ({"probes": "hidden_size = [32, 0]"}, r"hidden_size \(each item\) = 0 must be at least 1"),
    ({"probes": "val_size = 1.5"}, "val_size = 1.5 must be a share below 1"),
    ({"probes": "ci = 1.0"}, r"ci = 1.0 must be a coverage strictly between 0 and 1"),
    ({"probes": "n_boot = -1"}, r"\[probes\]: n_boot = -1 must be at least 0"),
    ({"gauges": "n_samples = 1"}, r"\[gauges\]: n_samples = 1 must be at least 2"),
    ({"top": "seed = 0\nseeds = [1, 2]"}, "give seed = N or seeds"),
    ({"top": "seeds = [1, 1]"}, "lists a seed twice"),
    ({"model": None}, r"missing table \[model\]"),
    ({"model": 'dtype = "float32"'}, r"\[model\] needs 'name'"),
    ({"data": 'source = "rotten_tomatoes"\npath = "toy.csv"'}, "exactly one of source"),
    ({"data": 'path = "toy.csv"\ntest_size = 1.5'}, "test_size must be a share"),
    ({"sites": ""}, r"\[sites\] names no site"),
    ({"top": "seed = 0\n[model]\nname = 'x'"}, "not valid TOML"),
])
def test_bad_values_are_named(tmp_path, tables, match):
    with pytest.raises(ExperimentError, match=match):
        load_experiment(write(tmp_path, experiment_text(**tables)))


def test_error_messages_name_the_file(tmp_path):
    with pytest.raises(ExperimentError, match=r"^.*exp\.toml: unknown table or key"):
        load_experiment(write(tmp_path, experiment_text(top="sed = 1")))
    with pytest.raises(ExperimentError, match="does not exist"):
        load_experiment(tmp_path / "nope.toml")


def test_a_gauges_table_defaults_to_the_api_defaults(workdir):
    """A key left out of [gauges] means what leaving it out of DiffusionGauge(...) means."""
    gauges = parse_experiment(experiment_text(gauges="knn = 5"), base=workdir).gauges
    api = inspect.signature(DiffusionGauge).parameters
    assert gauges.n_samples == api["n_samples"].default == 512
    for key in ("pool", "alpha", "normalization", "n_eigs", "bandwidth", "sparse", "self_loops", "n_pca", "t"):
        assert getattr(gauges, key) == api[key].default, key


# ---------------------------------------------------------------- data
def test_csv_jsonl_and_saved_dataset_read_the_same_rows(workdir):
    exp = parse_experiment(experiment_text(), base=workdir)
    tables = [read_table(exp.data.__class__(**{**exp.data.__dict__, "path": p}), workdir)
              for p in ("toy.csv", "toy.jsonl", "toy_saved")]
    texts, labels = toy_texts(120, seed=1)
    for table in tables:
        assert table.texts == texts
        np.testing.assert_array_equal(table.labels, labels)
        assert table.label_names is None


def test_named_labels_map_in_sorted_order(tmp_path):
    pd.DataFrame({"text": ["good film", "bad film", "fun", "dull"], "label": ["pos", "neg", "pos", "neg"]}).to_csv(
        tmp_path / "named.csv", index=False)
    exp = parse_experiment(experiment_text(data='path = "named.csv"'), base=tmp_path)
    table = read_table(exp.data, tmp_path)
    np.testing.assert_array_equal(table.labels, [1, 0, 1, 0])
    assert table.label_names == ["neg", "pos"]


def test_named_labels_run_from_a_csv(tmp_path, model):
    """``lm-probe run`` on string labels: names map to integers, and messages and outputs use the names."""
    texts, labels = toy_texts(60, seed=5)
    frame = pd.DataFrame({"text": texts, "label": np.array(["neg", "pos"])[labels]})
    frame.to_csv(tmp_path / "named.csv", index=False)
    text = experiment_text(data='path = "named.csv"\ntest_size = 0.25', probes="num_epochs = 1", geometry=None,
                           gauges=None)
    plan = plan_experiment(load_experiment(write(tmp_path, text)), model=model, progress=False)
    assert plan.runs[0].examples.label_names == ["neg", "pos"]
    assert f"classes 0 (neg): {int(np.sum(labels == 0))}, 1 (pos): {int(np.sum(labels == 1))}" in plan.describe()
    run_plan(plan)
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv", index_col=0)
    assert len(metrics) == 2 and metrics["accuracy"].notna().all()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["data"]["label_names"] == ["neg", "pos"]
    frame.loc[0, "label"] = "neutral"  # one example of a third class: the split names it
    frame.to_csv(tmp_path / "named.csv", index=False)
    errors(tmp_path, text, r"classes \[1 \(neutral\)\] have a single example", model)


def test_missing_column_names_the_columns(workdir, model):
    errors(workdir, experiment_text(data='path = "toy.csv"\ntext_column = "reviews"'),
           r"\[data\] text_column = 'reviews' is not a column of toy.csv; did you mean 'review'\? "
           r"Its columns are \['review', 'label'\]", model)
    errors(workdir, experiment_text(data='path = "toy.csv"'), "text_column = 'text' is not a column", model)


@pytest.mark.parametrize("rows, match", [
    ('{"text": "good film", "label": 1}\n{"text": "bad", "label": null}\n', "row 2 has no label"),
    ('{"text": "good film", "label": 1}\n{"text": "bad"}\n', "row 2 has no label"),
    ('{"text": "good film", "label": 1}\n{"text": "bad", "label": 0.5}\n', "row 2 has the label 0.5, not a class"),
    ('{"text": "good film", "label": 1}\n{"text": "bad", "label": "neg"}\n', "labels mix names and numbers"),
    ('{"text": "good film", "label": 1}\n{"text": "  ", "label": 0}\n', "row 2 has an empty text"),
    ('{"text": "good film", "label": 1}\n{"text": 7, "label": 0}\n', "row 2 has 7 as text"),
    ('{"text": "good film", "label": 1}\nnot json\n', "line 2 is not JSON"),
])
def test_bad_rows_are_named(tmp_path, rows, match):
    (tmp_path / "bad.jsonl").write_text(rows)
    exp = parse_experiment(experiment_text(data='path = "bad.jsonl"'), base=tmp_path)
    with pytest.raises(ExperimentError, match=match):
        read_table(exp.data, tmp_path)


def test_model_that_does_not_load(workdir):
    errors(workdir, experiment_text(model='name = "toy_saved"'),
           r"\[model\] name = 'toy_saved' did not load as the folder .*toy_saved: ")
    errors(workdir, experiment_text(model='name = "smollm2-135"'),
           r"\[model\] name = 'smollm2-135': .*did you mean the embedded model 'smollm2-135m'\?")


def test_data_problems_found_before_any_forward(workdir, model):
    errors(workdir, experiment_text(data='path = "missing.csv"'), r"path 'missing.csv' does not exist", model)
    errors(workdir, experiment_text(data='path = "toy_saved"\nsplit = "train"'), "holds a single Dataset", model)
    errors(workdir, experiment_text(data='path = "toy.csv"\ntext_column = "review"\nn_examples = 500'),
           "n_examples = 500 but the data has 120 rows", model)
    errors(workdir, experiment_text(gauges="n_samples = 200"), r"\[gauges\] n_samples = 200 but the gauge draws "
                                                               "from 81 examples", model)


# ---------------------------------------------------------------- sites, sweeps, options
def test_sites_from_kinds_and_ranges(workdir, model):
    text = experiment_text(sites='kind = ["resid_post", "mlp_out"]\nlayers = "0..2..2"')
    plan = plan_experiment(load_experiment(write(workdir, text, "kinds.toml"), out=workdir / "o1"), model=model,
                           progress=False)
    assert plan.sites == ["model.layers.0.output", "model.layers.2.output",
                          "model.layers.0.mlp.output", "model.layers.2.mlp.output"]


def test_site_problems_found_before_any_forward(workdir, model):
    errors(workdir, experiment_text(sites='paths = ["model.layrs.{0..1}.output"]'),
           r"\[sites\] site 'model.layrs.0.output'.*Closest valid sites", model)
    errors(workdir, experiment_text(sites='paths = ["model.layers.1.output"]\nkind = "resid_post"\nlayers = [1]'),
           "site 'model.layers.1.output' is listed twice", model)
    errors(workdir, experiment_text(sites='kind = "resid_post"\nlayers = "0..7"'),
           r"layers = '0..7'.*index 4 is out of range; LlamaForCausalLM has 4 layers", model)
    errors(workdir, experiment_text(geometry='sites = ["model.layers.9.output"]'), "index 9 is out of range", model)


def test_option_values_checked_before_any_forward(workdir, model):
    errors(workdir, experiment_text(probes="alpha = -1.0"),
           r"probe 'model.layers.1.output': The 'alpha' parameter of OnlineSGDClassifier must be", model)
    errors(workdir, experiment_text(gauges="n_samples = 24\nnormalization = 'markov'\nalpha = 2.0"),
           r"\[gauges\] alpha must be in \[0, 1\]", model)
    errors(workdir, experiment_text(gauges="n_samples = 24\nknn = 30"), r"\[gauges\] knn=30", model)


def test_sweep_names_and_count(workdir, model):
    text = experiment_text(probes='pool = ["mean", "last"]\nalpha = [1e-4, 1e-3]\neta0 = 0.01\ncontrol = true')
    plan = plan_experiment(load_experiment(write(workdir, text, "sweep.toml"), out=workdir / "o2"), model=model,
                           progress=False)
    names = [p.name for p in plan.probes]
    assert len(names) == 2 * 2 * 2 == len(set(names))
    assert names[:4] == ["model.layers.1.output/mean/alpha=0.0001", "model.layers.1.output/mean/alpha=0.001",
                         "model.layers.1.output/last/alpha=0.0001", "model.layers.1.output/last/alpha=0.001"]
    config = plan.probes[1].config
    assert (config.pool, config.probe_kwargs["alpha"], config.probe_kwargs["eta0"], config.control) == \
        ("mean", 1e-3, 0.01, True)
    runner = plan.runs[0].runner
    assert len(runner.probes) == 16, "every probe has its control twin, all on one runner"
    described = plan.describe()
    assert "probes:     8 = 2 sites x pool ['mean', 'last'] x alpha [0.0001, 0.001], 8 with a control twin" in described
    assert all(f"  {n}" in described for n in names)


def test_solver_sweep_runs_both_solvers_on_one_trace(workdir, model):
    text = experiment_text(probes='solver = ["sgd", "lbfgs"]\nnum_epochs = 2\ncache_budget_mib = 64', geometry=None,
                           gauges=None)
    plan = plan_experiment(load_experiment(write(workdir, text, "solver.toml"), out=workdir / "o_solver"),
                           model=model, progress=False)
    assert [p.name for p in plan.probes][:2] == ["model.layers.1.output/solver=sgd",
                                                 "model.layers.1.output/solver=lbfgs"]
    assert "cache budget 64 MiB" in plan.describe()
    run_plan(plan)
    metrics = pd.read_csv(workdir / "o_solver" / "metrics.csv", index_col=0)
    assert sorted(set(metrics["solver"])) == ["lbfgs", "sgd"]
    lbfgs = metrics[metrics["solver"] == "lbfgs"]
    assert lbfgs["C"].notna().all() and (lbfgs["n_epochs"] == 1).all() and lbfgs["alpha"].isna().all()


def test_interval_keys_reach_the_metrics(workdir, model):
    """``[probes] ci`` and ``n_boot`` set the intervals: a wider coverage on the same resamples
    gives a wider interval around the same point, and n_boot = 0 gives none."""
    def run(name, keys):
        text = experiment_text(probes=f'pool = "mean"\nnum_epochs = 1\n{keys}', geometry=None, gauges=None)
        run_plan(plan_experiment(load_experiment(write(workdir, text, f"{name}.toml"), out=workdir / name),
                                 model=model, progress=False))
        return pd.read_csv(workdir / name / "metrics.csv", index_col=0), json.loads((workdir / name / "run.json")
                                                                                   .read_text())
    narrow, meta = run("o_ci80", "ci = 0.8\nn_boot = 200")
    wide, _ = run("o_ci99", "ci = 0.99\nn_boot = 200")
    none, _ = run("o_nboot0", "n_boot = 0")
    assert (meta["ci"], meta["n_boot"]) == (0.8, 200)
    assert narrow["accuracy"].tolist() == wide["accuracy"].tolist() == none["accuracy"].tolist()
    assert (wide["accuracy_lo"] <= narrow["accuracy_lo"]).all() and (wide["accuracy_hi"] >= narrow["accuracy_hi"]).all()
    assert ((wide["accuracy_hi"] - wide["accuracy_lo"]) > (narrow["accuracy_hi"] - narrow["accuracy_lo"])).any()
    assert not [c for c in none.columns if c.endswith(("_lo", "_hi"))]


def test_lbfgs_with_an_sgd_argument_is_refused(workdir, model):
    errors(workdir, experiment_text(probes='solver = "lbfgs"\nalpha = 1e-3'),
           r"unknown LogisticRegression arguments \['alpha'\]", model)


# ---------------------------------------------------------------- a full run
def test_full_run_writes_every_output(full_run):
    plan, out, _ = full_run
    for name in ("metrics.csv", "run.json", "config.json", "experiment.toml", "report.html", "probes/probes.json",
                 "geometry/metrics.csv", "geometry/cka_matrix.csv", "gauges/trajectory.csv",
                 "gauges/eigenvalues.csv"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "run.json").read_text())
    assert meta["consumers"] == ["probes", "geometry", "gauges"]
    assert meta["model"] == {"name": "tiny", "model_type": "llama", "num_hidden_layers": 4, "hidden_size": 32,
                             "class": "LlamaForCausalLM"}
    assert meta["data"]["n_train"] + meta["data"]["n_test"] == 120
    assert meta["site_layers"]["model.layers.2.output"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["probes"]["estimator"] == {"alpha": [1e-4, 1e-3]} and config["data"]["max_length"] == 32
    assert len(config["resolved_probes"]) == 8


def test_one_trace_per_batch_for_the_whole_sweep(full_run):
    """16 probes, geometry and a gauge share each forward pass: the count is that of one probe."""
    plan, _, forwards = full_run
    run = plan.runs[0]
    probes = run.runner.probes.values()
    assert len(probes) == 16
    batches = lambda n: -(-n // BATCH)  # noqa: E731
    n_val = len(run.train) - run.n_fit
    # the training examples are traced once (the first epoch); the second epoch is replayed from the cache
    assert max(p.n_steps_ for p in probes) > batches(run.n_fit)
    assert forwards == batches(n_val) + batches(run.n_fit) + batches(len(run.test)) + batches(24)  # + the gauge
    assert run.geometry.n_rows_ == run.n_fit, "geometry saw each training example once, though 2 epochs ran"


def test_full_run_metrics_equal_the_python_api(full_run, workdir):
    """The independent reference: the same run written by hand with the Python API."""
    _, out, _ = full_run
    metrics = pd.read_csv(out / "metrics.csv", index_col=0)
    model = load_model(str(workdir / "tiny"))
    frame = pd.read_csv(workdir / "toy.csv")
    data = ProbeDataset.from_texts(frame["review"].tolist(), frame["label"].to_numpy(), model.tokenizer,
                                   max_length=32)
    train, test = data.tt_split(0.25, seed=0)
    configs = [ProbeConfig(f"model.layers.{i}.output", pool=pool, alpha=alpha, control=True,
                           name=f"model.layers.{i}.output/{pool}/alpha={alpha}")
               for i in (1, 2) for pool in ("mean", "last") for alpha in (1e-4, 1e-3)]
    runner = ProbeRunner(model, configs, seed=0, progress=False)
    runner.fit_probes(train, test, batch_size=32, num_epochs=2, eval_every=2, patience=3)
    reference = runner.metrics
    assert list(metrics.index) == list(reference.index)
    for column in ("accuracy", "loss", "f1", "matthews", "n_steps", "selectivity", "control_accuracy"):
        np.testing.assert_allclose(metrics[column].to_numpy(float), reference[column].to_numpy(float),
                                   rtol=1e-12, err_msg=column)
    assert list(metrics["variant"][:2]) == ["mean/alpha=0.0001", "mean/alpha=0.001"]
    assert metrics["accuracy"].max() > 0.7, "the toy task is learnable"


def test_full_run_geometry_equals_one_pass_over_the_fit_set(full_run):
    """Geometry rides the probes' training pass but sees each fit example once (2 epochs ran)."""
    plan, out, _ = full_run
    run = plan.runs[0]
    fit = run.train.tt_split(0.1, seed=0)[0]
    reference = Geometry(plan.sites, pool="mean", seed=0)
    ProbeRunner(plan.model, progress=False).collect(fit, [reference], batch_size=32)
    saved = Geometry.load(out / "geometry")
    assert saved.metrics["n_rows"].tolist() == [len(fit)] * 2
    for column in ("d_pr", "stable_rank", "top1_share"):
        np.testing.assert_allclose(saved.metrics[column], reference.metrics[column], rtol=1e-6, err_msg=column)
    np.testing.assert_allclose(saved.novelty["linear_cka"], reference.novelty["linear_cka"], rtol=1e-6)


def test_cka_matrix_against_its_definition(full_run):
    plan, out, _ = full_run
    cka = pd.read_csv(out / "geometry" / "cka_matrix.csv", index_col=0)
    np.testing.assert_allclose(np.diag(cka), 1.0, rtol=1e-12)
    np.testing.assert_allclose(cka.to_numpy(), cka.to_numpy().T, rtol=1e-12)
    # the sample holds every row here (fewer rows than sample_limit): the streamed consecutive CKA agrees
    novelty = Geometry.load(out / "geometry").novelty
    np.testing.assert_allclose(cka.iloc[0, 1], novelty["linear_cka"].iloc[0], rtol=1e-8)
    # and the feature-space formula on random data with different widths
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 7))
    y = x @ rng.normal(size=(7, 4)) + 0.5 * rng.normal(size=(50, 4))
    xc, yc = x - x.mean(0), y - y.mean(0)
    frame = cka_matrix({"a": x, "b": y}, ["a", "b"])
    assert frame.loc["a", "b"] == pytest.approx(linear_cka(xc.T @ yc, xc.T @ xc, yc.T @ yc), rel=1e-12)
    assert np.isnan(cka_matrix({"a": x, "c": np.ones((50, 3))}, ["a", "c"]).loc["a", "c"])


def test_every_problem_is_reported_in_one_check(full_run, workdir, model):
    """A file with mistakes in three tables and an output folder that holds a run: one check
    reports all of them (the file's problems too, when read with strict=False), the folder last."""
    _, held, _ = full_run
    text = experiment_text(data='path = "toy.csv"\ntext_column = "reveiw"',
                           sites='paths = ["model.layers.1.output", "model.layers.7.output", '
                                 '"model.layers.1.mlpp.output"]',
                           probes="alpha = 1e-3\nnum_epoch = 2\npool = \"avg\"")
    path = write(workdir, text, "mistakes.toml")
    with pytest.raises(ExperimentError) as strict:
        load_experiment(path, out=held)
    assert sorted(p[:30] for p in strict.value.problems) == ["[probes]: pool = 'avg' is not ",
                                                             "unknown key 'num_epoch' in [pr"]
    exp = load_experiment(path, out=held, strict=False)
    assert exp.invalid == {"probes"} and len(exp.problems) == 2
    with pytest.raises(ExperimentError) as err:
        plan_experiment(exp, model=model, progress=False)
    problems = err.value.problems
    assert len(problems) == 6, problems
    assert "text_column = 'reveiw' is not a column of toy.csv; did you mean 'review'?" in problems[2]
    assert "'model.layers.7.output'" in problems[3] and "'model.layers.1.mlpp.output'" in problems[4]
    assert problems[5].startswith(f"the output folder {held} already holds a run")
    assert str(err.value).startswith(f"{path}: 6 problems:\n  - ")


def test_long_texts_are_counted_among_the_rows_used(tmp_path, model, logs):
    texts, labels = toy_texts(120, seed=6)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(tmp_path / "toy.csv", index=False)
    text = experiment_text(data='path = "toy.csv"\nn_examples = 40\nmax_length = 8', probes="num_epochs = 1",
                           geometry=None, gauges=None)
    plan = plan_experiment(load_experiment(write(tmp_path, text)), model=model, progress=False)
    used = plan.runs[0].examples.texts
    long = sum(len(model.tokenizer(t)["input_ids"]) > 8 for t in used)
    assert 0 < long < 40 and len(used) == 40
    assert [m for m in logs if "longer than max_length" in m] == [
        f"{long} of 40 texts are longer than max_length=8 tokens and were truncated to their first 8 tokens; "
        "raise max_length to keep them whole"]


def test_existing_run_is_not_overwritten_without_asking(full_run, workdir, model):
    _, out, _ = full_run
    with pytest.raises(ExperimentError, match="already holds a run .*pass --overwrite"):
        plan_experiment(load_experiment(workdir / "full.toml", out=out), model=model, progress=False)
    assert plan_experiment(load_experiment(workdir / "full.toml", out=out), model=model, progress=False,
                           overwrite=True).overwrite


def test_several_seeds_and_same_seed_same_files(full_run, workdir, model):
    """seeds = [0, 1]: seed_0/ repeats the single run of seed 0 byte for byte; seed 1 differs."""
    _, single, _ = full_run
    text = experiment_text(top='seeds = [0, 1]\nout = "runs/seeds"', probes=FULL_PROBES)
    plan = plan_experiment(load_experiment(write(workdir, text, "seeds.toml")), model=model, progress=False)
    run_plan(plan)
    out = workdir / "runs" / "seeds"
    for name in ("metrics.csv", "geometry/metrics.csv", "geometry/novelty.csv", "geometry/cka_matrix.csv",
                 "gauges/trajectory.csv", "gauges/eigenvalues.csv"):
        assert (out / "seed_0" / name).read_text() == (single / name).read_text(), name
    combined = pd.read_csv(out / "metrics.csv", index_col=0)
    assert sorted(combined["seed"].unique()) == [0, 1] and len(combined) == 16
    seed0, seed1 = combined[combined["seed"] == 0], combined[combined["seed"] == 1]
    assert not np.allclose(seed1["loss"], seed0["loss"]), "another seed, another split"
    for name in ("accuracy", "auroc", "ece", "selectivity", "loss"):  # mean and sample std over the 2 seeds
        a, b = seed0[name], seed1[name].loc[seed0.index]
        for frame in (seed0, seed1):
            np.testing.assert_allclose(frame[f"{name}_seed_mean"].loc[seed0.index], (a + b) / 2, rtol=1e-12)
            np.testing.assert_allclose(frame[f"{name}_seed_std"].loc[seed0.index], np.abs(a - b) / np.sqrt(2),
                                       rtol=1e-9, atol=1e-15)
    assert (combined["accuracy_lo"] <= combined["accuracy"]).all()
    assert (out / "seed_1" / "report.html").is_file() and (out / "report.html").is_file()
    assert 'href="seed_1/report.html"' in (out / "report.html").read_text()


def test_geometry_only_experiment(workdir, model):
    text = experiment_text(probes="enabled = false", gauges=None)
    plan = plan_experiment(load_experiment(write(workdir, text, "geo.toml"), out=workdir / "runs" / "geo"),
                           model=model, progress=False)
    run_plan(plan)
    out = workdir / "runs" / "geo"
    assert not (out / "metrics.csv").exists()
    assert Geometry.load(out / "geometry").metrics["n_rows"].tolist() == [120, 120], "all examples, one pass"
    assert "No probes ran" in (out / "report.html").read_text()


def test_regression_task(tmp_path, model):
    texts, labels = toy_texts(60, seed=2)
    pd.DataFrame({"text": texts, "score": labels * 2.5 + 0.25}).to_csv(tmp_path / "scores.csv", index=False)
    text = experiment_text(data='path = "scores.csv"\nlabel_column = "score"\ntest_size = 0.25',
                           probes='task = "regression"\nnum_epochs = 1', geometry=None, gauges=None)
    plan = plan_experiment(load_experiment(write(tmp_path, text)), model=model, progress=False)
    run_plan(plan)
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv", index_col=0)
    assert {"r2", "mse", "pearson", "r2_lo", "r2_hi", "pearson_lo", "mse_hi"} <= set(metrics.columns)
    assert len(metrics) == 2
    assert (metrics["mse_lo"] <= metrics["mse"]).all() and (metrics["mse"] <= metrics["mse_hi"]).all()


def test_torch_backend_from_the_file(tmp_path, workdir, model):
    """``[probes] backend = "torch"`` trains the sweep with the batched backend: the same
    metrics as the Python API with backend="torch"."""
    text = experiment_text(data=f'path = "{workdir / "toy.csv"}"\ntext_column = "review"\nmax_length = 32\n'
                                'test_size = 0.25\nbatch_size = 32',
                           probes='alpha = [1e-4, 1e-3]\nnum_epochs = 2\neval_every = 2\npatience = 3\n'
                                  'backend = "torch"', geometry=None, gauges=None)
    plan = plan_experiment(load_experiment(write(tmp_path, text)), model=model, progress=False)
    assert len(plan.runs[0].runner.bank.probes) == 4
    run_plan(plan)
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv", index_col=0)
    frame = pd.read_csv(workdir / "toy.csv")
    data = ProbeDataset.from_texts(frame["review"].tolist(), frame["label"].to_numpy(), model.tokenizer,
                                   max_length=32)
    train, test = data.tt_split(0.25, seed=0)
    configs = [ProbeConfig(f"model.layers.{i}.output", alpha=alpha, name=f"model.layers.{i}.output/alpha={alpha}")
               for i in (1, 2) for alpha in (1e-4, 1e-3)]
    reference = ProbeRunner(model, configs, seed=0, progress=False, backend="torch").fit_probes(
        train, test, batch_size=32, num_epochs=2, eval_every=2, patience=3).metrics
    np.testing.assert_allclose(metrics["accuracy"].to_numpy(float), reference["accuracy"].to_numpy(float), rtol=1e-12)
    np.testing.assert_allclose(metrics["loss"].to_numpy(float), reference["loss"].to_numpy(float), rtol=1e-9)


def test_the_step_decay_settings_reach_fit_probes(workdir, model, monkeypatch):
    """[probes] lr_decay and decay_patience are fit_probes' (0: constant steps, its None; by
    default fit_probes' own 0.5 and 3)."""
    seen = []
    monkeypatch.setattr(ProbeRunner, "fit_probes", lambda self, *a, **kw: seen.append(kw) or self)
    for body, expected in (("lr_decay = 0.25\ndecay_patience = 4", (0.25, 4)), ("lr_decay = 0", (None, 3)),
                           ("", (0.5, 3))):
        text = experiment_text(probes='pool = "mean"\nnum_epochs = 2\n' + body, geometry=None, gauges=None)
        exp = load_experiment(write(workdir, text, "decay.toml"), out=workdir / "runs" / f"decay{len(seen)}")
        try:
            run_plan(plan_experiment(exp, model=model, progress=False))
        except Exception:  # the spy trained nothing: writing the results may fail after the call
            pass
        assert (seen[-1]["lr_decay"], seen[-1]["decay_patience"]) == expected


def test_seed_summary_is_the_mean_and_sample_std_across_seeds():
    rng = np.random.default_rng(0)
    rows = [{"probe": p, "seed": s, "accuracy": rng.random(), "selectivity": rng.random() - 0.5, "n_steps": 10 + s,
             "stop_reason": "patience"} for s in (0, 1, 2) for p in ("a", "b")]
    frame = pd.DataFrame(rows).set_index("probe")
    out = seed_summary(frame)
    assert not {"n_steps_seed_mean", "stop_reason_seed_mean"} & set(out.columns), "test metrics only"
    for probe in ("a", "b"):
        for name in ("accuracy", "selectivity"):
            values = [r[name] for r in rows if r["probe"] == probe]
            mean = sum(values) / 3
            std = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5
            np.testing.assert_allclose(out.loc[probe, f"{name}_seed_mean"], mean, rtol=1e-12)
            np.testing.assert_allclose(out.loc[probe, f"{name}_seed_std"], std, rtol=1e-12)
    assert out.loc[["a"], "accuracy"].tolist() == frame.loc[["a"], "accuracy"].tolist()
