"""Online probes against the offline ceiling, on several tasks, a decoder and an encoder.

For each model, the same reviews of the embedded Rotten Tomatoes data carry three label sets:

* ``sentiment``: fresh / rotten (binary, balanced: the demo's task);
* ``keyword``: whether the review contains the word "film" (binary, imbalanced: ~14% positives);
* ``length``: the review's token count in 6 quantile bins (6 classes).

The reference is computed without lm_probe's trace: a plain Hugging Face forward of each
example alone, block outputs read by forward hooks and pooled here (mean of the tokens, last
token, first token), then ``StandardScaler`` + ``LogisticRegressionCV(Cs=10, cv=5)`` fit on
the training rows. lm_probe pools the same examples once (``runner.pooled``), and every probe
variant trains from those rows (``ProbeRunner.from_source``) with ``fit_probes``' defaults
unless the variant says otherwise. Printed: per task and variant, the mean and worst gap
(offline minus online) in test accuracy and macro-F1 over the probes.

Models: the embedded SmolLM2-135M (decoder; 7 layers x mean/last pooling = 14 probes) and a
random 4-layer BERT-style encoder with SmolLM2's tokenizer (4 layers x mean/first = 8 probes).

Usage:
    python benchmarks/quality.py                       # 1,000 reviews, 750 train / 250 test
    python benchmarks/quality.py --examples 400 --variants defaults lbfgs --json out.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lm_probe import ProbeConfig, ProbeDataset, ProbeRunner, load_model
from lm_probe.core.sources import ArraySource
from lm_probe.probes.config import SGD_CS

#: Probe training settings compared (keyword arguments of fit_probes, plus the probe's own).
VARIANTS = {
    "defaults": dict(),
    "3 epochs, constant step (defaults until December 2026)": dict(num_epochs=3, patience=5, lr_decay=None,
                                                                   eta0=0.003, alpha=1e-4),
    "defaults, 5 twins (Cs=SGD_CS)": dict(Cs=SGD_CS),
    "defaults, 5 twins, softmax head": dict(Cs=SGD_CS, head="softmax"),
    "lbfgs": dict(solver="lbfgs"),
    "lbfgs, C on the validation split": dict(solver="lbfgs", cv="validation"),
}


def tasks(texts: list[str], n_tokens: np.ndarray, sentiment: np.ndarray) -> dict[str, np.ndarray]:
    keyword = np.array([bool(re.search(r"\bfilm\b", t.lower())) for t in texts], np.int64)
    edges = np.quantile(n_tokens, np.linspace(0, 1, 7)[1:-1])
    return {"sentiment": np.asarray(sentiment, np.int64), "keyword": keyword,
            "length": np.searchsorted(edges, n_tokens, side="right").astype(np.int64)}


def models(which: list[str]):
    from lm_probe.testing import tiny_model

    smol = load_model("smollm2-135m")
    if "decoder" in which:
        L = smol._module.config.num_hidden_layers
        layers = sorted({0, 5, 10, 15, 20, 25, L - 1})
        yield "SmolLM2-135M (decoder)", smol, [f"model.layers.{i}.output" for i in layers], ("mean", "last")
    if "encoder" in which:
        bert = tiny_model("bert", layers=4, hidden=64, seed=0, vocab=len(smol.tokenizer))
        enc = load_model(bert, tokenizer=smol.tokenizer)
        from lm_probe.architectures import sites

        yield "random BERT-style encoder, 4 layers, hidden 64", enc, sites(enc, "resid_post", layers=range(4)), \
            ("mean", "first")


def reference_rows(model, data: ProbeDataset, runner: ProbeRunner, specs: list[str], pools) -> dict:
    """Pooled block outputs from a plain Hugging Face forward of each example alone."""
    hf = model._module
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for spec in specs:
        module = hf.get_submodule(runner.sites[spec].path)
        handles.append(module.register_forward_hook(
            lambda m, a, out, spec=spec: captured.__setitem__(spec, out[0] if isinstance(out, tuple) else out)))
    rows = {(s, p): [] for s in specs for p in pools}
    try:
        with torch.no_grad():
            for ids in data.ids:
                x = torch.from_numpy(ids)[None]
                hf(input_ids=x, attention_mask=torch.ones_like(x))
                for spec in specs:
                    h = captured[spec][0].double()
                    for p in pools:
                        rows[(spec, p)].append({"mean": h.mean(0), "last": h[-1], "first": h[0]}[p].numpy())
    finally:
        for h in handles:
            h.remove()
    return {k: np.stack(v) for k, v in rows.items()}


def offline(Xtr, ytr, Xte, yte) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, cv=5, max_iter=3000)).fit(Xtr, ytr)
    pred = clf.predict(Xte)
    return float(np.mean(pred == yte)), float(f1_score(yte, pred, average="macro"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--models", nargs="+", default=["decoder", "encoder"], choices=["decoder", "encoder"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", default=None)
    parser.add_argument("--rows-cache", default=None,
                        help="folder to keep the pooled rows in, so that a second run skips the forwards")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")
    from lm_probe.embedded import rotten_tomatoes

    reviews = rotten_tomatoes().shuffle(seed=0).select(range(args.examples))
    results = []
    for model_name, model, specs, pools in models(args.models):
        data = ProbeDataset.from_hf(reviews, model.tokenizer, max_length=64)
        labels = tasks(list(reviews["text"]), np.array([len(r) for r in data.ids]), data.labels)
        requests = [(s, p) for s in specs for p in pools]
        live = ProbeRunner(model, [ProbeConfig(s, pool=p, name=f"{s}/{p}") for s, p in requests], progress=False)
        clock = time.perf_counter()
        saved = Path(args.rows_cache) / f"{re.sub(r'[^A-Za-z0-9]+', '_', model_name)}_{len(data)}.npz" \
            if args.rows_cache else None
        if saved is not None and saved.exists():  # rows pooled by an earlier run of this script
            with np.load(saved) as f:
                ours_rows = {r: f[f"ours/{r[0]}/{r[1]}"] for r in requests}
                ref = {r: f[f"ref/{r[0]}/{r[1]}"] for r in requests}
        else:
            ours_rows = live.pooled(data, requests, batch_size=16)
            ref = reference_rows(model, data, live, specs, pools)
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                np.savez(saved, **{f"ours/{r[0]}/{r[1]}": ours_rows[r] for r in requests},
                         **{f"ref/{r[0]}/{r[1]}": ref[r] for r in requests})
        source = ArraySource(ours_rows, data.example_ids, live.sites)
        print(f"\n## {model_name}: {len(data)} reviews, {len(requests)} probes; pooled by lm_probe and by a plain "
              f"forward in {time.perf_counter() - clock:.0f} s")
        for task, y in labels.items():
            task_data = ProbeDataset(data.ids, y, pad_token_id=data.pad_token_id, padding_side=data.padding_side,
                                     example_ids=data.example_ids)
            train, test = task_data.tt_split(0.25, seed=0)
            pos = {int(e): i for i, e in enumerate(data.example_ids)}
            tr, te = [pos[int(e)] for e in train.example_ids], [pos[int(e)] for e in test.example_ids]
            ceiling = {r: offline(ref[r][tr], train.labels, ref[r][te], test.labels) for r in requests}
            shares = np.bincount(y) / len(y)
            print(f"\n{task}: {len(shares)} classes, shares {np.round(shares, 3).tolist()}")
            print("| variant | mean acc gap | worst acc gap | mean F1 gap | worst F1 gap | mean acc | epochs run "
                  "(median) | converged | s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for variant in args.variants:
                settings = dict(VARIANTS[variant])
                probe = {key: settings.pop(key) for key in ("solver", "cv", "alpha", "eta0", "head", "Cs") if key in settings}
                configs = [ProbeConfig(s, pool=p, name=f"{s}/{p}", **probe) for s, p in requests]
                clock = time.perf_counter()
                runner = ProbeRunner.from_source(source, configs, progress=False)
                runner.fit_probes(train, test, **settings)
                seconds = time.perf_counter() - clock
                m = runner.metrics
                acc_gap = np.array([ceiling[r][0] - m.loc[f"{r[0]}/{r[1]}", "accuracy"] for r in requests])
                f1_gap = np.array([ceiling[r][1] - m.loc[f"{r[0]}/{r[1]}", "f1"] for r in requests])
                row = {"model": model_name, "task": task, "variant": variant, "mean_acc_gap": float(acc_gap.mean()),
                       "worst_acc_gap": float(acc_gap.max()), "mean_f1_gap": float(f1_gap.mean()),
                       "worst_f1_gap": float(f1_gap.max()), "mean_acc": float(m["accuracy"].mean()),
                       "offline_mean_acc": float(np.mean([c[0] for c in ceiling.values()])),
                       "epochs_median": float(m["n_epochs"].median()), "converged": float(m["converged"].mean()),
                       "seconds": seconds}
                results.append(row)
                print(f"| {variant} | {row['mean_acc_gap']:+.3f} | {row['worst_acc_gap']:+.3f} | "
                      f"{row['mean_f1_gap']:+.3f} | {row['worst_f1_gap']:+.3f} | {row['mean_acc']:.3f} | "
                      f"{row['epochs_median']:.0f} | {row['converged']:.2f} | {seconds:.0f} |")
            print(f"(offline LogisticRegressionCV mean accuracy {np.mean([c[0] for c in ceiling.values()]):.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
