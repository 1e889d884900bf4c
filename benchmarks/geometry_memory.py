"""Geometry memory is bounded by hidden sizes and sample_limit, not by the token budget.

Runs ``runner.collect`` with a Geometry (every real token a row) over N and 10 x N
tokens on a tiny random Llama, side by side in one process, and reports the peak of
Python-tracked allocations (numpy state included) during each pass. Usage:

    python benchmarks/geometry_memory.py [--tokens 20000] [--hidden 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

from lm_probe import Geometry, ProbeDataset, ProbeRunner, load_model
from lm_probe.testing import tiny_model, tiny_tokenizer, toy_texts


def peak_of_pass(runner: ProbeRunner, data: ProbeDataset, tokens: int, hidden: int) -> tuple[float, float, int]:
    geo = Geometry([f"model.layers.{i}.output" for i in range(4)], pool="none", sample_limit=512)
    tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    runner.collect(data, [geo], batch_size=32, max_tokens=tokens)
    geo.compute()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20, seconds, geo.n_rows_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = load_model(tiny_model("llama", layers=4, hidden=args.hidden), tokenizer=tiny_tokenizer())
    texts, labels = toy_texts(args.tokens * 10 // 7 + 100, seed=0, min_words=4, max_words=10)
    data = ProbeDataset.from_texts(texts, labels, tokenizer=model.tokenizer)
    runner = ProbeRunner(model, progress=False)
    peak_of_pass(runner, data, 1000, args.hidden)  # warm-up
    rows = []
    for tokens in (args.tokens, 10 * args.tokens):
        peak, seconds, n = peak_of_pass(runner, data, tokens, args.hidden)
        rows.append({"tokens": n, "peak_mib": round(peak, 2), "seconds": round(seconds, 2)})
    ratio = rows[1]["peak_mib"] / rows[0]["peak_mib"]
    print(f"| tokens | peak traced MiB | seconds |\n|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']:,} | {r['peak_mib']:.2f} | {r['seconds']:.2f} |")
    print(f"\npeak ratio 10x tokens / 1x tokens: {ratio:.3f} (hidden {args.hidden}, 4 sites, sample_limit 512)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "ratio": ratio, "hidden": args.hidden}, f, indent=2)


if __name__ == "__main__":
    main()
