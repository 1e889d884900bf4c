"""The table a reviewer asks for, from one ``fit_probes``, on the embedded model and data.

SmolLM2-135M-Instruct, Rotten Tomatoes (fresh / rotten), one mean-pooled probe on every
third block output, each with a control-task twin, and the same probes on a randomly
initialized copy of the model (``baseline="random_init"``: one more forward per example).
Printed: per layer, test accuracy with its 95% bootstrap interval, selectivity, the online
codelength (bits) and compression of the trained and the random-init model, AUROC and
ECE; then the text baselines (majority class, bag of words) that never look at the model.

Usage:
    python benchmarks/reviewer_table.py                    # 1,000 reviews, 800 train / 200 test
    python benchmarks/reviewer_table.py --examples 300 --layers 0 15 29
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from lm_probe import ProbeConfig, ProbeDataset, ProbeRunner, load_model
from lm_probe.embedded import rotten_tomatoes

COLUMNS = ["layer", "accuracy", "accuracy_lo", "accuracy_hi", "selectivity", "codelength_bits", "compression",
           "baseline_accuracy", "baseline_compression", "auroc", "ece"]
BASELINE_COLUMNS = ["baseline", "input", "accuracy", "accuracy_lo", "accuracy_hi", "f1", "auroc", "n_train", "n_scored"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--layers", type=int, nargs="+", default=list(range(0, 30, 3)))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    model = load_model("smollm2-135m")
    reviews = rotten_tomatoes().shuffle(seed=args.seed).select(range(args.examples))
    data = ProbeDataset.from_hf(reviews, model.tokenizer, max_length=64)
    train, test = data.tt_split(test_size=0.2, seed=args.seed)
    configs = [ProbeConfig(f"model.layers.{i}.output", classes={0, 1}, control=True) for i in args.layers]
    runner = ProbeRunner(model, configs, seed=args.seed, progress=False, baseline="random_init")
    runner.fit_probes(train, test, batch_size=args.batch_size)
    seconds = time.perf_counter() - start

    pd.set_option("display.width", 200)
    pd.set_option("display.precision", 3)
    table = runner.metrics.sort_values("layer")
    print(f"SmolLM2-135M, Rotten Tomatoes: {len(train)} train, {len(test)} test; seed {args.seed}; "
          f"{seconds:.0f} s on {torch_threads()} threads\n")
    print(table[[c for c in COLUMNS if c in table]].to_string(index=False))
    print("\ntext baselines (no model):")
    print(runner.baselines[[c for c in BASELINE_COLUMNS if c in runner.baselines]].to_string(index=False))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
