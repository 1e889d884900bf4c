"""Saving and loading probes: arrays + JSON, identical predictions, clear refusals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lm_probe import ProbeConfig, ProbeDataset, ProbeRunner, load_model
from lm_probe.testing import POSITIVE, tiny_model, tiny_tokenizer, toy_texts

FIT = dict(batch_size=16, eval_every=5, patience=3, num_epochs=1)


@pytest.fixture(scope="module")
def trained(gpt2, toy):
    train, test = toy
    configs = [ProbeConfig("transformer.h.1.output", name="lin", class_weight={0: 1.0, 1: 2.0},
                           label_names=["neg", "pos"]),
               ProbeConfig("transformer.h.2.output", name="mlp", head="mlp", hidden_size=8),
               ProbeConfig("transformer.h[-1].output", name="ctl", pool="last", control=True)]
    runner = ProbeRunner(gpt2, configs, progress=False).fit_probes(train, test, **FIT)
    return runner, test


def test_round_trip_gives_identical_predictions_without_pickle(trained, gpt2, tmp_path):
    runner, test = trained
    runner.save(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["arrays.npz", "probes.json"]
    np.load(tmp_path / "run" / "arrays.npz", allow_pickle=False).files  # no object arrays
    batch = next(test.batches(len(test)))
    feats = runner.get_probe_features(batch.input_ids, batch.attention_mask)
    for model in (None, gpt2):
        back = ProbeRunner.load(tmp_path / "run", model=model)
        assert list(back.probes) == list(runner.probes) == ["lin", "mlp", "ctl", "ctl [control]"]
        assert back["lin"].config.label_names == ["neg", "pos"] and back["mlp"].config.label_names is None
        for name, probe in runner.probes.items():
            X = feats[name.replace(" [control]", "")]
            np.testing.assert_array_equal(back[name].predict_proba(X), probe.predict_proba(X))
            assert back[name].stopped_reason_ == probe.stopped_reason_ and back[name].n_steps_ == probe.n_steps_
        pd.testing.assert_frame_equal(back.metrics, runner.metrics, check_dtype=False)
    assert back["lin"].estimator_.get_params()["class_weight"] == {0: 1.0, 1: 2.0}
    again = back.evaluate(test)  # the loaded runner with a model traces again
    np.testing.assert_allclose(again["accuracy"], runner.metrics["accuracy"])


def test_regression_round_trip(gpt2, tmp_path):
    texts, _ = toy_texts(120, seed=6)
    share = np.array([sum(w in POSITIVE for w in t.split()) / len(t.split()) for t in texts])
    data = ProbeDataset.from_texts(texts, share, tokenizer=tiny_tokenizer())
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.0.output", task="regression", name="r"),
                                ProbeConfig("transformer.h.0.output", task="regression", head="mlp", name="m")],
                         progress=False).fit_probes(data, **FIT)
    runner.save(tmp_path / "reg")
    back = ProbeRunner.load(tmp_path / "reg")
    X = runner.pooled(data)[("transformer.h.0.output", "mean")]
    for name in ("r", "m"):
        np.testing.assert_array_equal(back[name].predict(X), runner[name].predict(X))


def test_refusals(trained, tmp_path):
    runner, _ = trained
    runner.save(tmp_path / "run")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        runner.save(tmp_path / "run")
    runner.save(tmp_path / "run", overwrite=True)
    doc = json.loads((tmp_path / "run" / "probes.json").read_text())
    assert doc["model"] == {"name": None, "model_type": "gpt2", "num_hidden_layers": 4, "hidden_size": 32}
    other = load_model(tiny_model("gpt2", hidden=64), tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="hidden size 32 .* this model has hidden size 64"):
        ProbeRunner.load(tmp_path / "run", model=other)
    doc["schema_version"] = 7
    (tmp_path / "run" / "probes.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="schema 7.*upgrade lm_probe"):
        ProbeRunner.load(tmp_path / "run")


def test_all_nan_metric_columns_read_back_as_numbers():
    """JSON stores an all-NaN column as nulls; pandas would read it back as objects. Every
    numeric metric column, prefixed (baseline_, control_) or suffixed (_lo, _hi, _mean, _std),
    reads back as floats; text columns stay text."""
    from lm_probe.probes.persist import _metrics

    frame = pd.DataFrame({"accuracy": [0.5, 0.75], "baseline_recall_at_fpr": [np.nan, np.nan],
                          "control_accuracy_lo": [np.nan, np.nan], "selectivity_hi": [np.nan, np.nan],
                          "auroc_std": [np.nan, np.nan], "site": ["a", "b"], "stopped_reason": [None, None]},
                         index=pd.Index(["p", "q"], name="probe"))
    split = json.loads(frame.to_json(orient="split"))
    back = _metrics(split)
    for column in ("accuracy", "baseline_recall_at_fpr", "control_accuracy_lo", "selectivity_hi", "auroc_std"):
        assert back[column].dtype == np.float64, column
    assert back["site"].tolist() == ["a", "b"] and back["stopped_reason"].isna().all()
    pd.testing.assert_frame_equal(back.drop(columns="stopped_reason"), frame.drop(columns="stopped_reason"))
