"""Time and memory of the sparse diffusion pipeline at activation scale.

Runs :func:`lm_probe.functional.diffusion.diffuse`'s stages (kNN search, kernel, operator,
eigenvalues) on ``n`` standard-normal points of dimension ``d`` on the sparse path,
once at ``--n`` and once at ``--small-n`` for comparison, each size in a fresh
process so that its ``ru_maxrss`` is its own. Prints a markdown table with seconds per
stage, the tracemalloc peak of the pipeline (numpy and Python allocations made after
the input exists; scikit-learn's compiled neighbour-search buffers are not traced) and
the process peak resident set size, with its value right after the imports (torch,
pulled in by the ``lm_probe`` package, is most of it) in parentheses.

The kNN time is measured by wrapping ``lm_probe.functional.diffusion.knn_distances``; "kernel"
is the rest of ``diffusion_kernel`` (bandwidths, weights, symmetrization). The
neighbour search is scikit-learn's default: brute force for wide data, chunked and
threaded over all cores. Usage:

    python benchmarks/diffusion_scale.py [--n 20000] [--small-n 2000] [--d 576] [--knn 15] [--n-eigs 32]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
import tracemalloc

import numpy as np


def run_size(n: int, d: int, knn: int, n_eigs: int, seed: int = 0) -> dict[str, float]:
    """Run the sparse pipeline once on ``(n, d)`` Gaussian points; return seconds and MiB."""
    import lm_probe.functional.diffusion as diffusion  # imports the lm_probe package (torch, ...) too

    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    X = np.random.default_rng(seed).normal(size=(n, d))
    search = diffusion.knn_distances
    knn_seconds = []

    def timed_search(*args, **kwargs):
        start = time.perf_counter()
        out = search(*args, **kwargs)
        knn_seconds.append(time.perf_counter() - start)
        return out

    diffusion.knn_distances = timed_search
    tracemalloc.start()
    times = {}
    try:
        start = time.perf_counter()
        K, sigma = diffusion.diffusion_kernel(X, knn=knn, sparse=True)
        times["kernel"] = time.perf_counter() - start - knn_seconds[0]
        times["knn"] = knn_seconds[0]
        start = time.perf_counter()
        operator, A = diffusion.diffusion_operator(K, alpha=0.0, normalization="markov")
        times["operator"] = time.perf_counter() - start
        start = time.perf_counter()
        eigenvalues = diffusion.diffusion_eigenvalues(A, n_eigs)
        times["eigenvalues"] = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        diffusion.knn_distances = search
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "n": n, **times, "total": sum(times.values()), "nnz": operator.nnz,
        "input_mib": X.nbytes / 2**20, "traced_peak_mib": peak / 2**20, "maxrss_mib": maxrss_kib / 1024,
        "baseline_mib": baseline_kib / 1024,
        "lambda_2": float(eigenvalues[1]), "gap": float(1 - eigenvalues[1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--small-n", type=int, default=2_000)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--knn", type=int, default=15)
    parser.add_argument("--n-eigs", type=int, default=32)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")  # a fresh process per size: its own maxrss
    rows = []
    for n in (args.small_n, args.n):
        with context.Pool(1) as pool:
            rows.append(pool.apply(run_size, (n, args.d, args.knn, args.n_eigs)))
    print(f"d={args.d}, knn={args.knn}, n_eigs={args.n_eigs}, sparse=True, python {sys.version.split()[0]}\n")
    print("| n | kNN search s | kernel s | operator s | eigenvalues s | total s | nnz | X MiB "
          "| tracemalloc peak MiB | maxrss MiB (after imports) | λ₂ |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['knn']:.2f} | {r['kernel']:.2f} | {r['operator']:.2f} | {r['eigenvalues']:.2f} "
              f"| {r['total']:.2f} | {r['nnz']:,} | {r['input_mib']:.0f} | {r['traced_peak_mib']:.0f} "
              f"| {r['maxrss_mib']:.0f} ({r['baseline_mib']:.0f}) | {r['lambda_2']:.4f} |")


if __name__ == "__main__":
    main()
