"""Data parallelism: throughput of K = 1 and 2 torchrun processes on the same examples.

Each run is ``torchrun --nproc-per-node K`` over this script (one thread per process, gloo on
the CPU; NCCL where GPUs are found, one per rank), timing ``fit_probes`` (3 epochs of one
probe per site, replay cache, validation and test) with ``batch_size=B/K`` per rank, so that every run makes the same
global batches of B examples and trains the same probes. It prints the wall seconds of the
timed call, the examples per second (training + test examples traced once each, over the
seconds) and the scaling efficiency (throughput of K processes / (K x that of 1)); rank 0 also
checks that the metrics equal the one-process run's. On a 2-core machine two processes of one
thread each are the honest comparison: one process of two threads is not the baseline.

Usage:
    python benchmarks/distributed.py --quick     # tiny random Llama, seconds
    python benchmarks/distributed.py             # embedded SmolLM2-135M + Rotten Tomatoes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lm_probe import ProbeConfig, ProbeDataset, ProbeRunner, load_model


def setup(quick: bool, n: int, device: str):
    if quick:
        from lm_probe.testing import tiny_model, tiny_tokenizer, toy_texts

        model = load_model(tiny_model("llama", layers=8, hidden=128).to(device), tokenizer=tiny_tokenizer())
        texts, labels = toy_texts(n, seed=0)
        data = ProbeDataset.from_texts(texts, labels, tokenizer=model.tokenizer, max_length=64)
        return model, data, [f"model.layers.{i}.output" for i in (1, 4, 7)]
    from lm_probe.embedded import rotten_tomatoes

    model = load_model("smollm2-135m", device_map=device)
    reviews = rotten_tomatoes().shuffle(seed=0).select(range(n))
    data = ProbeDataset.from_hf(reviews, model.tokenizer, max_length=64)
    return model, data, [f"model.layers.{i}.output" for i in (3, 9, 15, 22, 29)]


def worker(args: argparse.Namespace) -> None:
    """One rank: time fit_probes on global batches of args.batch examples; rank 0 writes the result."""
    import torch.distributed as dist

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    model, data, sites = setup(args.quick, args.n, device)
    train, test = data.tt_split(0.2, seed=0)
    # a fixed amount of probe work (3 epochs, one probe per site: the defaults until December 2026), so
    # that the runs differ only in how the forwards are shared out
    runner = ProbeRunner(model, [ProbeConfig(s, eta0=0.003, alpha=1e-4) for s in sites], seed=0, progress=False)
    dist.barrier()
    start = time.perf_counter()
    runner.fit_probes(train, test, batch_size=args.batch // world, n_boot=0, num_epochs=3, patience=5, lr_decay=None)
    seconds = time.perf_counter() - start
    if rank == 0:
        metrics = runner.metrics[["accuracy", "loss", "n_steps"]].to_dict()
        Path(args.out).write_text(json.dumps({"world": world, "seconds": seconds, "examples": len(data),
                                              "metrics": metrics}))
    dist.destroy_process_group()


def launch(k: int, args: argparse.Namespace, out: Path) -> dict:
    """Run this script under torchrun with k processes of one thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(k),
               __file__, "--worker", "--examples", str(args.n), "--batch", str(args.batch), "--out", str(out)]
    command += ["--quick"] if args.quick else []
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model")
    parser.add_argument("--examples", dest="n", type=int, default=None, help="examples (default 2000 quick, 1000 real)")
    parser.add_argument("--batch", type=int, default=32, help="examples per global batch (divided among ranks)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each K, interleaved (the best is kept)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.n = args.n or (2000 if args.quick else 1000)
    if args.worker:
        return worker(args)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.repeats):
            for k in runs:
                runs[k].append(launch(k, args, Path(folder, f"k{k}_{r}.json")))
    best = {k: min(rs, key=lambda r: r["seconds"]) for k, rs in runs.items()}
    same = best[1]["metrics"] == best[2]["metrics"]
    print(f"fit_probes on {args.n} examples, global batch {args.batch}, one thread per process, "
          f"{'tiny random Llama' if args.quick else 'SmolLM2-135M'}, best of {args.repeats}")
    print("| processes | seconds | examples/s | scaling efficiency |\n| --- | --- | --- | --- |")
    base = best[1]["examples"] / best[1]["seconds"]
    for k, r in best.items():
        rate = r["examples"] / r["seconds"]
        print(f"| {k} | {r['seconds']:.2f} | {rate:.1f} | {rate / (k * base):.2f} |")
    print(f"metrics of 2 processes equal those of 1: {same}")


if __name__ == "__main__":
    main()
