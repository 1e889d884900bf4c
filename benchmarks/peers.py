"""lm_probe against a peer, lmprobe: same model, examples, layers and poolings, in one run.

`lmprobe <https://pypi.org/project/lmprobe/>`_ also trains one probe per layer on a language
model's activations (Hugging Face forward hooks, an activation cache on disk, then
``StandardScaler`` + scikit-learn ``LogisticRegression(C=1.0, solver="lbfgs")`` per layer).
It is never a dependency of lm_probe: it lives in an environment of its own, and this script
runs it there in a subprocess (``benchmarks/peers_lmprobe_driver.py``). Set it up once:

    python3 -m venv /work/venv-lmprobe
    /work/venv-lmprobe/bin/pip install torch==2.13.0      # first, so pip keeps the CPU build
    /work/venv-lmprobe/bin/pip install lmprobe==0.10.3
    export LM_PROBE_PEER_PYTHON=/work/venv-lmprobe/bin/python   # or pass --peer-python

What runs, on the CPU, with the same torch threads in both processes:

* the same model: the embedded SmolLM2-135M folder (``embedded_model_path()``), which
  lmprobe loads as a local path (``HF_HUB_OFFLINE=1``);
* the same examples: ``--n`` Rotten Tomatoes reviews (``rotten_tomatoes()``, shuffled with
  ``--seed``), the last ``--test-share`` of them the test set, untruncated;
* the same sites: lmprobe's layer ``i`` is the output of ``model.layers[i]`` (a forward
  hook on the decoder block), which is lm_probe's ``"model.layers.i.output"``; the script
  checks it by comparing both tools' pooled rows of one layer on the first test reviews;
* the same poolings: last (real) token and mean over the real tokens;
* the same batch size (16) for the forward passes.

lm_probe runs in this process, twice: its default online probes (``solver="sgd"``, 3 epochs,
early stopping on a 10% validation split of the training examples) and ``solver="lbfgs"``
(``C`` chosen by 5-fold cross-validation on the training examples). Each is timed from the
runner's creation to the end of ``fit_probes`` (which also scores the test set); lmprobe is
timed from its first extraction to its last prediction. Model loads are timed apart.

Usage:
    python benchmarks/peers.py --peer-python /work/venv-lmprobe/bin/python
    python benchmarks/peers.py --n 600 --json benchmarks/results_peers_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DRIVER = Path(__file__).with_name("peers_lmprobe_driver.py")


def split(n: int, test_share: float) -> int:
    """Training examples among ``n``: the first ``n - round(n * test_share)`` (the rest is the test set)."""
    n_test = round(n * test_share)
    if not 0 < n_test < n:
        raise ValueError(f"--test-share {test_share} leaves no training or no test example out of --n {n}")
    return n - n_test


def now() -> list[float]:
    """``[wall, cpu]`` seconds (``time.process_time``: this process, all threads)."""
    return [time.perf_counter(), time.process_time()]


def since(start: list[float]) -> list[float]:
    return [b - a for a, b in zip(start, now())]


def run_peer(python: str, spec: dict) -> dict:
    """Run the lmprobe driver in its own environment on ``spec``; its JSON answer."""
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps(spec))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(spec["threads"])}
        env.pop("PYTHONPATH", None)  # lm_probe's checkout stays out of the peer's environment
        done = subprocess.run([python, str(DRIVER), str(inp), str(out)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the lmprobe driver failed ({python}):\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def run_ours(model, train, test, layers: list[int], pools: list[str], batch_size: int, seed: int,
             **probe) -> tuple[list[float], dict[str, float]]:
    """``[wall, cpu]`` seconds of lm_probe's ``fit_probes`` (runner included) and the test accuracy
    per ``"layer/pool"``."""
    from lm_probe import ProbeConfig, ProbeRunner

    configs = [ProbeConfig(f"model.layers.{i}.output", pool=p, name=f"{i}/{p}", **probe) for i in layers for p in pools]
    clock = now()
    runner = ProbeRunner(model, configs, seed=seed, progress=False)
    runner.fit_probes(train, test, batch_size=batch_size)
    return since(clock), {c.name: float(runner.metrics.loc[c.name, "accuracy"]) for c in configs}


def feature_gap(model, test, site: str, pools: list[str], peer_rows: dict, batch_size: int) -> dict[str, float]:
    """Largest absolute difference between both tools' pooled rows, relative to the largest value."""
    from lm_probe import ProbeConfig, ProbeRunner

    runner = ProbeRunner(model, [ProbeConfig(site, pool=p, name=p) for p in pools], progress=False)
    k = len(next(iter(peer_rows.values())))
    ours = runner.pooled(test.subset(range(k)), [(site, p) for p in pools], batch_size=batch_size)
    gaps = {}
    for p in pools:
        theirs = np.asarray(peer_rows[p], np.float64)
        gaps[p] = float(np.abs(ours[(site, p)] - theirs).max() / np.abs(theirs).max())
    return gaps


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default=os.environ.get("LM_PROBE_PEER_PYTHON"),
                        help="python of the environment with lmprobe (default: $LM_PROBE_PEER_PYTHON)")
    parser.add_argument("--n", type=int, default=600, help="reviews in all (default 600)")
    parser.add_argument("--test-share", type=float, default=0.25, help="share of them in the test set")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 7, 15, 22, 29])
    parser.add_argument("--pools", nargs="+", default=["last", "mean"], choices=["last", "mean"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-lbfgs", action="store_true", help="lm_probe's default SGD probes only")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if not args.peer_python:
        parser.error("give --peer-python (or set LM_PROBE_PEER_PYTHON) to the python of lmprobe's environment; "
                     "see the setup commands at the top of this script")
    return args


def main() -> None:
    args = parse_args()
    load_avg = [os.getloadavg()[0]]  # other jobs on the machine: wall time counts them, CPU time hardly
    torch.set_num_threads(args.threads)
    from lm_probe import ProbeDataset, load_model
    from lm_probe.embedded import embedded_model_path, rotten_tomatoes

    path = str(embedded_model_path())
    reviews = rotten_tomatoes().shuffle(seed=args.seed).select(range(args.n))
    texts, labels = list(reviews["text"]), np.asarray(reviews["label"], np.int64)
    n_train = split(args.n, args.test_share)
    spec = dict(model=path, layers=args.layers, pools=args.pools, batch_size=args.batch_size, threads=args.threads,
                seed=args.seed, train_texts=texts[:n_train], train_labels=labels[:n_train].tolist(),
                test_texts=texts[n_train:], check_layer=args.layers[len(args.layers) // 2], check_n=16)
    peer = run_peer(args.peer_python, spec)
    peer_acc = {k: float(np.mean(np.asarray(v) == labels[n_train:])) for k, v in peer["predictions"].items()}

    clock = now()
    model = load_model(path)
    load_s = since(clock)
    tok = model.tokenizer
    train = ProbeDataset.from_texts(texts[:n_train], labels[:n_train], tokenizer=tok, max_length=4096)
    test = ProbeDataset.from_texts(texts[n_train:], labels[n_train:], tokenizer=tok, max_length=4096)
    runs = {"sgd": run_ours(model, train, test, args.layers, args.pools, args.batch_size, args.seed)}
    if not args.skip_lbfgs:
        runs["lbfgs"] = run_ours(model, train, test, args.layers, args.pools, args.batch_size, args.seed,
                                 solver="lbfgs")
    gap = feature_gap(model, test, f"model.layers.{spec['check_layer']}.output", args.pools, peer["features"],
                      args.batch_size)
    load_avg.append(os.getloadavg()[0])
    report(args, n_train, peer, peer_acc, load_s, runs, gap, load_avg)


def report(args, n_train: int, peer: dict, peer_acc: dict, load_s: list[float], runs: dict, gap: dict,
           load_avg: list[float]) -> None:
    """Print the side-by-side tables and write the JSON."""
    device = (f"{platform.processor() or platform.machine()}, {args.threads} threads of {os.cpu_count()} cores "
              f"(load average {load_avg[0]:.1f} at the start, {load_avg[1]:.1f} at the end), "
              f"torch {torch.__version__}")
    print(f"\nSmolLM2-135M, Rotten Tomatoes: {n_train} train / {args.n - n_train} test reviews, layers {args.layers}, "
          f"pools {args.pools}, batch {args.batch_size}; {device}; lmprobe {peer['version']} "
          f"(torch {peer['torch']}, {peer['threads']} threads)\n")
    names = [f"{i}/{p}" for i in args.layers for p in args.pools]
    solvers = list(runs)
    print("| layer | pool | lmprobe acc | " + " | ".join(f"lm_probe {s} acc" for s in solvers)
          + " | lmprobe classifier s: wall / CPU |\n|---:|---|---:|" + "---:|" * len(solvers) + "---:|")
    for name, (layer, pool) in zip(names, [(i, p) for i in args.layers for p in args.pools]):
        wall, cpu = peer["per_layer_s"][name]
        print(f"| {layer} | {pool} | {peer_acc[name]:.3f} | "
              + " | ".join(f"{runs[s][1][name]:.3f}" for s in solvers) + f" | {wall:.2f} / {cpu:.2f} |")
    print("| mean | | " + f"{np.mean([peer_acc[k] for k in names]):.3f} | "
          + " | ".join(f"{np.mean([runs[s][1][k] for k in names]):.3f}" for s in solvers) + " | |")
    extract, probes = peer["seconds"]["extract"], peer["seconds"]["probes"]
    peer_s = [e + p for e, p in zip(extract, probes)]
    print("\n| tool | model load s | probing s: wall / CPU | ratio to lmprobe: wall / CPU |\n|---|---:|---:|---:|")
    print(f"| lmprobe (forwards {extract[0]:.1f} / {extract[1]:.1f} s, classifiers {probes[0]:.1f} / "
          f"{probes[1]:.1f} s) | {peer['seconds']['load'][0]:.1f} | {peer_s[0]:.1f} / {peer_s[1]:.1f} | 1.00 / 1.00 |")
    for s in solvers:
        w, c = runs[s][0]
        print(f"| lm_probe, solver={s!r} | {load_s[0]:.1f} | {w:.1f} / {c:.1f} | "
              f"{w / peer_s[0]:.2f} / {c / peer_s[1]:.2f} |")
    print(f"\nsame hidden states: layer {args.layers[len(args.layers) // 2]}, first 16 test reviews, largest "
          "difference / largest value: " + ", ".join(f"{p} {g:.1e}" for p, g in gap.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "n_train": n_train, "n_test": args.n - n_train, "layers": args.layers, "pools": args.pools,
            "batch_size": args.batch_size, "device": device,
            "lmprobe": {**{k: peer[k] for k in ("version", "torch", "threads", "seconds", "per_layer_s")},
                        "accuracy": peer_acc},
            "lm_probe": {"load_s": load_s, **{s: {"seconds": r[0], "accuracy": r[1]} for s, r in runs.items()}},
            "feature_gap": gap, "load_average": load_avg}, indent=2))


if __name__ == "__main__":
    main()
