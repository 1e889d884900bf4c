"""The random-init baseline: the copy's weights are the architecture's own init under the
seed, the user's model and random state are untouched, the copy's probes see the main
run's batches, a planted feature separates the two, refusals come before any forward,
and the baseline round-trips through save/load and experiment files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, log_loss

from lm_probe import ProbeConfig, ProbeDataset, ProbeRunner, load_model
from lm_probe.core.sites import SiteError
from lm_probe.core.sources import NoSource
from lm_probe.probes.baseline import check_baseline, random_init_copy, with_baseline
from lm_probe.testing import WORDS, tiny_model, tiny_tokenizer

from conftest import count_calls

FIT = dict(batch_size=16, num_epochs=2, eval_every=5, patience=3)


def planted(family: str = "gpt2", *, hidden: int = 8, n: int = 400):
    """A tiny model that carries the label, and its task: each word of the vocabulary gets a
    random polarity written into embedding dimension 0; a sentence (odd length, no ties) is
    positive when its polarities sum above zero. A re-initialized copy loses the direction,
    and ``hidden`` random dimensions cannot fit the polarity of all the words linearly."""
    hf, tok = tiny_model(family, layers=2, hidden=hidden, seed=0), tiny_tokenizer()
    polarity = np.where(np.random.default_rng(1).random(len(WORDS)) < 0.5, -1.0, 1.0)
    with torch.no_grad():
        hf.get_input_embeddings().weight[tok.convert_tokens_to_ids(list(WORDS)), 0] = torch.tensor(
            polarity, dtype=torch.float32)
    rng = np.random.default_rng(2)
    words = [rng.integers(len(WORDS), size=int(rng.choice([5, 7, 9, 11]))) for _ in range(n)]
    texts = [" ".join(WORDS[i] for i in k) for k in words]
    labels = np.array([int(polarity[k].sum() > 0) for k in words])
    model = load_model(hf, tokenizer=tok)
    data = ProbeDataset.from_texts(texts, labels, tokenizer=model.tokenizer, max_length=32)
    return model, data.tt_split(0.25, seed=0)


def sites(model, layers=(0, 1)):
    prefix = "transformer.h" if "GPT2" in type(model._module).__name__ else "model.layers"
    return [ProbeConfig(f"{prefix}.{i}.output") for i in layers]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def task(request):
    return planted(request.param)


@pytest.fixture(scope="module")
def fitted(task):
    model, (train, test) = task
    return ProbeRunner(model, sites(model), baseline="random_init", seed=3, progress=False).fit_probes(
        train, test, **FIT)


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------- the copy
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_copy_is_the_architectures_init_under_the_seed(family, tmp_path):
    """A model loaded from a folder (loading marks its weights initialized) whose norms were
    changed too: the copy equals a fresh model of the same config whose ``_init_weights``
    ran on every module under the same seed; the original and the global RNG are untouched."""
    hf = tiny_model(family, layers=2, hidden=16, seed=5)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.5)  # what a trained model's norms look like: not ones
    hf.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    before, rng = state(model._module), torch.get_rng_state()

    copy = random_init_copy(model, seed=11)

    assert torch.equal(torch.get_rng_state(), rng), "the caller's random state is left as it was"
    after = state(model._module)
    assert all(torch.equal(before[k], after[k]) for k in before), "the user's model is not changed"
    reference = type(hf)(hf.config)  # independent: the architecture's _init_weights on a fresh model
    torch.manual_seed(11)
    with torch.no_grad():
        reference.apply(reference._init_weights)
    reference.tie_weights()
    got, want = state(copy._module), state(reference)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    changed = [k for k in before if not torch.equal(before[k], got[k])]
    assert any("embed" in k or "wte" in k for k in changed) and any("norm" in k or "ln" in k for k in changed)
    assert copy.tokenizer is model.tokenizer
    again, other = random_init_copy(model, seed=11), random_init_copy(model, seed=12)
    assert all(torch.equal(v, state(again._module)[k]) for k, v in got.items()), "same seed, same copy"
    assert not torch.equal(got[changed[0]], state(other._module)[changed[0]])


def test_the_user_model_and_random_state_are_untouched_by_a_fit(task):
    model, (train, test) = task
    before, rng = state(model._module), torch.get_rng_state()
    runner = ProbeRunner(model, sites(model, [1]), baseline="random_init", progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    runner.fit_probes(train, test, **FIT)
    assert all(torch.equal(v, state(model._module)[k]) for k, v in before.items())
    assert runner.baseline_runner.model is not model and runner.baseline_runner.baseline_runner is None


# ---------------------------------------------------------------- the fit
def test_a_planted_feature_separates_the_trained_model_from_its_random_init(fitted, task):
    """On the planted task the trained model's probes beat the random-init copy's by a wide
    margin: accuracy, log-loss, and the online codelength of the same training labels."""
    metrics = fitted.metrics
    assert (metrics["accuracy"] >= 0.85).all(), metrics["accuracy"]
    assert (metrics["accuracy"] - metrics["baseline_accuracy"] >= 0.1).all(), metrics[["accuracy", "baseline_accuracy"]]
    assert (metrics["baseline_loss"] > metrics["loss"] + 0.03).all()
    assert (metrics["baseline_codelength_bits"] > metrics["codelength_bits"]).all()
    assert (metrics["baseline_uniform_bits"] == metrics["uniform_bits"]).all(), "the same rows coded"


def test_the_baseline_columns_are_the_copys_own_scores(fitted, task):
    """``baseline_accuracy`` and ``baseline_loss`` recomputed with scikit-learn from the
    copy's probes on rows pooled from the copy."""
    _, (_, test) = task
    other = fitted.baseline_runner
    acts = other.pooled(test)
    for name, probe in other.probes.items():
        X = acts[(probe.config.site, probe.config.pool)]
        assert fitted.metrics.loc[name, "baseline_accuracy"] == pytest.approx(
            accuracy_score(test.labels, probe.predict(X)), abs=1e-12)
        assert fitted.metrics.loc[name, "baseline_loss"] == pytest.approx(
            log_loss(test.labels, probe.predict_proba(X), labels=probe.classes_), rel=1e-9)
    assert {"baseline_accuracy", "baseline_loss", "baseline_f1"} <= set(fitted.metrics.columns)
    assert "baseline_site" not in fitted.metrics and "baseline_n_steps" not in fitted.metrics


def test_the_copy_is_trained_on_the_same_batches(task, monkeypatch):
    """Every example the main run reads, in the same batches and order, the copy reads too."""
    model, (train, test) = task
    runner = ProbeRunner(model, sites(model), baseline="random_init", seed=4, progress=False)
    seen: dict[str, list] = {"main": [], "baseline": []}
    for key, source in (("main", runner.source), ("baseline", runner.baseline_runner.source)):
        read = source.read
        monkeypatch.setattr(source, "read", lambda batch, *a, _r=read, _k=key, **kw: (
            seen[_k].append(batch.index.tolist()), _r(batch, *a, **kw))[1])
    runner.fit_probes(train, test, **FIT)
    assert seen["main"] and seen["main"] == seen["baseline"]
    assert sum(len(b) for b in seen["main"]) >= len(train) + len(test) - len(train) // 5


def test_same_seed_same_numbers(task, fitted):
    model, (train, test) = task
    again = ProbeRunner(model, sites(model), baseline="random_init", seed=3, progress=False).fit_probes(
        train, test, **FIT)
    pd.testing.assert_frame_equal(again.metrics, fitted.metrics)


def test_with_baseline_copies_every_metric_column_by_prefix():
    metrics = pd.DataFrame({"accuracy": [0.9, 0.8], "site": ["a", "b"], "n_steps": [3, 4]}, index=["p", "q"])
    baseline = pd.DataFrame({"site": ["b", "a"], "accuracy": [0.6, 0.5], "accuracy_lo": [0.4, 0.3],
                             "accuracy_hi": [0.7, 0.6], "codelength_bits": [30.0, 20.0], "n_steps": [4, 3],
                             "stopped_early": [True, False]}, index=["q", "p"])
    merged = with_baseline(metrics, baseline)
    assert list(merged.columns) == ["accuracy", "site", "n_steps", "baseline_accuracy", "baseline_accuracy_lo",
                                    "baseline_accuracy_hi", "baseline_codelength_bits"]
    assert merged["baseline_accuracy"].tolist() == [0.5, 0.6] and merged["baseline_codelength_bits"].tolist() == [20, 30]


# ---------------------------------------------------------------- refusals
def test_unknown_baselines_and_runs_without_weights_are_refused_before_any_forward(task):
    model, _ = task
    calls, handle = count_calls(model._module)
    try:
        with pytest.raises(ValueError, match=r"baseline must be None or one of \['random_init'\], got 'random'"):
            ProbeRunner(model, sites(model), baseline="random")
        with pytest.raises(ValueError, match="a remote run"):
            ProbeRunner(model, sites(model), baseline="random_init", remote="local")
        with pytest.raises(ValueError, match="has no model"):
            ProbeRunner.from_source(NoSource(), sites(model), baseline="random_init")

        class Run:  # a stored run whose every (site, pool) is there
            def check(self, **_):
                pass

        with pytest.raises(ValueError, match="has no model"):
            ProbeRunner.from_store(Run(), sites(model), baseline="random_init")
    finally:
        handle.remove()
    assert calls["n"] == 0
    assert check_baseline(None) is None and check_baseline("random_init") == "random_init"


def test_a_bad_site_is_refused_before_the_model_is_copied(task, monkeypatch):
    """The site check comes first: a typo costs no deep copy and no re-initialization."""
    import lm_probe.probes.baseline as baseline_module

    model, _ = task
    copies = []
    monkeypatch.setattr(baseline_module, "random_init_copy", lambda *a, **k: copies.append(a))
    with pytest.raises(SiteError, match="no_such_module"):
        ProbeRunner(model, [ProbeConfig("no_such_module.output")], baseline="random_init")
    assert copies == []


# ---------------------------------------------------------------- persistence, experiment files
def test_save_and_load_keep_the_baseline(fitted, task, tmp_path):
    _, (_, test) = task
    fitted.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "baseline" / "probes.json").exists()
    loaded = ProbeRunner.load(tmp_path / "saved")
    pd.testing.assert_frame_equal(loaded.metrics, fitted.metrics)
    pd.testing.assert_frame_equal(loaded.baseline_runner.metrics, fitted.baseline_runner.metrics)
    acts = fitted.baseline_runner.pooled(test)
    for name, probe in fitted.baseline_runner.probes.items():
        X = acts[(probe.config.site, probe.config.pool)]
        np.testing.assert_array_equal(loaded.baseline_runner[name].predict_proba(X), probe.predict_proba(X))
    with_model = ProbeRunner.load(tmp_path / "saved", fitted.model)  # the copy re-drawn under the saved seed
    again = with_model.baseline_runner.pooled(test)
    assert all(np.array_equal(again[k], v) for k, v in acts.items())
    plain = ProbeRunner.from_source(NoSource(), fitted.configs)
    plain.save(tmp_path / "saved", overwrite=True)  # a runner without one leaves no stale baseline/
    assert not (tmp_path / "saved" / "baseline").exists() and ProbeRunner.load(tmp_path / "saved").baseline_runner is None


def test_the_experiment_file_key(tmp_path):
    from conftest import tiny_experiment_folder
    from lm_probe.app.experiment import load_experiment
    from lm_probe.app.outputs import run_plan
    from lm_probe.app.plan import plan_experiment
    from lm_probe.app.problems import ExperimentError

    tiny_experiment_folder(tmp_path, family="gpt2", layers=2, n=80, seed=3)
    text = ('out = "run"\n[model]\nname = "tiny"\n[data]\npath = "toy.csv"\nmax_length = 24\n'
            '[sites]\nkind = "resid_post"\n[probes]\nnum_epochs = 1\nbaseline = "{}"\n')
    (tmp_path / "bad.toml").write_text(text.format("random"))
    with pytest.raises(ExperimentError, match="random_init"):
        load_experiment(tmp_path / "bad.toml")
    (tmp_path / "exp.toml").write_text(text.format("random_init"))
    plan = plan_experiment(load_experiment(tmp_path / "exp.toml"), progress=False)
    assert "baseline:   random_init" in plan.describe() and plan.runs[0].runner.baseline_runner is not None
    run_plan(plan)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv", index_col=0)
    assert metrics["baseline_accuracy"].between(0, 1).all() and len(metrics) == 2
    assert (tmp_path / "run" / "probes" / "baseline" / "probes.json").exists()
    (tmp_path / "none.toml").write_text(text.format("none").replace('"run"', '"run2"'))
    assert plan_experiment(load_experiment(tmp_path / "none.toml"), progress=False).runs[0].runner.baseline_runner \
        is None
