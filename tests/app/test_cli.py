"""The command line: complete help, one-line errors (tracebacks only with --debug), run and dry run."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from lm_probe.app.cli import _parser, main, run_demo
from lm_probe.app.problems import ExperimentError
from lm_probe.app.schema import SCHEMA

from conftest import tiny_experiment_folder

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "experiment.toml"

EXPERIMENT = """
out = "out"
[model]
name = "tiny"
[data]
path = "toy.csv"
max_length = 24
[sites]
paths = ["model.layers.{0..1}.output"]
[probes]
num_epochs = 1
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_experiment_folder(root, family="llama", layers=2, n=60, seed=4)
    (root / "exp.toml").write_text(EXPERIMENT)
    (root / "typo.toml").write_text(EXPERIMENT.replace("num_epochs", "num_epoch"))
    return root


@pytest.fixture
def forwards():
    """Counts every module forward in the process (a global pre-hook)."""
    calls = {"n": 0}

    def count(*_):
        calls["n"] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    yield calls
    handle.remove()


# ---------------------------------------------------------------- help
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", [None, "demo", "run", "report", "store"])
def test_help_describes_every_option(command, capsys):
    parser = _parser() if command is None else _subparsers()[command]
    with pytest.raises(SystemExit) as exit_:
        main(["--help"] if command is None else [command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert {"demo", "run", "report", "store"} <= set(action.choices) if command is None else \
                set(action.choices) == {"convert"}
            assert all(name in text for name in action.choices)
            continue
        assert action.help, f"{action.dest} has no help text"
        for option in action.option_strings:
            assert option in text, f"{command}: {option} is not in the help"
        if not action.option_strings:
            assert (action.metavar or action.dest) in text


def test_run_help_documents_the_whole_schema(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for table, keys in SCHEMA.items():
        if table:
            assert f"[{table}]" in text
        for key in keys:
            assert f"  {key} " in text, f"[{table}] {key} is not in lm-probe run --help"
    assert str(EXAMPLE) in text and EXAMPLE.is_file()
    assert "--dry-run" in text and "report.html" in text


# ---------------------------------------------------------------- errors
def _error_lines(err: str) -> list[str]:
    """The error's lines: the last lines of stderr, from 'lm-probe: error:' on (the model's
    loading logs come before it: every problem of the file, model and data is reported at once)."""
    lines = err.splitlines()
    starts = [k for k, line in enumerate(lines) if line.startswith("lm-probe: error: ")]
    assert len(starts) == 1, err
    return lines[starts[0]:]


def test_errors_are_one_line_without_traceback(folder, capsys, forwards):
    assert main(["run", str(folder / "typo.toml")]) == 1
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "Traceback" not in err
    assert _error_lines(err)[0].startswith(f"lm-probe: error: {folder / 'typo.toml'}: unknown key 'num_epoch' in "
                                           "[probes]; did you mean 'num_epochs'?")
    assert main(["run", str(folder / "missing.toml")]) == 1
    assert capsys.readouterr().err == f"lm-probe: error: experiment file {str(folder / 'missing.toml')!r} " \
                                      "does not exist\n"
    assert main(["report", str(folder)]) == 1
    assert "is not a run folder: it has no run.json" in capsys.readouterr().err
    assert forwards["n"] == 0


def test_debug_shows_the_traceback(folder):
    for argv in (["--debug", "run", str(folder / "typo.toml")], ["run", str(folder / "typo.toml"), "--debug"]):
        with pytest.raises(ExperimentError, match="unknown key 'num_epoch'"):
            main(argv)


def test_the_installed_entry_point(folder):
    """As a user sees it: one line on stderr and exit code 1; --debug adds the traceback."""
    command = [sys.executable, "-m", "lm_probe", "run", str(folder / "typo.toml")]
    plain = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 1 and len(_error_lines(plain.stderr)) == 1 and "Traceback" not in plain.stderr
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "ExperimentError" in debug.stderr


def test_bad_arguments_exit_2_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run"])
    assert exit_.value.code == 2
    assert "the following arguments are required: EXPERIMENT.toml" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["0", "-3", "two"])
def test_demo_batch_size_below_one_exits_2_before_loading(capsys, size):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--batch-size", size])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --batch-size:" in err
    assert ("at least 1" if size != "two" else "takes a whole number") in err


def test_run_demo_refuses_batch_size_below_one_before_loading(monkeypatch):
    import lm_probe

    def never(*_, **__):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(lm_probe, "load_model", never)
    with pytest.raises(ValueError, match="batch_size must be a whole number of examples per batch, at least 1"):
        run_demo(batch_size=0)


# ---------------------------------------------------------------- run
def test_dry_run_prints_the_plan_without_a_forward(folder, capsys, forwards):
    assert main(["run", "--dry-run", "--no-progress", str(folder / "exp.toml")]) == 0
    out = capsys.readouterr().out
    assert forwards["n"] == 0
    assert "model:      tiny (LlamaForCausalLM, 2 layers, hidden size 32)" in out
    assert "probes:     2 = 2 sites, one trace per batch" in out
    assert "  model.layers.1.output\n" in out
    assert "no forward pass was run" in out
    assert not (folder / "out").exists()


def test_dry_run_reports_every_problem_in_one_run(folder, capsys, forwards, tmp_path):
    """Four mistakes, in the file, the data, the sites and the output folder: all four are
    reported by one dry run, one line each, the output folder last."""
    out = tmp_path / "held"
    out.mkdir()
    (out / "metrics.csv").write_text("probe\n")
    text = (EXPERIMENT.replace('out = "out"', f'out = "{out}"').replace("num_epochs", "aplha = 1e-3\nnum_epochs")
            .replace("max_length = 24", 'max_length = 24\ntext_column = "txt"')
            .replace("{0..1}.output", '0.output", "model.layers.0.mlpp.output'))
    (folder / "mistakes.toml").write_text(text)
    assert main(["run", "--dry-run", str(folder / "mistakes.toml")]) == 1
    lines = _error_lines(capsys.readouterr().err)
    assert lines[0] == f"lm-probe: error: {folder / 'mistakes.toml'}: 4 problems:"
    assert lines[1].startswith("  - unknown key 'aplha' in [probes]; did you mean 'alpha'?")
    assert lines[2].startswith("  - [data] text_column = 'txt' is not a column of toy.csv; did you mean 'text'?")
    assert lines[3].startswith("  - [sites] ") and "'model.layers.0.mlpp.output'" in lines[3]
    assert lines[4].startswith(f"  - the output folder {out} already holds a run (metrics.csv)")
    assert len(lines) == 5 and forwards["n"] == 0


def test_run_writes_the_outputs_and_refuses_to_overwrite(folder, capsys, tmp_path):
    out = tmp_path / "cli_run"
    assert main(["run", "--no-progress", "--out", str(out), "--seed", "3", str(folder / "exp.toml")]) == 0
    assert f"wrote {out / 'metrics.csv'} and {out / 'report.html'}" in capsys.readouterr().out
    metrics = pd.read_csv(out / "metrics.csv", index_col=0)
    assert list(metrics.index) == ["model.layers.0.output", "model.layers.1.output"]
    assert '"seeds": [\n    3\n  ]' in (out / "run.json").read_text()
    assert main(["run", "--no-progress", "--out", str(out), str(folder / "exp.toml")]) == 1
    assert "already holds a run (metrics.csv, baselines.csv, run.json, report.html" in capsys.readouterr().err
    assert main(["run", "--no-progress", "--out", str(out), "--overwrite", str(folder / "exp.toml")]) == 0


@pytest.mark.slow
def test_example_experiment_dry_run(capsys, forwards):
    """examples/experiment.toml checks out against the embedded SmolLM2-135M and Rotten Tomatoes."""
    from lm_probe.core.embedded import embedded_model_path

    embedded_model_path("smollm2-135m")  # on an empty cache, the one-time conversion checks its logits
    forwards["n"] = 0  # the dry run itself runs no forward
    assert main(["run", "--dry-run", str(EXAMPLE), "--out", "unused"]) == 0
    out = capsys.readouterr().out
    assert forwards["n"] == 0
    assert "probes:     20 = 10 sites x pool ['mean', 'last'], 20 with a control twin" in out
    assert "using 600 (classes 0 (rotten): " in out and "gauges:     10 sites, 128 examples" in out
