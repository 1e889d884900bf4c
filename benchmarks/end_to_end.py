"""fit_probes with the defaults against the cost floor: one bare forward per example.

The floor is one forward pass per example up to the deepest site a probe needs. This
benchmark times, side by side and interleaved in one run (medians, min-max of the
per-repetition ratios):

1. bare: the base model's forward (no unembedding; ``use_cache=False``, full depth,
   ``no_grad``) over every training, validation and test example once, in the same
   batches fit_probes uses (training: the seeded bucketed shuffle of the fit split;
   validation and test: length-sorted) = 1.0;
2. ``fit_probes`` with the defaults (up to 100 epochs, early stopping ending them, five SGD
   twins per probe, validation split, test metrics; the replay cache on), five probes
   spanning the depth, the last layer included;
3. the same with a ``Geometry`` at every layer attached;
4. (``--retrace``) the same as 2 with ``cache=None``: every epoch traced again.

Usage:
    python benchmarks/end_to_end.py --quick        # tiny random Llama, seconds
    python benchmarks/end_to_end.py                # embedded SmolLM2-135M + Rotten Tomatoes
    python benchmarks/end_to_end.py --json out.json --retrace
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from overhead import ratio_table, setup  # noqa: E402

from lm_probe import Geometry, ProbeConfig, ProbeRunner  # noqa: E402

BATCH = 16  # fit_probes' default


def bare(model, fit, val, test, seed=0):
    """One forward per example of the base model, in fit_probes' batches."""
    base = model._module.base_model
    batches = [*fit.batches(BATCH, shuffle=True, seed=seed, by_length=True),
               *val.batches(BATCH, by_length=True), *test.batches(BATCH, by_length=True)]
    with torch.no_grad():
        for b in batches:
            pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
            base(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos, use_cache=False)


def ours(model, train, test, layers, geometry_layers=(), **fit):
    consumers = [Geometry([f"model.layers.{i}.output" for i in geometry_layers], pool="mean")] if geometry_layers else []
    runner = ProbeRunner(model, [ProbeConfig(f"model.layers.{i}.output") for i in layers], consumers=consumers,
                         progress=False)
    runner.fit_probes(train, test, **fit)
    return runner


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model")
    parser.add_argument("--examples", type=int, default=None, help="examples in all (default 400 / 800 quick)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--retrace", action="store_true", help="also time cache=None (every epoch traced)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n = args.examples or (800 if args.quick else 400)
    model, data = setup(args.quick, n)
    train, test = data.tt_split(0.2, seed=0)
    fit, val = train.tt_split(0.1, seed=0)  # what fit_probes holds out with its defaults
    L = model._module.config.num_hidden_layers
    five = sorted({0, L // 4, L // 2, 3 * L // 4, L - 1})
    runs = {
        "bare forward, each example once": lambda: bare(model, fit, val, test),
        "fit_probes defaults, 5 probes": lambda: ours(model, train, test, five),
        f"fit_probes defaults, 5 probes + Geometry at all {L} layers": lambda: ours(model, train, test, five, range(L)),
    }
    if args.retrace:
        runs["fit_probes defaults, 5 probes, cache=None"] = lambda: ours(model, train, test, five, cache=None)
    small_train, small_test = train.subset(range(48)), test.subset(range(16))
    ours(model, small_train, small_test, five, range(L))  # warm-up: imports, allocator, threads
    bare(model, small_train, small_test, small_test)
    seconds = {k: [] for k in runs}
    for _ in range(args.reps):  # interleaved repetitions
        for k, fn in runs.items():
            seconds[k].append(timed(fn))
    table = ratio_table(seconds, "bare forward, each example once")
    runner = ours(model, train, test, five)
    device = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        device += f", {torch.cuda.get_device_name()}"
    name = "quick (tiny random Llama, 8 layers, hidden 128)" if args.quick else "SmolLM2-135M, Rotten Tomatoes"
    print(f"\n{name}: {len(fit)} fit + {len(val)} validation + {len(test)} test examples, batch {BATCH}, "
          f"up to 100 epochs (the defaults), {args.reps} interleaved reps; {device}\n")
    print("| run | median s | ratio to bare (min-max) |\n|---|---:|---:|")
    for r in table:
        print(f"| {r['run']} | {r['median_s']:.2f} | {r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |")
    steps = runner.metrics["n_steps"].tolist()
    print(f"\nprobe steps: {steps} (one epoch = {-(-len(fit) // BATCH)} steps); replay cache "
          f"{runner.cache_info_['nbytes_in_memory'] / 2**20:.2f} MiB in memory" if runner.cache_info_ else "")
    print("targets: fit_probes <= 1.25x, with Geometry <= 1.40x")
    if args.json:
        Path(args.json).write_text(json.dumps({"table": table, "n": n, "quick": args.quick, "device": device,
                                               "steps": steps}, indent=2))


if __name__ == "__main__":
    main()
