"""The ``lm-probe`` command line.

* ``lm-probe demo`` is a newcomer's first five minutes: it loads the embedded SmolLM2-135M
  model and the Rotten Tomatoes snippets (both read from PyPI wheels, no hub needed),
  trains one probe per chosen layer from one forward pass per batch, prints the metrics
  table sorted by layer (accuracy with its 95% bootstrap interval, AUROC, ECE), and writes
  ``metrics.csv`` and ``accuracy_by_layer.png``.
* ``lm-probe run experiment.toml`` runs a declared experiment (:mod:`lm_probe.app.experiment`);
  ``--dry-run`` checks the whole file, model and data included, and prints the plan
  without any forward pass.
* ``lm-probe report RUN_DIR`` rebuilds a run's ``report.html`` from its files.
* ``torchrun --nproc-per-node K -m lm_probe run experiment.toml`` runs an experiment data
  parallel (:mod:`lm_probe.app.launch`): the metrics of one process with ``batch_size`` K times
  larger; rank 0 alone prints and writes the run folder.

Errors are one line (``lm-probe: error: ...``, exit code 1; an experiment with several
problems gets one line per problem, all found in one run) unless ``--debug`` is given, which
shows the traceback and debug logs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from loguru import logger

__all__ = ["main", "run_demo", "run_experiment_command", "report_command"]

DEMO_LAYERS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29)


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes integers separated by commas, got {text!r}") from None


def _batch_size(text: str) -> int:
    """``--batch-size``: refused by argparse (exit 2) before anything loads."""
    from ..core.batching import check_batch_size

    try:
        return check_batch_size(int(text), "--batch-size")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err) if text.strip().lstrip("-").isdigit() else
                                         f"--batch-size takes a whole number, got {text!r}") from None


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

    Raises:
        ValueError: ``batch_size`` below 1 (before the model loads), or a layer out of range.
    """
    from .. import ProbeConfig, ProbeDataset, ProbeRunner, load_model
    from ..core.batching import check_batch_size

    batch_size = check_batch_size(batch_size)
    from ..core.embedded import rotten_tomatoes

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
    _write_demo(metrics, train, test, out, pool)
    logger.info("done in {:.0f} s; wrote {} and {}", time.perf_counter() - start,
                out / "metrics.csv", out / "accuracy_by_layer.png")
    return metrics


def _write_demo(metrics: Any, train: Any, test: Any, out: Path, pool: str) -> None:
    """The demo's ``metrics.csv`` and ``accuracy_by_layer.png`` (with the majority-class
    accuracy of ``test`` as chance)."""
    import matplotlib.pyplot as plt
    import numpy as np

    from .plots import plot_accuracy_by_layer

    out.mkdir(parents=True, exist_ok=True)
    metrics.to_csv(out / "metrics.csv")
    chance = float(np.mean(test.labels == np.bincount(train.labels).argmax()))
    fig = plot_accuracy_by_layer(metrics, out / "accuracy_by_layer.png", chance=chance,
                                 title=f"SmolLM2-135M, Rotten Tomatoes ({len(train)} train, {pool} pooling)")
    plt.close(fig)


def _demo_table(metrics: Any) -> Any:
    """The demo's printed table: accuracy with its 95% bootstrap interval, AUROC, ECE,
    recall at 1% false positives, f1, loss and how each probe stopped."""
    table = metrics[["site", "pool", "accuracy"]].copy()
    table["95% CI"] = [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(metrics["accuracy_lo"], metrics["accuracy_hi"])]
    for column in ("auroc", "ece", "recall_at_fpr", "f1", "loss", "n_steps", "stop_reason"):
        table[column] = metrics[column]
    return table


RUN_EPILOG = """\
A minimal experiment file (relative paths start at the file's folder):

  out = "runs/sentiment"
  [model]
  name = "smollm2-135m"              # embedded, a local folder, or a hub id
  [data]
  source = "rotten_tomatoes"         # or path = "reviews.csv" / "reviews.jsonl" / saved dataset
  n_examples = 400
  [sites]
  kind = "resid_post"                # or paths = ["model.layers.{{0..29}}.output"]
  layers = "0..29..3"
  [probes]
  pool = ["mean", "last"]            # a list is a sweep: one probe per value, one trace
  [geometry]                         # covariance spectra and a CKA heatmap
  [gauges]                           # diffusion spectra
  n_samples = 128

A complete example that runs offline: {example}
Outputs in out/: metrics.csv, probes/, geometry/, gauges/, run.json, config.json,
experiment.toml (a copy) and report.html (self-contained: open it in any browser).
With seeds = [0, 1, 2]: one complete run per seed in seed_<s>/, plus metrics.csv
(a seed column) and report.html over all seeds.

Every table and key (an unknown key is an error that names it):
{schema}
"""


def _example_path() -> str:
    """The example experiment shipped in the repository (examples/experiment.toml)."""
    path = Path(__file__).resolve().parents[2] / "examples" / "experiment.toml"
    return str(path) if path.is_file() else "examples/experiment.toml in the lm_probe source repository"


def _debug_flag(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show full tracebacks and debug logs instead of one-line errors")


def _parser() -> argparse.ArgumentParser:
    from .schema import schema_help

    parser = argparse.ArgumentParser(
        prog="lm-probe", description="Train many probes on a language model's activations from one forward "
                                     "pass per batch, and measure their geometry.",
        epilog="Run 'lm-probe COMMAND --help' for a command's options. Example: lm-probe run --dry-run "
               f"{_example_path()}")
    _debug_flag(parser, False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="probe the embedded SmolLM2-135M on Rotten Tomatoes reviews (offline)",
        description="Load the embedded SmolLM2-135M model and Rotten Tomatoes snippets (read from PyPI "
                    "wheels and cached), train one probe per layer, print the metrics by layer and "
                    "write metrics.csv and accuracy_by_layer.png.")
    demo.add_argument("--n-examples", type=int, default=2000, help="reviews to use, 0 for all 4,866 (default 2000)")
    demo.add_argument("--layers", type=_layers, default=DEMO_LAYERS,
                      help="comma-separated block indices (default %(default)s)")
    demo.add_argument("--batch-size", type=_batch_size, default=32, help="examples per forward pass (default 32)")
    demo.add_argument("--pool", choices=["mean", "last", "first", "max"], default="mean", help="pooling (default mean)")
    demo.add_argument("--out", default="lm_probe_out/demo", help="output folder (default lm_probe_out/demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _debug_flag(demo, argparse.SUPPRESS)

    run = commands.add_parser(
        "run", help="run a declarative experiment from a TOML file (--dry-run to check it)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the experiment declared in a TOML file: load the model and data, train every probe of "
                    "the sweep from one forward pass per batch, run the geometry and gauges on the same "
                    "passes, and write metrics CSVs, each consumer's artifacts and a self-contained "
                    "report.html. Everything (keys, sites, columns, labels, options) is checked before the "
                    "first forward pass.",
        epilog=RUN_EPILOG.format(example=_example_path(), schema=schema_help()))
    run.add_argument("experiment", metavar="EXPERIMENT.toml", help="the experiment file")
    run.add_argument("--dry-run", action="store_true",
                     help="check the whole file (model, sites, data columns and labels, probe and consumer "
                          "options) and print what would run, without any forward pass")
    run.add_argument("--out", metavar="DIR", help="output folder, replacing the file's out (relative to the "
                                                  "current folder)")
    run.add_argument("--seed", type=int, action="append", metavar="N",
                     help="seed, replacing the file's seed/seeds (repeat for several)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run files of an output folder that already holds a run")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _debug_flag(run, argparse.SUPPRESS)

    report = commands.add_parser(
        "report", help="rebuild report.html from a run folder's files",
        description="Rebuild the self-contained report.html of a run folder written by 'lm-probe run' "
                    "(from metrics.csv, geometry/, gauges/ and run.json; no model is loaded).")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (it holds run.json)")
    report.add_argument("--output", metavar="FILE", help="where to write the report (default RUN_DIR/report.html)")
    _debug_flag(report, argparse.SUPPRESS)
    _store_parser(commands)
    return parser


def _store_parser(commands: Any) -> None:
    store = commands.add_parser(
        "store", help="manage activation stores: convert old-format runs",
        description="Manage the activation stores that ActivationStore writes.")
    actions = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    convert = actions.add_parser(
        "convert", help="rewrite old-format (chunked .npy) runs as Arrow datasets, in place",
        description="Rewrite every run of the old chunked .npy format under PATH as an Arrow dataset "
                    "(what datasets.load_from_disk opens) with the same rows, labels, example ids and "
                    "metadata; runs already in the Arrow format are left as they are.")
    convert.add_argument("path", metavar="PATH", help="a store folder (every old run in it) or one run folder")
    convert.add_argument("--drop-unreadable", action="store_true",
                         help="convert runs with unreadable chunks too, leaving those rows out (recorded in the "
                              "run's metadata); without it such runs are refused and nothing is converted")
    _debug_flag(store, argparse.SUPPRESS)
    _debug_flag(convert, argparse.SUPPRESS)


def run_experiment_command(experiment: str | Path, *, dry_run: bool = False, out: str | None = None,
                           seeds: Sequence[int] | None = None, overwrite: bool = False,
                           progress: bool = True) -> list[Path]:
    """``lm-probe run``: check and plan an experiment file, print the plan, then run it.

    Args:
        experiment: The TOML file.
        dry_run: Stop after checking and printing the plan (no forward pass).
        out: Replace the file's output folder.
        seeds: Replace the file's seeds.
        overwrite: Allow an output folder that already holds a run.
        progress: Show progress bars.

    Returns:
        The run folders written (none for a dry run).

    Raises:
        ExperimentError: every problem found in the file, its model and its data, together.
    """
    from .experiment import load_experiment
    from .launch import agree, process_group
    from .outputs import run_plan
    from .plan import plan_experiment

    with process_group() as rank:  # under torchrun: data parallel, rank 0 prints and writes
        # strict=False: the file's problems are reported together with the model's and the data's
        plan = agree(lambda: plan_experiment(load_experiment(experiment, out=out, seeds=seeds, strict=False),
                                             progress=progress, overwrite=overwrite))
        if rank == 0:
            print(plan.describe(), flush=True)
        if dry_run:
            if rank == 0:
                print("\ndry run: the file, model, sites and data are valid; no forward pass was run.")
            return []
        folders = run_plan(plan)
        if rank == 0:
            print(f"\nwrote {folders[-1] / 'metrics.csv' if plan.probes else folders[-1]} and "
                  f"{folders[-1] / 'report.html'}")
    return folders


def report_command(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """``lm-probe report``: rebuild a run folder's report.html; returns its path."""
    from .report import write_report

    path = write_report(run_dir, output)
    print(f"wrote {path}")
    return path


def store_convert_command(path: str | Path, *, drop_unreadable: bool = False) -> list[Path]:
    """``lm-probe store convert``: convert the old-format runs at ``path``; returns their folders
    (``drop_unreadable``: convert runs with unreadable chunks too, recording the loss)."""
    from ..consumers.store import convert_store
    from ..consumers.store_shards import read_info

    folders = convert_store(path, drop_unreadable=drop_unreadable)
    for folder in folders:  # the metadata the conversion just wrote says it all: no need to open the run
        meta = read_info(folder)
        lost = meta.get("lost_rows")
        print(f"converted run {meta['run']!r}: {meta['n_examples']} examples x {len(meta['sites'])} sites -> {folder}"
              + (f" ({lost} rows of unreadable chunks left out)" if lost else ""))
    if not folders:
        print(f"no old-format runs at {path}: nothing to convert")
    return folders


def _one_line(err: BaseException) -> str:
    """The error's message on one line (its type name when it has no message); an experiment
    with several problems gets a line per problem."""
    from .problems import ExperimentError

    if isinstance(err, ExperimentError) and len(err.problems) > 1:  # its own layout, each problem on one line
        return str(ExperimentError([" ".join(p.split()) for p in err.problems], err.where))
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lm-probe``; returns the exit code (0 ok, 1 error, 2 bad arguments, 130 interrupted)."""
    args = _parser().parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.debug else "INFO",
               format="<green>{time:HH:mm:ss}</green> {level: <7} {message}")
    if args.command != "run":
        return _command(args)
    from .launch import process_group

    with process_group():  # under torchrun: the group lives until every rank has reported its error
        return _command(args)


def _command(args: argparse.Namespace) -> int:
    """Run the parsed command; returns the exit code (errors printed on one line)."""
    from .launch import settle

    try:
        if args.command == "demo":
            metrics = run_demo(n_examples=args.n_examples, layers=args.layers, batch_size=args.batch_size,
                               pool=args.pool, out=args.out, seed=args.seed, progress=not args.no_progress)
            print(_demo_table(metrics).to_string(float_format=lambda x: f"{x:.3f}"))
            best = metrics.loc[metrics["accuracy"].idxmax()]
            print(f"\nbest: {best.name} accuracy {best['accuracy']:.3f} (95% CI {best['accuracy_lo']:.3f}-"
                  f"{best['accuracy_hi']:.3f}); wrote {args.out}/metrics.csv and {args.out}/accuracy_by_layer.png")
        elif args.command == "run":
            run_experiment_command(args.experiment, dry_run=args.dry_run, out=args.out, seeds=args.seed,
                                   overwrite=args.overwrite, progress=not args.no_progress)
        elif args.command == "report":
            report_command(args.run_dir, args.output)
        elif args.command == "store":
            store_convert_command(args.path, drop_unreadable=args.drop_unreadable)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("lm-probe: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        sys.stderr.write(f"lm-probe: error: {_one_line(err)}\n")  # one write: ranks' lines do not interleave
        sys.stderr.flush()
        settle(err)  # under torchrun: every rank says it before torchrun stops the others
        return 1
    return 0
