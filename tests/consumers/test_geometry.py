"""Geometry: every metric against numpy/scipy float64 on the full activation matrix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
from sklearn.metrics.pairwise import cosine_similarity

from lm_probe import Geometry, PooledBatch, ProbeConfig, ProbeRunner
from lm_probe.functional.spectra import SAMPLE_KEYS, SPECTRUM_KEYS, spectrum_metrics

from conftest import count_calls

SITES = ["a.output", "b.output", "c.output"]


def synthetic(n=300, d=20, batch=37, seed=0):
    """Correlated, anisotropic rows at three 'sites', with a large mean, in uneven batches."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(10, 0.01, d)
    a = rng.normal(size=(n, d)) * scales + 50.0
    b = a @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=(n, d))
    c = np.tanh(b) + 0.1 * rng.normal(size=(n, d))
    full = {"a.output": a, "b.output": b, "c.output": c}
    batches = []
    for step, start in enumerate(range(0, n, batch)):
        sl = slice(start, start + batch)
        acts = {(s, "mean"): v[sl].astype(np.float32).astype(np.float64) for s, v in full.items()}
        rows = len(range(n)[sl])
        batches.append(PooledBatch(acts, np.zeros(rows, int), step, 0, np.arange(n)[sl], np.full(rows, 5)))
    return {s: np.concatenate([b.acts[(s, "mean")] for b in batches]) for s in full}, batches


def ref_spectrum(X: np.ndarray) -> dict:
    lam = np.sort(np.linalg.eigvalsh(np.cov(X.T, ddof=1)))[::-1]
    lam = np.clip(lam, 0, None)
    d = X.shape[1]
    p = lam / lam.sum()
    cum = np.cumsum(p)
    i = np.arange(10, min(200, d))
    i = i[lam[i] > 1e-300]
    return {
        "d_pr": lam.sum() ** 2 / (lam**2).sum(), "d_pr_norm": lam.sum() ** 2 / (lam**2).sum() / d,
        "d_entropy": np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))),
        "stable_rank": lam.sum() / lam[0], "top1_share": p[0], "top10_share": p[:10].sum(),
        "top32_share": p[:32].sum(), "k90": int(np.argmax(cum >= 0.9)) + 1, "k95": int(np.argmax(cum >= 0.95)) + 1,
        "log_spectrum_slope_10_200": np.polyfit(i, np.log(lam[i]), 1)[0] if len(i) >= 5 else np.nan,
    }


def ref_sample(X: np.ndarray) -> dict:
    s = np.linalg.svd(X - X.mean(0), compute_uv=False)
    s = s[s > s.max() * max(X.shape) * np.finfo(float).eps]
    cos = cosine_similarity(X)[np.triu_indices(len(X), 1)]
    e = np.cumsum(s**2) / np.sum(s**2)
    return {"sv_effective_rank": np.exp(-np.sum((s / s.sum()) * np.log(s / s.sum()))),
            "sv_stable_rank": np.sum(s**2) / s[0] ** 2, "sv_participation_ratio": np.sum(s**2) ** 2 / np.sum(s**4),
            "ve_4": e[3], "ve_8": e[7], "ve_16": e[min(16, len(s)) - 1], "ve_32": e[min(32, len(s)) - 1],
            "cos_sim_mean": cos.mean(), "cos_sim_std": cos.std()}


def ref_pair(X: np.ndarray, Y: np.ndarray, k: int) -> dict:
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    cka = np.linalg.norm(Xc.T @ Yc) ** 2 / (np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc))
    top = lambda Z: np.linalg.eigh(np.cov(Z.T))[1][:, ::-1][:, :k]
    angles = scipy.linalg.subspace_angles(top(X), top(Y))
    cos = np.sum(X * Y, 1) / (np.linalg.norm(X, axis=1) * np.linalg.norm(Y, axis=1))
    return {"linear_cka": cka, "layer_cosine_sim": cos.mean(), "feature_subspace_novelty": np.mean(np.sin(angles))}


def same_results(x, y, rtol=1e-10):
    cols = list(SPECTRUM_KEYS) + list(SAMPLE_KEYS) + ["n_rows"]
    np.testing.assert_allclose(x.metrics[cols].to_numpy(float), y.metrics[cols].to_numpy(float), rtol=rtol)
    for col in ("linear_cka", "layer_cosine_sim", "feature_subspace_novelty", "n_rows"):
        np.testing.assert_allclose(x.novelty[col].to_numpy(float), y.novelty[col].to_numpy(float), rtol=rtol)
    for site in x.eigenvalues:
        np.testing.assert_allclose(x.eigenvalues[site], y.eigenvalues[site], rtol=rtol, atol=1e-12 * x.eigenvalues[site][0])


def test_merge_with_reservoir_smaller_than_data_is_exact_for_moments():
    full, batches = synthetic(n=500)
    one, a, b = (Geometry(SITES, sample_limit=64, seed=s) for s in (0, 1, 2))
    for batch in batches:
        one.update(batch)
    for batch in batches[:5]:
        a.update(batch)
    for batch in batches[5:]:
        b.update(batch)
    merged = a.merge(b).compute()
    result = one.compute()
    np.testing.assert_allclose(merged.metrics[list(SPECTRUM_KEYS)].to_numpy(float),
                               result.metrics[list(SPECTRUM_KEYS)].to_numpy(float), rtol=1e-10)
    np.testing.assert_allclose(merged.novelty["linear_cka"], result.novelty["linear_cka"], rtol=1e-10)
    assert a._sample["a.output"].shape == (64, 20)


@pytest.mark.parametrize("merged", [False, True])
def test_reservoir_is_uniform(merged):
    """Each of 20 rows lands in a 5-row sample with probability 1/4 (single pass or merged)."""
    counts = np.zeros(20)
    trials = 3000
    for seed in range(trials):
        rows = np.arange(20, dtype=float)[:, None] * np.ones((1, 2))
        make = lambda s: Geometry(["x.output", "y.output"], sample_limit=5, seed=s)
        batch = lambda lo, hi: PooledBatch({("x.output", "mean"): rows[lo:hi], ("y.output", "mean"): rows[lo:hi]},
                                           np.zeros(hi - lo, int), n_tokens=np.ones(hi - lo, int))
        if merged:
            g, other = make(seed), make(seed + 10**6)
            g.update(batch(0, 3)), g.update(batch(3, 8)), other.update(batch(8, 20))
            g.merge(other)
        else:
            g = make(seed)
            for lo in range(0, 20, 3):
                g.update(batch(lo, min(lo + 3, 20)))
        picked = g._sample["x.output"][:, 0].astype(int)
        assert len(set(picked)) == 5 and np.array_equal(picked, g._sample["y.output"][:, 1].astype(int))
        counts[picked] += 1
    freq = counts / trials
    # binomial sd of a frequency near 0.25 over 3000 trials is 0.0079: allow 4.5 sd
    assert np.all(np.abs(freq - 0.25) < 0.036), freq.round(3)


def test_same_seed_same_sample_and_numbers():
    _, batches = synthetic(n=400)
    runs = []
    for _ in range(2):
        g = Geometry(SITES, sample_limit=32, seed=5)
        for batch in batches:
            g.update(batch)
        runs.append(g.compute())
    pd.testing.assert_frame_equal(runs[0].metrics, runs[1].metrics)


def test_non_finite_rows_are_counted_and_left_out_everywhere(logs):
    full, batches = synthetic(n=100, batch=50)
    batches[0].acts[("b.output", "mean")][3, 0] = np.nan
    batches[1].acts[("c.output", "mean")][7, 2] = np.inf
    g = Geometry(SITES, sample_limit=200)
    for batch in batches:
        g.update(batch)
    keep = np.ones(100, bool)
    keep[[3, 57]] = False
    assert g.n_nonfinite_ == 2 and list(g.metrics["n_rows"]) == [98] * 3
    assert g.metrics.loc["a.output", "d_pr"] == pytest.approx(ref_spectrum(full["a.output"][keep])["d_pr"], rel=1e-9)
    assert any("non-finite" in m for m in logs)


def test_too_few_rows_give_nan_with_a_reason():
    g = Geometry(["a.output", "b.output"])
    g.update(PooledBatch({("a.output", "mean"): np.ones((1, 4)), ("b.output", "mean"): np.ones((1, 4))},
                         np.zeros(1, int), n_tokens=np.ones(1, int)))
    m = g.metrics
    assert m.loc["a.output", "reason"] == "fewer than 2 rows" and np.isnan(m.loc["a.output", "d_pr"])
    assert g.novelty.loc[0, "reason"] == "fewer than 2 rows"
    empty = Geometry(["a.output"], pool="none")
    empty.update(PooledBatch({("a.output", "none"): np.zeros((0, 4))}, np.zeros(2, int), n_tokens=np.zeros(2, int)))
    assert empty.metrics.loc["a.output", "reason"].startswith("no rows")


def test_spectrum_slope_needs_five_points_and_zero_spectrum_is_nan():
    assert np.isnan(spectrum_metrics(np.arange(14, 0, -1.0))["log_spectrum_slope_10_200"])  # 4 points
    assert not np.isnan(spectrum_metrics(np.arange(15, 0, -1.0))["log_spectrum_slope_10_200"])
    assert np.isnan(spectrum_metrics(np.zeros(5))["d_pr"])


def test_normalization_ablation_against_numpy():
    full, batches = synthetic(n=120)
    g = Geometry(SITES, sample_limit=200)
    for batch in batches:
        g.update(batch)
    X = full["b.output"]
    variants = {
        "raw": X, "token_l2": X / np.linalg.norm(X, axis=1, keepdims=True),
        "token_rms": X / np.sqrt((X**2).mean(1, keepdims=True)),
        "feature_standardized": (X - X.mean(0)) / X.std(0, ddof=1),
    }
    table = g.normalization_ablation.set_index(["site", "normalization"])
    for name, Z in variants.items():
        assert table.loc[("b.output", name), "d_pr"] == pytest.approx(ref_spectrum(Z)["d_pr"], rel=1e-8)
        assert table.loc[("b.output", name), "d_pr_norm"] == pytest.approx(ref_spectrum(Z)["d_pr"] / 20, rel=1e-8)


def test_sketch_rank_reports_its_eigenvalue_error(capsys):
    full, batches = synthetic(n=600, d=40)
    exact, sketched = Geometry(SITES), Geometry(SITES, sketch_rank=8)
    for batch in batches:
        exact.update(batch), sketched.update(batch)
    for s in SITES:
        top_exact, top_sketch = exact.eigenvalues[s][:4], sketched.eigenvalues[s][:4]
        rel = np.abs(top_sketch - top_exact) / top_exact
        print(f"{s}: top-4 eigenvalue relative error with sketch_rank=8, D=40: {rel.round(4)}")
        assert np.all(top_sketch <= top_exact * (1 + 1e-9)), "FD never overestimates"
        bound = exact.eigenvalues[s][4:].sum() / (8 - 4)  # ||A - A_k||_F^2 / (l - k), k = 4, covariance units
        assert np.all(top_exact - top_sketch <= bound + 1e-9), "within the Frequent Directions bound"
    half_a, half_b = Geometry(SITES, sketch_rank=8), Geometry(SITES, sketch_rank=8)
    for i, batch in enumerate(batches):
        (half_a if i < 8 else half_b).update(batch)
    merged = half_a.merge(half_b)
    assert np.all(np.abs(merged.eigenvalues["a.output"][:4] - exact.eigenvalues["a.output"][:4])
                  <= exact.eigenvalues["a.output"][4:].sum() / 4 + 1e-9)


def test_save_and_load_round_trip(tmp_path):
    _, batches = synthetic(n=90)
    g = Geometry(SITES, sample_limit=50)
    for batch in batches:
        g.update(batch)
    g.save(tmp_path / "geo")
    assert sorted(p.name for p in (tmp_path / "geo").iterdir()) == [
        "eigenvalues.npz", "metadata.json", "metrics.csv", "normalization_ablation.csv", "novelty.csv"]
    back = Geometry.load(tmp_path / "geo")
    pd.testing.assert_frame_equal(back.metrics, g.metrics, check_dtype=False)
    pd.testing.assert_frame_equal(back.novelty, g.novelty, check_dtype=False)
    for s in SITES:
        np.testing.assert_array_equal(back.eigenvalues[s], g.eigenvalues[s])
    meta = back.metadata
    assert meta["schema_version"] == 1 and meta["sites"] == SITES and meta["n_rows"] == 90
    assert {"lm_probe", "numpy", "python"} <= set(meta["versions"]) and meta["runtime_s"] >= 0
    meta["schema_version"] = 99
    (tmp_path / "geo" / "metadata.json").write_text(__import__("json").dumps(meta))
    with pytest.raises(ValueError, match="schema 99"):
        Geometry.load(tmp_path / "geo")


@pytest.mark.parametrize("bad, match", [(dict(sites=[]), "non-empty"), (dict(sites=["a.output", "a.output"]), "twice"),
                                        (dict(sites=["a.output"], pool="avg"), "unknown pool"),
                                        (dict(sites=["a.output"], sample_limit=1), "sample_limit"),
                                        (dict(sites=["a.output"], sketch_rank=0), "sketch_rank")])
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        Geometry(**bad)


# ------------------------------------------------------------ on a model, through the runner
def hf_token_rows(model, data, layer):
    rows = []
    for ids in data.ids:
        with torch.no_grad():
            h = model._module(input_ids=torch.from_numpy(ids)[None], output_hidden_states=True).hidden_states
        rows.append(h[layer + 1][0].double().numpy())
    return np.concatenate(rows)


def test_token_geometry_matches_hf_hidden_states(llama, toy):
    train, _ = toy
    data = train.subset(range(40))
    geo = Geometry([f"model.layers.{i}.output" for i in (0, 1, 2)], pool="none", sample_limit=10_000, novelty_k=8)
    ProbeRunner(llama, consumers=[geo], progress=False).collect(data, batch_size=7)
    X = {i: hf_token_rows(llama, data, i) for i in (0, 1, 2)}
    n_tokens = sum(len(r) for r in data.ids)
    assert geo.metrics["n_rows"].tolist() == [n_tokens] * 3
    assert geo.compute().metadata["model"] == {"name": None, "model_type": "llama", "num_hidden_layers": 4,
                                               "hidden_size": 32}
    for i in (0, 1, 2):
        row = geo.metrics.loc[f"model.layers.{i}.output"]
        for key, value in ref_spectrum(X[i]).items():
            assert row[key] == pytest.approx(value, rel=2e-4, abs=1e-6), key
    pair = geo.novelty.iloc[0]
    for key, value in ref_pair(X[0], X[1], k=8).items():
        assert pair[key] == pytest.approx(value, rel=2e-3, abs=1e-4), key


def test_max_tokens_cuts_the_last_batch_exactly(llama, toy):
    train, _ = toy
    geo = Geometry(["model.layers.1.output"], pool="none")
    mean_geo = Geometry(["model.layers.1.output"], pool="mean")
    ProbeRunner(llama, consumers=[geo, mean_geo], progress=False).collect(train, batch_size=16, max_tokens=333)
    lengths = np.cumsum([len(r) for r in train.ids])
    assert geo.n_rows_ == 333 and geo.n_tokens_ == 333
    assert mean_geo.n_rows_ == int(np.searchsorted(lengths, 333, side="right"))


def test_geometry_shares_the_trace_with_probes(gpt2, toy):
    train, test = toy
    geo = Geometry(["transformer.h.0.output", "transformer.h.2.output"], pool="mean", sample_limit=1000)
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.2.output")], consumers=[geo], progress=False)
    calls, handle = count_calls(gpt2._module)
    try:
        runner.fit_probes(train, test, num_epochs=1, batch_size=16, max_steps=None, patience=100)
    finally:
        handle.remove()
    steps = runner["transformer.h.2.output"].n_steps_
    n_val = int(np.ceil(0.1 * len(train)))
    assert calls["n"] == -(-n_val // 16) + steps + -(-len(test) // 16)
    assert geo.n_examples_ == len(train) - n_val
