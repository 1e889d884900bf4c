"""Research on cached rows: which online SGD schedule reaches the offline ceiling (issue 14).

benchmarks/quality.py trains lm_probe's probes through ``fit_probes``; a 6-class probe of the
100-epoch schedule takes 25 s there, so a sweep of schedules x L2 strengths x 22 probes x 3 tasks
does not fit in an afternoon on 2 cores. This script pools the rows once, computes quality.py's
ceiling once per probe, and replays lm_probe's online softmax head in numpy, vectorized over
"twins" (copies of one probe that differ only in their L2 strength ``C``), on exactly what
``fit_probes`` would show it:

* the same splits (750 train / 250 test, then a stratified 10% validation split, seed 0);
* the same batch order (:func:`lm_probe.core.batching.batch_order`, seed ``0 + epoch``,
  the bucketed shuffle, or with ``by_length=False`` a plain shuffle);
* the same step (:func:`lm_probe.functional.sgd.softmax_sgd_step`: the summed gradient of a
  batch of 16, L2 shrinkage compounded per row), running Welford standardization, the
  row-weighted average of the iterates (ASGD), validation log-loss every 10 steps, early
  stopping (``patience`` evaluations, ``min_delta`` 1e-4), ``DecayOnPlateau`` and the best
  snapshot restored at the end.

Checked against lm_probe itself: the decoder's layer-15 mean-pooled length probe with the
README's softmax schedule (``alpha="auto"``, ``eta0=0.01``, 100 epochs, decay 0.5 after 3,
patience 15) gives 0.564 test accuracy here and in quality.py.

Variations it can try that lm_probe does not do (yet): ``avg_restart`` (restart the average
of the iterates when the step decays, so the average forgets the iterates of the larger
step), ``by_length=False`` for every epoch, and choosing ``C`` among the twins on the
validation split (by log-loss or by accuracy).

Usage (each step writes under --out, default /tmp/sgd_feats):
    python benchmarks/quality_sweep.py rows                       # pool the rows (about 5 min)
    python benchmarks/quality_sweep.py ceiling dec:length enc:keyword   # quality.py's ceiling per probe
    python benchmarks/quality_sweep.py run NAME '{"eta0": 0.1, "avg_restart": true}' dec:length
    python benchmarks/quality_sweep.py check dec:length     # lm_probe's fit_probes beside the replica
    python benchmarks/quality_sweep.py lm NAME '{"probe": {"Cs": [0.005, 0.05]}, "fit": {"num_epochs": 100}}' dec:length
    python benchmarks/quality_sweep.py seeds NAME '{"fit": {"decay_patience": 5}}' 5 dec:length enc:length   # seeds 0-4
    python benchmarks/quality_sweep.py table NAME [NAME ...]   # NAME+NAME: choose among both runs' twins
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from lm_probe.core.batching import batch_order

TAGS = {"dec": "SmolLM2-135M", "enc": "random encoder"}
DEFAULT_CS = (0.001, 0.005, 0.05, 0.5, 1e4)


def softmax(Z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (lm_probe.functional.sgd.softmax takes (rows, K) only)."""
    E = np.exp(Z - Z.max(-1, keepdims=True))
    return E / E.sum(-1, keepdims=True)


def pool_rows(out: Path) -> None:
    """quality.py's reference rows (plain HF forward, pooled) and its splits, one .npz per model."""
    sys.path.insert(0, str(Path(__file__).parent))
    from quality import models, reference_rows, tasks

    from lm_probe import ProbeConfig, ProbeDataset, ProbeRunner
    from lm_probe.embedded import rotten_tomatoes

    reviews = rotten_tomatoes().shuffle(seed=0).select(range(1000))
    for tag, (_, model, specs, pools) in zip(TAGS, models(["decoder", "encoder"])):
        data = ProbeDataset.from_hf(reviews, model.tokenizer, max_length=64)
        labels = tasks(list(reviews["text"]), np.array([len(r) for r in data.ids]), data.labels)
        live = ProbeRunner(model, [ProbeConfig(s, pool=p, name=f"{s}/{p}") for s in specs for p in pools],
                           progress=False)
        ref = reference_rows(model, data, live, specs, pools)
        saved = {f"X/{s}/{p}": rows for (s, p), rows in ref.items()}
        saved["lengths"] = np.array([len(r) for r in data.ids])
        pos = {int(e): i for i, e in enumerate(data.example_ids)}
        for task, y in labels.items():
            saved[f"y/{task}"] = y
            task_data = ProbeDataset(data.ids, y, pad_token_id=data.pad_token_id, example_ids=data.example_ids,
                                     padding_side=data.padding_side)
            train, test = task_data.tt_split(0.25, seed=0)
            fit, val = train.tt_split(0.1, seed=0)  # fit_probes' val_size=0.1 with the runner's seed 0
            for part, d in (("train", train), ("test", test), ("fit", fit), ("val", val)):
                saved[f"idx/{task}/{part}"] = np.array([pos[int(e)] for e in d.example_ids])
        np.savez(out / f"{tag}.npz", **saved)


def ceiling(out: Path, pairs: list[tuple[str, str]]) -> None:
    """quality.py's ceiling, StandardScaler + LogisticRegressionCV(Cs=10, cv=5), per probe."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    for tag, task in pairs:
        path = out / f"ceiling_{tag}_{task}.json"
        done = json.loads(path.read_text()) if path.exists() else {}
        f = np.load(out / f"{tag}.npz")
        y, tr, te = f[f"y/{task}"], f[f"idx/{task}/train"], f[f"idx/{task}/test"]
        for key in [k for k in f.files if k.startswith("X/") and f"{tag}|{task}|{k}" not in done]:
            clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, cv=5, max_iter=3000))
            clf.fit(f[key][tr], y[tr])
            done[f"{tag}|{task}|{key}"] = {"acc": float(np.mean(clf.predict(f[key][te]) == y[te])),
                                           "C": float(np.atleast_1d(clf[-1].C_)[0])}
            path.write_text(json.dumps(done, indent=1))


class Twins:
    """Online softmax probes on one site's rows, one per ``C``, stepped side by side."""

    def __init__(self, n_features: int, classes: np.ndarray, Cs, n_fit: int, eta0: float) -> None:
        T, K = len(Cs), len(classes)
        self.classes, self.Cs, self.eta0 = classes, list(Cs), eta0
        self.alpha = np.array([1.0 / (C * n_fit) if np.isfinite(C) else 0.0 for C in Cs])  # default_alpha
        self.W, self.b = np.zeros((T, K, n_features)), np.zeros((T, K))
        self.W_avg, self.b_avg = self.W.copy(), self.b.copy()
        self.seen, self.avg_from = np.zeros(T), np.zeros(T)
        self.scale, self.active = np.ones(T), np.ones(T, bool)

    def step(self, Z: np.ndarray, Y: np.ndarray) -> None:
        """One batch: :func:`softmax_sgd_step` for every active twin, then the running average."""
        m, on = len(Z), self.active
        G = softmax(np.einsum("rd,tkd->trk", Z, self.W) + self.b[:, None, :]) - Y[None]
        eta = self.eta0 * self.scale
        decay = np.clip(1 - eta * self.alpha, 0, None) ** m
        W = self.W * decay[:, None, None] - eta[:, None, None] * np.einsum("trk,rd->tkd", G, Z)
        b = self.b - eta[:, None] * G.sum(1)
        self.W[on], self.b[on] = W[on], b[on]
        weight = (m / (self.seen - self.avg_from + m))[on]  # asgd_weight, every row counted once
        self.W_avg[on] += (self.W[on] - self.W_avg[on]) * weight[:, None, None]
        self.b_avg[on] += (self.b[on] - self.b_avg[on]) * weight[:, None]
        self.seen[on] += m

    def proba(self, Z: np.ndarray, t: int, snap=None) -> np.ndarray:
        W, b = (self.W_avg[t], self.b_avg[t]) if snap is None else snap
        return softmax(Z @ W.T + b)


def run_probe(X, y, idx, lengths, Cs=DEFAULT_CS, *, eta0=0.1, epochs=100, patience=15, decay_patience=3,
              eval_every=10, by_length=True, avg_restart=False, batch_size=16, seed=0, val_size=None,
              precondition=0) -> list[dict]:
    """Train the twins as fit_probes would (see the module docstring); each twin's best
    validation loss, its validation and test accuracy, epochs run and why it stopped.

    Experiments beyond fit_probes: ``val_size`` (another validation share, split as
    ``ProbeDataset.tt_split`` does); ``precondition=k``: the standardized rows' top ``k``
    principal directions (of all the fit rows, so an upper bound for an online estimate)
    scaled to unit variance before the step (the same model class; the L2 penalty then
    weighs those directions less)."""
    fit, val, test = idx["fit"], idx["val"], idx["test"]
    if val_size is not None:
        from sklearn.model_selection import train_test_split

        a, b = train_test_split(np.arange(len(idx["train"])), test_size=val_size, random_state=0,
                                stratify=y[idx["train"]])
        fit, val = idx["train"][np.sort(a)], idx["train"][np.sort(b)]  # as tt_split
    X = X if not precondition else _preconditioned(X, fit, precondition)
    classes = np.unique(y[fit])
    Y = (y[:, None] == classes[None]).astype(float)
    twins = Twins(X.shape[1], classes, Cs, len(fit), eta0)
    n, mean, m2 = 0, np.zeros(X.shape[1]), np.zeros(X.shape[1])  # running Welford moments
    best, wait, decay_wait = np.full(len(Cs), np.inf), np.zeros(len(Cs), int), np.zeros(len(Cs), int)
    snaps, ended, steps = [None] * len(Cs), [(epochs, "end_of_data")] * len(Cs), 0
    for epoch in range(epochs):
        for chunk in batch_order(lengths[fit], batch_size, shuffle=True, seed=seed + epoch, by_length=by_length):
            if not twins.active.any():
                return _outcomes(twins, snaps, best, ended, X, y, val, test)
            rows = fit[chunk]
            n, mean, m2 = _welford(n, mean, m2, X[rows])
            scale = np.where(m2 > 0, np.sqrt(m2 / n), 1.0)
            twins.step((X[rows] - mean) / scale, Y[rows])
            steps += 1
            if steps % eval_every:
                continue
            Zv = (X[val] - mean) / scale
            for t in np.flatnonzero(twins.active):
                loss = -np.mean(np.log(np.clip(twins.proba(Zv, t)[np.arange(len(val)), _index(classes, y[val])],
                                               1e-15, None)))
                if best[t] - loss > 1e-4 or not np.isfinite(best[t]):
                    best[t], wait[t], decay_wait[t] = loss, 0, 0
                    snaps[t] = (twins.W_avg[t].copy(), twins.b_avg[t].copy(), mean.copy(), scale.copy())
                    continue
                wait[t] += 1
                decay_wait[t] += 1
                if decay_wait[t] >= decay_patience and twins.scale[t] > 1e-3:  # DecayOnPlateau(0.5, 3)
                    twins.scale[t], decay_wait[t] = max(twins.scale[t] * 0.5, 1e-3), 0
                    if avg_restart:
                        twins.avg_from[t] = twins.seen[t]
                if wait[t] >= patience:
                    twins.active[t], ended[t] = False, (epoch + 1, "patience")
    return _outcomes(twins, snaps, best, ended, X, y, val, test)


def _preconditioned(X, fit, k):
    """``X`` with its top ``k`` principal directions (over the standardized fit rows) scaled to
    unit variance, in the raw units (so the running standardization still applies)."""
    mean, scale = X[fit].mean(0), X[fit].std(0) + 1e-12
    Z = (X[fit] - mean) / scale
    values, vectors = np.linalg.eigh(np.cov(Z.T))
    U, lam = vectors[:, -k:], values[-k:]
    P = np.eye(X.shape[1]) - U @ np.diag(1 - 1 / np.sqrt(lam)) @ U.T
    return ((X - mean) / scale) @ P * scale + mean


def _welford(n, mean, m2, X):
    m = len(X)
    batch_mean = X.mean(0)
    delta, total = batch_mean - mean, n + m
    return total, mean + delta * m / total, m2 + ((X - batch_mean) ** 2).sum(0) + delta ** 2 * n * m / total


def _index(classes, y):
    return np.searchsorted(classes, y)


def _outcomes(twins, snaps, best, ended, X, y, val, test) -> list[dict]:
    out = []
    for t, C in enumerate(twins.Cs):
        W, b, mean, scale = snaps[t]
        acc = {part: float(np.mean(twins.classes[np.argmax(twins.proba((X[rows] - mean) / scale, t, (W, b)), 1)]
                                   == y[rows])) for part, rows in (("val", val), ("test", test))}
        out.append(dict(C=C, val_loss=float(best[t]), val_acc=acc["val"], test_acc=acc["test"], epochs=ended[t][0],
                        reason=ended[t][1]))
    return out


def run(out: Path, name: str, settings: dict, pairs: list[tuple[str, str]]) -> None:
    results = {}
    for tag, task in pairs:
        f = np.load(out / f"{tag}.npz")
        idx = {part: f[f"idx/{task}/{part}"] for part in ("train", "fit", "val", "test")}
        for key in [k for k in f.files if k.startswith("X/")]:
            results[f"{tag}|{task}|{key}"] = run_probe(f[key], f[f"y/{task}"], idx, f["lengths"], **settings)
            (out / "runs").mkdir(exist_ok=True)
            (out / "runs" / f"{name}.json").write_text(json.dumps(results))


def pick(outcomes: list[dict], rule) -> dict:
    """The twin a rule keeps: ``"loss"`` (lowest validation log-loss), ``"acc"`` (highest
    validation accuracy, ties to the loss), or a value of ``C``."""
    if rule == "loss":
        return min(outcomes, key=lambda o: o["val_loss"])
    if rule == "acc":
        return min(outcomes, key=lambda o: (-o["val_acc"], o["val_loss"]))
    return next(o for o in outcomes if o["C"] == rule)


def cached_source(f, y: np.ndarray, keys: list[str]):
    """lm_probe's view of cached rows ``f``: ``(data, source, requests)``, a dataset whose
    example ids are the rows' positions, labeled ``y``, and an ArraySource serving the rows of
    ``keys`` (``"X/<site>/<pool>"``) as ``requests[key] = (site, pool)``."""
    from lm_probe import ProbeDataset
    from lm_probe.core.sites import Site
    from lm_probe.core.sources import ArraySource

    requests = {key: tuple(key[2:].rsplit("/", 1)) for key in keys}
    data = ProbeDataset([np.ones(int(n), np.int64) for n in f["lengths"]], y)  # rows by position = example id
    source = ArraySource({r: f[key].astype(np.float32) for key, r in requests.items()}, data.example_ids,
                         {site: Site(0, "x", "output", site, None) for site, _ in requests.values()})
    return data, source, requests


def check(out: Path, tag: str, task: str, n_probes: int = 4) -> None:
    """lm_probe's own fit_probes (an ArraySource over the cached rows) beside the replica, on the
    first ``n_probes`` probes, with the README's softmax schedule (C=0.005, eta0=0.01)."""
    from lm_probe import ProbeConfig, ProbeRunner

    f = np.load(out / f"{tag}.npz")
    y, keys = f[f"y/{task}"], [k for k in f.files if k.startswith("X/")][:n_probes]
    data, source, requests = cached_source(f, y, keys)
    train, test = data.tt_split(0.25, seed=0)
    configs = [ProbeConfig(site, pool=pool, name=key, head="softmax", alpha="auto", eta0=0.01)
               for key, (site, pool) in requests.items()]
    runner = ProbeRunner.from_source(source, configs, progress=False)
    runner.fit_probes(train, test, num_epochs=100, lr_decay=0.5, decay_patience=3, patience=15)
    idx = {part: f[f"idx/{task}/{part}"] for part in ("train", "fit", "val", "test")}
    for key in keys:
        replica = run_probe(f[key], y, idx, f["lengths"], Cs=(0.005,), eta0=0.01)[0]
        print(f"{key}: lm_probe {runner.metrics.loc[key, 'accuracy']:.3f} in {runner.metrics.loc[key, 'n_epochs']} "
              f"epochs, replica {replica['test_acc']:.3f} in {replica['epochs']}")


def run_lm(out: Path, name: str, settings: dict, pairs: list[tuple[str, str]]) -> None:
    """lm_probe's own ``fit_probes`` on the cached rows (an ArraySource), every probe of each
    pair: ``settings = {"probe": ProbeConfig kwargs, "fit": fit_probes kwargs, "multiclass":
    ProbeConfig kwargs added for more than two classes, "seed": the runner's seed (its
    validation split and batch order)}``. Saved as a run of one "twin" per
    probe (the probe lm_probe kept), so ``table`` reads it."""
    from lm_probe import ProbeConfig, ProbeRunner

    path = out / "runs" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    for tag, task in pairs:
        f = np.load(out / f"{tag}.npz")
        y, keys = f[f"y/{task}"], [k for k in f.files if k.startswith("X/")]
        data, source, requests = cached_source(f, y, keys)
        train, test = data.tt_split(0.25, seed=0)
        probe = {**settings.get("probe", {}), **(settings.get("multiclass", {}) if len(np.unique(y)) > 2 else {})}
        configs = [ProbeConfig(site, pool=pool, name=key, **probe) for key, (site, pool) in requests.items()]
        clock = time.perf_counter()
        runner = ProbeRunner.from_source(source, configs, progress=False, seed=settings.get("seed", 0))
        runner.fit_probes(train, test, **settings.get("fit", {}))
        m = runner.metrics
        for key in keys:
            results[f"{tag}|{task}|{key}"] = [dict(C=float(m.loc[key, "C"]), val_loss=float(runner[key].best_loss_),
                                                   val_acc=float("nan"), test_acc=float(m.loc[key, "accuracy"]),
                                                   epochs=int(m.loc[key, "n_epochs"]), reason=str(m.loc[key, "stop_reason"]))]
        path.write_text(json.dumps(results))
        print(f"{tag}:{task}: {time.perf_counter() - clock:.0f} s", file=sys.stderr)


def _union(runs: list[dict]) -> dict:
    """Runs "A+B": every probe's twins of all the runs, as one grid to choose from."""
    return {key: [o for r in runs for o in r[key]] for key in runs[0] if all(key in r for r in runs)}


def ceilings(out: Path) -> dict:
    """Every probe's ceiling computed so far (``ceiling_*.json``), by ``"tag|task|X/site/pool"``."""
    ceil = {}
    for path in glob.glob(str(out / "ceiling_*.json")):
        ceil.update(json.loads(Path(path).read_text()))
    return ceil


def seeds(out: Path, name: str, settings: dict, n_seeds: int, pairs: list[tuple[str, str]]) -> None:
    """``lm`` with the runner's seeds 0 to ``n_seeds - 1`` (runs ``NAME_s0``...; a pair already in
    a seed's run is not trained again), then per seed each pair's mean / worst gap, the pairs
    within the targets (mean <= 0.02, worst <= 0.05) and the mean gap over the pairs, and these
    averaged over the seeds. One seed is one validation split and batch order: on these rows a
    probe's gap moves by up to 0.1 between seeds, so settings are compared over several."""
    ceil, within, means, per_pair = ceilings(out), [], [], {pair: [] for pair in pairs}
    print(f"| {name} | seed | " + " | ".join(f"{TAGS[t]} {task}" for t, task in pairs) + " | within | mean |")
    for seed in range(n_seeds):
        path = out / "runs" / f"{name}_s{seed}.json"
        done = json.loads(path.read_text()) if path.exists() else {}
        missing = [(t, task) for t, task in pairs if not any(k.startswith(f"{t}|{task}|") for k in done)]
        if missing:
            run_lm(out, f"{name}_s{seed}", {**settings, "seed": seed}, missing)
        results = json.loads(path.read_text())
        cells, ok, gaps = [], 0, []
        for tag, task in pairs:
            keys = [k for k in results if k.startswith(f"{tag}|{task}|") and k in ceil]
            gap = np.array([ceil[k]["acc"] - results[k][0]["test_acc"] for k in keys])
            ok += bool(gap.mean() <= 0.02 and gap.max() <= 0.05)
            gaps.append(gap.mean())
            per_pair[(tag, task)].append((gap.mean(), gap.max()))
            cells.append(f"{gap.mean():+.3f} / {gap.max():+.3f}")
        within.append(ok)
        means.append(float(np.mean(gaps)))
        print(f"| | {seed} | " + " | ".join(cells) + f" | {ok} of {len(pairs)} | {means[-1]:+.4f} |")
    cells = [f"{np.mean([m for m, _ in g]):+.3f} / {max(w for _, w in g):+.3f}" for g in per_pair.values()]
    print(f"| | mean / worst over seeds | " + " | ".join(cells) + f" | {sum(within)} of {len(pairs) * n_seeds} | "
          f"{np.mean(means):+.4f} |")


def table(out: Path, names: list[str]) -> None:
    """Mean / worst gap (ceiling minus test accuracy) per (model, task) and rule, over the probes
    that have a ceiling."""
    ceil = ceilings(out)
    for name in names:
        results = _union([json.loads((out / "runs" / f"{part}.json").read_text()) for part in name.split("+")])
        rules = ["loss", "acc"] if "+" in name else ["loss", "acc", *[o["C"] for o in next(iter(results.values()))]]
        rules = ["loss"] if all(len(o) == 1 for o in results.values()) else rules  # an lm run: the probe kept
        for tag, task in sorted({tuple(k.split("|")[:2]) for k in results}):
            keys = [k for k in results if k.startswith(f"{tag}|{task}|") and k in ceil]
            cells = []
            for rule in rules:
                gap = np.array([ceil[k]["acc"] - pick(results[k], rule)["test_acc"] for k in keys])
                epochs = np.median([pick(results[k], rule)["epochs"] for k in keys])
                stopped = np.mean([pick(results[k], rule)["reason"] == "patience" for k in keys])
                cells.append(f"{rule}: {gap.mean():+.3f} / {gap.max():+.3f} ({epochs:.0f} ep, {stopped:.0%} stopped)")
            print(f"| {name} | {TAGS[tag]} | {task} | {len(keys)} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["rows", "ceiling", "run", "lm", "seeds", "table", "check"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--out", default="/tmp/sgd_feats")
    a = parser.parse_args()
    warnings.filterwarnings("ignore")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = [tuple(p.split(":")) for p in a.args if re.fullmatch(r"(dec|enc):\w+", p)]
    clock = time.perf_counter()
    if a.step == "rows":
        pool_rows(out)
    elif a.step == "ceiling":
        ceiling(out, pairs)
    elif a.step == "check":
        check(out, *pairs[0])
    elif a.step == "run":
        run(out, a.args[0], json.loads(a.args[1]), pairs)
    elif a.step == "lm":
        run_lm(out, a.args[0], json.loads(a.args[1]), pairs)
    elif a.step == "seeds":
        seeds(out, a.args[0], json.loads(a.args[1]), int(a.args[2]), pairs)
    else:
        table(out, a.args)
    print(f"{a.step}: {time.perf_counter() - clock:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
