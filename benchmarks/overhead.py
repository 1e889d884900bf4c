"""What many probes cost next to the bare forward pass, measured side by side in one run.

For the same training batches, same threads, interleaved repetitions (medians, min-max):

1. bare: the plain Hugging Face forward (no_grad, use_cache=False, full depth) = 1.0;
2. five probes spanning the depth, last layer included (fit_probes, per training batch);
3. a probe at every layer plus Geometry at every layer;
4. early exit: probes whose deepest site is the middle layer;
5. naive: one full forward per probe (five probes), what a user without lm_probe writes;
6. memory: peak RSS of fit_probes on 1x and 4x the examples (separate processes);
7. quality: each online probe's test accuracy against scikit-learn LogisticRegressionCV
   fit offline on the same pooled training activations, for both probe backends;
8. backends: the probe updates alone (activations read from a store, no forward), all
   layers x 4 values of alpha, scikit-learn ``partial_fit`` per probe against the batched
   torch backend (``backend="torch"``), and both inside fit_probes.

Usage:
    python benchmarks/overhead.py --quick            # tiny random Llama, seconds
    python benchmarks/overhead.py                    # embedded SmolLM2-135M + Rotten Tomatoes
    python benchmarks/overhead.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

from lm_probe import Geometry, ProbeConfig, ProbeDataset, ProbeRunner, load_model


def setup(quick: bool, n: int):
    if quick:
        from lm_probe.testing import tiny_model, tiny_tokenizer, toy_texts

        model = load_model(tiny_model("llama", layers=8, hidden=128), tokenizer=tiny_tokenizer())
        texts, labels = toy_texts(n, seed=0)
        data = ProbeDataset.from_texts(texts, labels, tokenizer=model.tokenizer, max_length=64)
        return model, data
    from lm_probe.embedded import rotten_tomatoes

    model = load_model("smollm2-135m")
    reviews = rotten_tomatoes().shuffle(seed=0).select(range(n))
    return model, ProbeDataset.from_hf(reviews, model.tokenizer, max_length=64)


def bare(model, batches):
    hf = model._module
    with torch.no_grad():
        for b in batches:
            pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
            hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos, use_cache=False)


def naive(model, batches, layers):
    """One full forward per probe with output_hidden_states, mean pooled, then partial_fit."""
    from sklearn.linear_model import SGDClassifier

    hf = model._module
    probes = [SGDClassifier(loss="log_loss") for _ in layers]
    with torch.no_grad():
        for b in batches:
            for probe, layer in zip(probes, layers):
                out = hf(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False,
                         output_hidden_states=True)
                h = out.hidden_states[layer + 1]
                m = b.attention_mask.unsqueeze(-1)
                x = ((h * m).sum(1) / m.sum(1)).numpy()
                probe.partial_fit(x, b.labels, classes=[0, 1])


def ours(model, data, configs, consumers=(), batch_size=16, backend="sklearn"):
    runner = ProbeRunner(model, configs, consumers=list(consumers), progress=False, backend=backend)
    runner.fit_probes(data, None, batch_size=batch_size, num_epochs=1, val_size=0, eval_every=10**9)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_rss_child(quick: bool, n: int, layers: list[int]) -> float:
    code = (f"import sys; sys.argv=['x']; sys.path.insert(0, 'benchmarks'); import overhead as o, resource; "
            f"m, d = o.setup({quick}, {n}); "
            f"o.ours(m, d, [o.ProbeConfig(f'model.layers.{{i}}.output') for i in {layers}]); "
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def probe_updates(model, data, L, reps, device="cpu"):
    """Seconds of fit_probes from a store (no forward): sklearn vs torch, 4 alphas per layer."""
    import tempfile

    from lm_probe import ActivationStore

    sites = [f"model.layers.{i}.output" for i in range(L)]
    configs = [ProbeConfig(s, name=f"{s}/alpha={a}", alpha=a) for s in sites for a in (1e-5, 1e-4, 1e-3, 1e-2)]
    with tempfile.TemporaryDirectory() as tmp:
        store = ActivationStore(tmp, sites=sites, pool="mean", run="bench")
        ProbeRunner(model, progress=False).collect(data, [store])
        run = ActivationStore.open(tmp).run("bench")
        fit = lambda backend: ProbeRunner.from_store(run, configs, progress=False, backend=backend, device=device
                                                     ).fit_probes(data, None, batch_size=16, num_epochs=1, val_size=0,
                                                                  eval_every=10**9)
        seconds = {"sklearn": [], "torch": []}
        for backend in seconds:
            fit(backend)  # warm-up
        for _ in range(reps):
            for backend in seconds:
                seconds[backend].append(timed(lambda: fit(backend)))
    return len(configs), seconds


def quality(model, train, test, layers):
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")
    configs = [ProbeConfig(f"model.layers.{i}.output") for i in layers]
    runner = ProbeRunner(model, configs, seed=0, progress=False).fit_probes(train, test, batch_size=16)
    torch_runner = ProbeRunner(model, configs, seed=0, progress=False, backend="torch").fit_probes(
        train, test, batch_size=16)
    Xtr, Xte = runner.pooled(train), runner.pooled(test)
    rows = []
    for i, c in zip(layers, configs):
        key = (c.site, c.pool)
        scaler = StandardScaler().fit(Xtr[key])
        lr = LogisticRegressionCV(Cs=8, max_iter=3000).fit(scaler.transform(Xtr[key]), train.labels)
        ref = float(np.mean(lr.predict(scaler.transform(Xte[key])) == test.labels))
        rows.append({"layer": i, "online": float(runner.metrics.loc[c.name, "accuracy"]), "offline_lr": ref,
                     "online_torch": float(torch_runner.metrics.loc[c.name, "accuracy"])})
    return rows


def ratio_table(seconds: dict[str, list[float]], base: str) -> list[dict]:
    """Median seconds and median (min-max) ratio to ``base`` of the same repetition, per run."""
    table = []
    for k, values in seconds.items():
        ratios = [v / b for v, b in zip(values, seconds[base])]
        table.append({"run": k, "median_s": statistics.median(values), "ratio": statistics.median(ratios),
                      "ratio_min": min(ratios), "ratio_max": max(ratios)})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model")
    parser.add_argument("--examples", type=int, default=None, help="training examples timed (default 320 / 160)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n = args.examples or (320 if args.quick else 160)
    model, data = setup(args.quick, max(n, 1200 if not args.skip_quality else n))
    timing = data.subset(range(n))
    L = model._module.config.num_hidden_layers
    five = sorted({0, L // 4, L // 2, 3 * L // 4, L - 1})
    batches = list(timing.batches(16, shuffle=True, seed=0, by_length=True))
    runs = {
        "bare forward": lambda: bare(model, batches),
        "5 probes (deepest = last layer)": lambda: ours(model, timing, [ProbeConfig(f"model.layers.{i}.output") for i in five]),
        f"{L} probes + Geometry at every layer": lambda: ours(
            model, timing, [ProbeConfig(f"model.layers.{i}.output") for i in range(L)],
            [Geometry([f"model.layers.{i}.output" for i in range(L)], pool="mean")]),
        f"{L} probes + Geometry, backend=torch": lambda: ours(
            model, timing, [ProbeConfig(f"model.layers.{i}.output") for i in range(L)],
            [Geometry([f"model.layers.{i}.output" for i in range(L)], pool="mean")], backend="torch"),
        "early exit (deepest = middle layer)": lambda: ours(
            model, timing, [ProbeConfig(f"model.layers.{i}.output") for i in range(0, L // 2 + 1, max(1, L // 8))]),
        "naive: 5 full forwards per batch": lambda: naive(model, batches, five),
    }
    torch.manual_seed(0)
    for fn in runs.values():  # warm-up
        fn()
    seconds = {k: [] for k in runs}
    for _ in range(args.reps):  # interleaved repetitions
        for k, fn in runs.items():
            seconds[k].append(timed(fn))
    table = ratio_table(seconds, "bare forward")
    speedup = statistics.median([nv / ov for nv, ov in zip(seconds["naive: 5 full forwards per batch"],
                                                             seconds["5 probes (deepest = last layer)"])])
    device = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        device += f", {torch.cuda.get_device_name()}"
    print(f"\n{'quick (tiny random Llama, 8 layers, hidden 128)' if args.quick else 'SmolLM2-135M, Rotten Tomatoes'}: "
          f"{n} training examples, batch 16, {len(batches)} batches, {args.reps} interleaved reps; {device}\n")
    print("| run | median s | ratio to bare (min-max) |\n|---|---:|---:|")
    for r in table:
        print(f"| {r['run']} | {r['median_s']:.2f} | {r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |")
    print(f"\nnaive / ours (5 probes): {speedup:.2f}x faster (target >= {0.8 * len(five):.1f}x)")
    result = {"table": table, "speedup_vs_naive": speedup, "n": n, "quick": args.quick, "device": device}
    if not args.skip_memory:
        one, four = peak_rss_child(args.quick, n, five), peak_rss_child(args.quick, 4 * n, five)
        print(f"peak RSS of fit_probes: {one:.0f} MiB at {n} examples, {four:.0f} MiB at {4 * n} "
              f"({(four / one - 1) * 100:+.1f}%, target within 10%)")
        result["memory_mib"] = {"1x": one, "4x": four}
    n_probes, updates = probe_updates(model, timing, L, args.reps)
    sk, th = statistics.median(updates["sklearn"]), statistics.median(updates["torch"])
    ratios = [a / b for a, b in zip(updates["sklearn"], updates["torch"])]
    print(f"\nprobe updates only ({n_probes} linear probes, {len(batches)} batches, from a store): "
          f"sklearn {sk:.2f} s, torch {th:.2f} s: torch {statistics.median(ratios):.1f}x faster "
          f"({min(ratios):.1f}-{max(ratios):.1f})")
    result["probe_updates"] = {"n_probes": n_probes, **updates}
    if not args.skip_quality:
        train, test = data.tt_split(0.2, seed=0)
        rows = quality(model, train, test, five)
        print("\n| layer | online acc (sklearn) | online acc (torch) | offline LogisticRegressionCV acc | gap (sklearn) "
              "| gap (torch) |\n|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['layer']} | {r['online']:.3f} | {r['online_torch']:.3f} | {r['offline_lr']:.3f} | "
                  f"{r['offline_lr'] - r['online']:+.3f} | {r['offline_lr'] - r['online_torch']:+.3f} |")
        result["quality"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
