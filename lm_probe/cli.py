"""The ``lm-probe`` command line.

``lm-probe demo`` is a newcomer's first five minutes: it loads the embedded SmolLM2-135M
model and the Rotten Tomatoes snippets (both read from PyPI wheels, no hub needed),
trains one probe per chosen layer from one forward pass per batch, prints the metrics
table sorted by layer, and writes ``metrics.csv`` and ``accuracy_by_layer.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from loguru import logger

__all__ = ["main", "run_demo"]

DEMO_LAYERS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29)


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes integers separated by commas, got {text!r}") from None


def run_demo(
    *,
    n_examples: int = 2000,
    layers: Sequence[int] = DEMO_LAYERS,
    batch_size: int = 32,
    pool: str = "mean",
    out: str | Path = "lm_probe_out/demo",
    seed: int = 0,
    progress: bool = True,
    model: str = "smollm2-135m",
):
    """Train probes on the embedded model and data; write metrics.csv and a plot.

    Args:
        n_examples: Review snippets to use (0 or more than available: all 4,866).
        layers: Block indices to probe (``model.layers.{i}.output``).
        batch_size: Examples per forward pass.
        pool: Pooling for every probe.
        out: Output folder.
        seed: Seed for the subset, splits and probes.
        progress: Show progress bars.
        model: Embedded model name, folder or hub id.

    Returns:
        The metrics DataFrame, sorted by layer.
    """
    import numpy as np

    from . import ProbeConfig, ProbeDataset, ProbeRunner, load_model
    from .embedded import rotten_tomatoes
    from .plots import plot_accuracy_by_layer

    out = Path(out)
    start = time.perf_counter()
    lm = load_model(model)
    n_layers = lm._module.config.num_hidden_layers
    bad = [i for i in layers if not -n_layers <= i < n_layers]
    if bad:
        raise ValueError(f"--layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    reviews = rotten_tomatoes().shuffle(seed=seed)
    if 0 < n_examples < len(reviews):
        reviews = reviews.select(range(n_examples))
    data = ProbeDataset.from_hf(reviews, lm.tokenizer, max_length=64)
    train, test = data.tt_split(test_size=0.2, seed=seed)
    logger.info("{} reviews: {} train, {} test; probing layers {}", len(data), len(train), len(test), list(layers))
    configs = [ProbeConfig(f"model.layers.{i}.output", classes={0, 1}, pool=pool) for i in layers]
    runner = ProbeRunner(lm, configs, seed=seed, progress=progress)
    runner.fit_probes(train, test, batch_size=batch_size)
    metrics = runner.metrics.sort_values("layer")
    out.mkdir(parents=True, exist_ok=True)
    metrics.to_csv(out / "metrics.csv")
    chance = float(np.mean(test.labels == np.bincount(train.labels).argmax()))
    fig = plot_accuracy_by_layer(metrics, out / "accuracy_by_layer.png", chance=chance,
                                 title=f"SmolLM2-135M, Rotten Tomatoes ({len(train)} train, {pool} pooling)")
    import matplotlib.pyplot as plt

    plt.close(fig)
    logger.info("done in {:.0f} s; wrote {} and {}", time.perf_counter() - start,
                out / "metrics.csv", out / "accuracy_by_layer.png")
    return metrics


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm-probe", description="Train many probes from one forward pass per batch.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="probe the embedded SmolLM2-135M on Rotten Tomatoes reviews (offline)",
        description="Load the embedded SmolLM2-135M model and Rotten Tomatoes snippets (read from PyPI "
                    "wheels and cached), train one probe per layer, print the metrics by layer and "
                    "write metrics.csv and accuracy_by_layer.png.")
    demo.add_argument("--n-examples", type=int, default=2000, help="reviews to use, 0 for all 4,866 (default 2000)")
    demo.add_argument("--layers", type=_layers, default=DEMO_LAYERS,
                      help="comma-separated block indices (default %(default)s)")
    demo.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (default 32)")
    demo.add_argument("--pool", choices=["mean", "last", "first", "max"], default="mean", help="pooling (default mean)")
    demo.add_argument("--out", default="lm_probe_out/demo", help="output folder (default lm_probe_out/demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lm-probe``; returns the exit code."""
    args = _parser().parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.debug else "INFO",
               format="<green>{time:HH:mm:ss}</green> {level: <7} {message}")
    try:
        if args.command == "demo":
            metrics = run_demo(n_examples=args.n_examples, layers=args.layers, batch_size=args.batch_size,
                               pool=args.pool, out=args.out, seed=args.seed, progress=not args.no_progress)
            columns = ["site", "pool", "accuracy", "f1", "matthews", "loss", "n_steps", "stop_reason"]
            print(metrics[columns].to_string(float_format=lambda x: f"{x:.3f}"))
            best = metrics["accuracy"].idxmax()
            print(f"\nbest: {best} accuracy {metrics.loc[best, 'accuracy']:.3f}; wrote {args.out}/metrics.csv "
                  f"and {args.out}/accuracy_by_layer.png")
    except Exception as err:
        if args.debug:
            raise
        print(f"lm-probe: error: {err}", file=sys.stderr)
        return 1
    return 0
