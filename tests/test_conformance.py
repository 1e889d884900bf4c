"""Every consumer of lm_probe through the one harness (tests/conformance.py), each against an
independent float64 reference: numpy / scipy for the statistics, scikit-learn for the probes,
the rows fed in for the stores. A new consumer is done when it has a case here
(:func:`test_every_consumer_has_a_case` keeps it so)."""

from __future__ import annotations

import importlib
import itertools
import pkgutil
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.metrics import log_loss

import lm_probe
from lm_probe import (ActivationStore, Cache, Consumer, DiffusionGauge, Geometry, LogitLens, PooledBatch, Probe,
                      ProbeConfig, ProbeDataset, RouterStats, Trigger)
from lm_probe.core.consumer import FirstEpochOnly, Group, RunContext
from lm_probe.core.replay import ReplayCache
from lm_probe.probes.backend import ProbeBank
from lm_probe.probes.early_stopping import EarlyStopping
from lm_probe.probes.training import Training
from lm_probe.probes.twins import TwinProbe

from conformance import check_consumer
import test_diffusion as diff_ref
import test_geometry as geo_ref
import test_lens as lens_ref

#: name -> (the consumer classes it covers, a builder of check_consumer's arguments from the pytest request)
CASES: dict[str, tuple[tuple[type, ...], Callable[[Any], dict[str, Any]]]] = {}


def case(name: str, *covers: type):
    def register(build):
        CASES[name] = (covers, build)
        return build
    return register


# ---------------------------------------------------------------- shared synthetic data
SITE = "s.output"


def labeled(n=120, d=5, n_classes=3, batch=12, seed=0):
    """Separable-ish classes with a large mean and unequal scales, in batches with example ids."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    X = (rng.normal(size=(n, d)) * np.geomspace(3, 0.3, d) + 10 + 1.5 * np.eye(n_classes, d)[y]).astype(np.float32)
    batches = [PooledBatch({(SITE, "mean"): X[lo:lo + batch]}, y[lo:lo + batch], k, 0, np.arange(lo, min(n, lo + batch)),
                           np.full(len(y[lo:lo + batch]), 3), example_ids=np.arange(lo, min(n, lo + batch)) + 1000)
               for k, lo in enumerate(range(0, n, batch))]
    return X.astype(np.float64), y, batches


def standardized(X: np.ndarray) -> np.ndarray:
    """Rows standardized with the float64 mean and population standard deviation of ``X``."""
    scale = X.std(0)
    return (X - X.mean(0)) / np.where(scale > 0, scale, 1.0)


def toy_data(n: int, labels=None) -> ProbeDataset:
    """``n`` one-token examples (ids are not traced: the rows are synthetic)."""
    labels = np.zeros(n, np.int64) if labels is None else labels
    return ProbeDataset([np.array([3 + i % 7, 4]) for i in range(n)], labels, pad_token_id=0,
                        example_ids=np.arange(n) + 1000)


def same_exactly(a, b):
    np.testing.assert_equal(a, b)  # nested dicts, tuples and arrays; NaN equals NaN


def probe_state(probe: Probe) -> dict[str, Any]:
    """What a probe learned: its summary (``compute()``) and its weights and moments."""
    return {"summary": probe.compute(), "coef": probe.coef_, "intercept": probe.intercept_,
            "mean": probe.mean_, "scale": probe.scale_, "history": list(probe.history_)}


# ---------------------------------------------------------------- statistics
@case("geometry", Geometry)
def geometry_case(request):
    full, batches = geo_ref.synthetic()

    def reference(result):
        for s, X in full.items():
            row = result.metrics.loc[s]
            for key, value in {**geo_ref.ref_spectrum(X), **geo_ref.ref_sample(X)}.items():
                assert row[key] == pytest.approx(value, rel=1e-8, abs=1e-12, nan_ok=True), (s, key)
            np.testing.assert_allclose(result.eigenvalues[s],
                                       np.sort(np.clip(np.linalg.eigvalsh(np.cov(X.T)), 0, None))[::-1],
                                       rtol=1e-8, atol=1e-10)
        for _, pair in result.novelty.iterrows():
            expected = geo_ref.ref_pair(full[pair["site_a"]], full[pair["site_b"]], k=4)
            for key, value in expected.items():
                assert pair[key] == pytest.approx(value, rel=1e-8), key
        assert list(result.metrics["n_rows"]) == [300] * 3 and result.metadata["n_examples"] == 300

    return dict(make=lambda: Geometry(geo_ref.SITES, sample_limit=400, novelty_k=4), batches=batches,
                same=geo_ref.same_results, reference=reference)


@case("logit_lens", LogitLens)
def lens_case(request):
    from lm_probe import ProbeRunner

    gpt2 = request.getfixturevalue("gpt2")
    ids = lens_ref.examples(14, seed=2)
    logits, final = lens_ref.reference(gpt2, "gpt2", ids)
    targets = logits[:, 2].argmax(1)
    sites = lens_ref.sites_of("gpt2")[1:]  # the last block is read even when not asked for
    make = lambda: LogitLens(sites, top_k=5, token_pairs=lens_ref.PAIRS, targets=targets)  # noqa: E731
    context = RunContext(model=gpt2)
    started = make()
    started.start(context)  # its requests now include the last block and the head
    recorder = lens_ref.Recorder(started.requests)
    ProbeRunner(gpt2, progress=False).collect(lens_ref.dataset(ids, "left"), [recorder], batch_size=4)

    def same(a, b):
        for key in a:
            pd.testing.assert_frame_equal(a[key], b[key])

    return dict(make=make, batches=recorder.batches, same=same, context=context,
                reference=lambda r: lens_ref.check_tables(r, logits[:, 1:], final, sites, [1, 2, 3], targets))


@case("router_stats", RouterStats)
def router_case(request):
    """Router logits of two layers (6 experts, top-2), one token row with a NaN left out at both."""
    rng = np.random.default_rng(5)
    logits = {s: rng.normal(size=(80, 6)) * np.linspace(0.5, 2, 6) for s in ("r0.output", "r1.output")}
    logits["r1.output"][17, 2] = np.nan
    batches = [PooledBatch({(s, "none"): v[lo:lo + 10].astype(np.float32) for s, v in logits.items()})
               for lo in range(0, 80, 10)]

    def reference(table):
        for row, X in zip(table.itertuples(), logits.values()):
            X = np.delete(X.astype(np.float32).astype(np.float64), 17, axis=0)
            P = np.exp(X - X.max(1, keepdims=True)) / np.exp(X - X.max(1, keepdims=True)).sum(1, keepdims=True)
            order = np.argsort(-P, axis=1, kind="stable")
            load = np.bincount(order[:, :2].ravel(), minlength=6) / (2 * len(X))
            np.testing.assert_allclose(row.load, load, atol=1e-15)
            np.testing.assert_allclose(row.top1_load, np.bincount(order[:, 0], minlength=6) / len(X), atol=1e-15)
            assert row.entropy_bits == pytest.approx(-(load * np.log2(load)).sum(), rel=1e-12)
            assert row.cv == pytest.approx(load.std() / load.mean(), rel=1e-12)
            assert row.mean_top1_prob == pytest.approx(P.max(1).mean(), rel=1e-12) and row.n_tokens == 79

    return dict(make=lambda: RouterStats(list(logits), top_k=2), batches=batches,
                same=lambda a, b: pd.testing.assert_frame_equal(a, b), reference=reference)


@case("diffusion_gauge", DiffusionGauge)
def gauge_case(request):
    """The gauge reads no batch: its subset's rows come through observe(), at every second
    step and at the end; each measurement is the dense float64 reference of its operator."""
    n, d, sites, knn, n_eigs = 90, 4, ["a.output", "b.output"], 6, 8
    rng = np.random.default_rng(3)
    rows = {s: rng.normal(size=(n, d)) * (1 + k) + np.eye(d)[rng.integers(0, d, n)] * 3
            for k, s in enumerate(sites)}  # by position in the data
    data = toy_data(n)
    asked: list = []

    def subset_rows(subset):
        asked.append(subset)
        position = subset.data.example_ids - 1000
        return {(s, pool): rows[s][position].astype(np.float32) for s, pool in subset.requests}

    def reference(trajectory):
        subset = asked[-1]
        assert len(set(subset.data.example_ids.tolist())) == 40 and set(subset.data.example_ids) <= set(data.example_ids)
        assert subset.requests == tuple((s, "mean") for s in sites) and subset.batch_size == 8
        assert sorted(trajectory["step"].unique()) == [2, 4, 6], "every second step; the end (step 6) once"
        for s in sites:
            X = rows[s][subset.data.example_ids - 1000].astype(np.float32).astype(np.float64)
            K = diff_ref.ref_kernel(X, diff_ref.ref_sigma(X, knn), mask=diff_ref.ref_knn_mask(X, knn))
            P, _ = diff_ref.ref_operators(K, 0.0)
            expected = diff_ref.ref_eigenvalues(P, n_eigs)
            for _, row in trajectory[trajectory["site"] == s].iterrows():
                np.testing.assert_allclose(row["eigenvalues"], expected, atol=1e-8)
                assert row["spectral_gap"] == pytest.approx(1 - expected[1], abs=1e-8)

    def same(a, b):
        pd.testing.assert_frame_equal(a.drop(columns="eigenvalues"), b.drop(columns="eigenvalues"))
        np.testing.assert_array_equal(np.stack(a["eigenvalues"]), np.stack(b["eigenvalues"]))

    batches = [PooledBatch({}, np.zeros(15, np.int64), k, 0, np.arange(15 * k, 15 * k + 15)) for k in range(6)]
    make = lambda: DiffusionGauge(sites, n_samples=40, knn=knn, n_eigs=n_eigs, seed=1,  # noqa: E731
                                  trigger=Trigger(every_n_steps=2, on_end=True))
    return dict(make=make, batches=batches, same=same, reference=reference, mergeable=False,
                context=RunContext(data=data, batch_size=8), subset_rows=subset_rows)


# ---------------------------------------------------------------- probes
@case("probe_sgd", Probe)
def sgd_case(request):
    """The online probe against a plain SGDClassifier partial_fit loop on rows standardized
    by hand with the moments of the rows seen so far, its iterates averaged by hand."""
    X, y, batches = labeled()
    settings = dict(learning_rate="constant", eta0=0.01, alpha=1e-4, penalty="l2")
    config = ProbeConfig(SITE, classes=(0, 1, 2), head="linear", average=True, **settings)

    def reference(state):
        sgd = SGDClassifier(loss="log_loss", average=False, random_state=7, **settings)
        iterates, weights, hi = [], [], 0
        for batch in batches:
            lo, hi = hi, hi + len(batch.labels)
            seen = X[:hi]
            scale = np.where(seen.std(0) > 0, seen.std(0), 1.0)
            sgd.partial_fit((X[lo:hi] - seen.mean(0)) / scale, y[lo:hi], classes=[0, 1, 2])
            iterates.append(np.hstack([sgd.coef_, sgd.intercept_[:, None]]))
            weights.append(hi - lo)
        average = np.average(iterates, axis=0, weights=weights)  # ASGD: every row counts once
        np.testing.assert_allclose(state["coef"], average[:, :-1], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(state["intercept"], average[:, -1], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(state["mean"], X.mean(0), rtol=1e-12)
        np.testing.assert_allclose(state["scale"], X.std(0), rtol=1e-10)
        assert state["summary"]["n_steps"] == len(batches) and state["summary"]["stop_reason"] == "end_of_data"

    return dict(make=lambda: Probe(config, random_state=7), batches=batches, same=same_exactly, reference=reference,
                mergeable=False, read=probe_state,
                context=RunContext(training={config.name: Training(classes=(0, 1, 2))}))


@case("probe_sgd_early_stopping", Probe)
def early_stopping_case(request):
    """With a validation set and early stopping (reset must give a fresh stopper): the probe
    keeps the weights of its best validation log-loss, which scikit-learn's log_loss of those
    weights (applied by hand) reproduces."""
    X, y, batches = labeled(n=240, batch=8, seed=1)
    Xv, yv, _ = labeled(n=60, seed=2)
    config = ProbeConfig(SITE, classes=(0, 1, 2), head="linear", learning_rate="constant", eta0=0.5)
    training = Training(classes=(0, 1, 2), validation=(Xv.astype(np.float32), yv), eval_every=2,
                        early_stopping=EarlyStopping(patience=2, min_delta=1e-3))

    def reference(state):
        summary = state["summary"]
        assert summary["stop_reason"] == "patience" and summary["best_step"] < summary["n_steps"] < len(batches)
        Z = (Xv - state["mean"]) / state["scale"] @ state["coef"].T + state["intercept"]
        proba = 1 / (1 + np.exp(-Z))
        proba /= proba.sum(1, keepdims=True)  # scikit-learn's one-vs-rest normalization
        assert summary["best_val_loss"] == pytest.approx(log_loss(yv, proba, labels=[0, 1, 2]), rel=1e-9)
        assert min(loss for _, loss in state["history"]) == summary["best_val_loss"]

    return dict(make=lambda: Probe(config, random_state=3), batches=batches, same=same_exactly, reference=reference,
                mergeable=False, read=probe_state, context=RunContext(training={config.name: training}))


@case("probe_lbfgs", Probe)
def lbfgs_case(request):
    """solver="lbfgs" against scikit-learn's LogisticRegression on the same rows standardized by hand."""
    X, y, batches = labeled(n=150, batch=20, seed=4)
    config = ProbeConfig(SITE, classes=(0, 1, 2), solver="lbfgs", Cs=[0.5])

    def reference(state):
        ref = LogisticRegression(C=0.5, max_iter=1000).fit(standardized(X), y)
        scale = np.abs(ref.coef_).max()
        np.testing.assert_allclose(state["coef"], ref.coef_, atol=1e-5 * scale)
        np.testing.assert_allclose(state["intercept"], ref.intercept_, atol=1e-5 * scale)
        assert state["summary"]["C"] == 0.5 and state["summary"]["stop_reason"] == "solved"
        assert state["summary"]["converged"]

    return dict(make=lambda: Probe(config, random_state=0), batches=batches, same=same_exactly, reference=reference,
                mergeable=False, read=probe_state,
                context=RunContext(training={config.name: Training(classes=(0, 1, 2))}))


@case("probe_sgd_twins", TwinProbe)
def twins_case(request):
    """SGD twins (of the default head: for 3 classes the softmax head): each twin is the plain
    probe of its alpha = 1 / (C * rows) (tests/probes/test_softmax.py checks that head against
    a numpy loop), and the probe keeps the one whose weights give the lowest validation
    log-loss (scikit-learn's, of the softmax of those weights applied by hand)."""
    X, y, batches = labeled(n=240, batch=12, seed=5)
    Xv, yv, _ = labeled(n=60, seed=6)
    config = ProbeConfig(SITE, classes=(0, 1, 2), Cs=[1e-3, 0.1, 10.0], eta0=0.05)
    training = Training(classes=(0, 1, 2), validation=(Xv.astype(np.float32), yv), eval_every=4,
                        early_stopping=EarlyStopping(patience=3), n_rows=len(y))

    def reference(state):
        losses = {}
        for C in (1e-3, 0.1, 10.0):
            alone = Probe(ProbeConfig(SITE, classes=(0, 1, 2), alpha=1 / (C * len(y)), eta0=0.05), random_state=2)
            alone.start(RunContext(training={SITE: training}))
            for batch in batches:
                if alone.active:
                    alone.update(batch)
            alone.finish()
            Z = (Xv - alone.mean_) / alone.scale_ @ alone.coef_.T + alone.intercept_
            proba = np.exp(Z - Z.max(1, keepdims=True))
            losses[C] = (log_loss(yv, proba / proba.sum(1, keepdims=True), labels=[0, 1, 2]), alone)
        best = min(losses, key=lambda C: losses[C][0])
        assert all(v[1].head_ == "softmax" for v in losses.values())
        assert len({round(v[0], 4) for v in losses.values()}) == 3 and state["summary"]["C"] == best
        np.testing.assert_allclose(state["coef"], losses[best][1].coef_, rtol=1e-12)
        assert state["summary"]["best_val_loss"] == pytest.approx(losses[best][0], rel=1e-9)

    return dict(make=lambda: TwinProbe(config, random_state=2), batches=batches, same=same_exactly,
                reference=reference, mergeable=False, read=probe_state,
                context=RunContext(training={config.name: training}))


@case("probe_bank", ProbeBank)
def bank_case(request):
    """The torch bank against the scikit-learn backend's probes on one-row batches, where the
    two take the same steps (float32 against float64)."""
    X, y, _ = labeled(n=90, seed=5)
    batches = [PooledBatch({(SITE, "mean"): X[i:i + 1].astype(np.float32)}, y[i:i + 1], i, 0, np.array([i]),
                           np.array([3])) for i in range(len(y))]
    configs = [ProbeConfig(SITE, classes=(0, 1, 2), name="standardized"),
               ProbeConfig(SITE, classes=(0, 1, 2), name="raw", standardize=False, alpha=1e-3, average=False)]
    context = RunContext(training={c.name: Training(classes=(0, 1, 2)) for c in configs})

    def read(bank):
        return {"summaries": bank.compute(), **{p.name: probe_state(p) for p in bank.probes}}

    def reference(state):
        for config in configs:
            ref = Probe(config, random_state=0)
            ref.start(context)
            for batch in batches:
                ref.partial_fit(batch.acts[(SITE, "mean")], batch.labels)
            got, scale = state[config.name], np.abs(ref.coef_).max()
            np.testing.assert_allclose(got["coef"], ref.coef_, atol=2e-5 * scale)
            np.testing.assert_allclose(got["intercept"], ref.intercept_, atol=2e-5 * max(scale, 1))
            np.testing.assert_allclose(got["mean"], ref.mean_ if config.standardize else 0.0, rtol=1e-12)
            assert state["summaries"][config.name]["n_steps"] == len(batches)

    make = lambda: ProbeBank([Probe(c, random_state=0) for c in configs])  # noqa: E731
    return dict(make=make, batches=batches, same=same_exactly, reference=reference, mergeable=False, read=read,
                context=context)


# ---------------------------------------------------------------- stores
@case("activation_store", ActivationStore)
def store_case(request):
    """The stored run holds exactly the rows, labels and example ids fed in."""
    root = request.getfixturevalue("tmp_path")
    n, sites = 50, ["a.output", "b.output"]
    rng = np.random.default_rng(6)
    rows = {s: rng.normal(size=(n, 4)).astype(np.float32) for s in sites}
    labels = rng.integers(0, 2, n)
    data = toy_data(n, labels)
    order = rng.permutation(n)
    batches = [PooledBatch({(s, "mean"): rows[s][order[lo:lo + 7]] for s in sites}, labels[order[lo:lo + 7]],
                           k, 0, order[lo:lo + 7], np.full(len(order[lo:lo + 7]), 2))
               for k, lo in enumerate(range(0, n, 7))]
    runs = itertools.count()

    def read(store):
        run = store.compute()
        return {"example_ids": run.example_ids, "labels": run.labels, "bad_shards": run.bad_shards,
                **{s: run.array(s)[np.arange(len(run.example_ids))] for s in sites}}

    def reference(state):
        np.testing.assert_array_equal(state["example_ids"], data.example_ids[order])
        np.testing.assert_array_equal(state["labels"], labels[order])
        for s in sites:
            np.testing.assert_array_equal(state[s], rows[s][order])
        assert state["bad_shards"] == {}

    make = lambda: ActivationStore(root, sites, run=f"run{next(runs)}", shard_rows=16, overwrite=True)  # noqa: E731
    return dict(make=make, batches=batches, same=same_exactly, reference=reference, mergeable=False, read=read,
                context=RunContext(data=data, batch_size=7))


class Reads(Consumer):
    """A trainer stand-in for the replay cache: reads given requests, always active."""

    def __init__(self, requests):
        self.requests = tuple(requests)


@case("replay_cache", ReplayCache)
def replay_case(request):
    """The replay cache gives back, for any batch of its split, exactly the rows recorded."""
    n, requests = 40, [("a.output", "mean"), ("b.output", "last")]
    rng = np.random.default_rng(8)
    rows = {r: rng.normal(size=(n, 3)).astype(np.float32) for r in requests}
    data = toy_data(n)
    order = rng.permutation(n)
    batches = [PooledBatch({r: rows[r][order[lo:lo + 6]] for r in requests}, np.zeros(len(order[lo:lo + 6]), int),
                           k, 0, order[lo:lo + 6], np.full(len(order[lo:lo + 6]), 2))
               for k, lo in enumerate(range(0, n, 6))]

    class Everything:  # a batch of every example, in reverse order
        index = np.arange(n)[::-1]

    def read(cache):
        return {"info": cache.compute(), **{r: cache.read(Everything, cache.data, [r])[r] for r in requests}}

    def reference(state):
        for r in requests:
            np.testing.assert_array_equal(state[r], rows[r][::-1])
        assert state["info"]["nbytes_in_memory"] == sum(v.nbytes for v in rows.values())
        assert state["info"]["nbytes_spilled"] == 0 and state["info"]["examples"] == n

    make = lambda: ReplayCache(data, [Reads(requests)], Cache())  # noqa: E731
    return dict(make=make, batches=batches, same=same_exactly, reference=reference, mergeable=False, read=read)


# ---------------------------------------------------------------- the tests
@pytest.mark.parametrize("name", list(CASES))
def test_consumer_conformance(name, request):
    _, build = CASES[name]
    check_consumer(**build(request))


def _consumer_classes() -> set[type]:
    """Every concrete Consumer subclass defined in lm_probe (each of its modules imported;
    the abstract bases are left out: ``Group`` of the cache and the bank, ``FirstEpochOnly``
    of the lens and the router statistics, which have cases)."""
    for info in pkgutil.walk_packages(lm_probe.__path__, "lm_probe."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    found, todo = set(), [Consumer]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("lm_probe.") and sub not in (Group, FirstEpochOnly):
                found.add(sub)
    return found


def test_every_consumer_has_a_case():
    covered = {kind for kinds, _ in CASES.values() for kind in kinds}
    missing = sorted(k.__qualname__ for k in _consumer_classes() - covered)
    assert not missing, f"consumers without a conformance case in tests/test_conformance.py: {missing}"
